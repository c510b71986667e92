"""Cost of the texture term: (a) in a training step, against a λ = 0 step, (b) batched search against a per-window loop.

(a) The trainer's own step (``xswinir.trainer.run_step``: degradations, forward, loss, backward, Adam, EMA) on one
fixed batch, for each variant below, interleaved round by round in this one process; each variant's time is
divided by the λ = 0 step of the same round, and the table gives the median of those ratios with their spread
(quartiles), so that the load of a shared machine hits both sides of every ratio alike.

* ``λ = 0``: the plain SwinIR loss (its batches carry no search region);
* ``search in the step``: the projection term with the search on the training thread (``texture.search_in=step``,
  the path before issue 20, and still the path on a GPU);
* ``search in the loader``: the projection, pull and gated-pull terms with the match found by the data
  pipeline (``texture.search_in=loader``, the default on the CPU): the step only computes the term;
* ``the loader's search``: what a DataLoader worker spends per batch on that search
  (:meth:`~xswinir.texture.TextureSearch.attach_match`); with the loader step it gives the CPU time per step of
  the whole run, which is what a machine whose every core is busy pays.

Goal (issue 20): the texture term costs at most 1.25x a λ = 0 step on the study's model.

Profiles (``--profile``): ``study_cpu`` is the study's configuration (``xswinir/configs/study_cpu.yaml``: SwinIR
x2, embed 32, depths [2, 2], window 8, gt 64, region 128, batch 8) on one torch thread, as each study trial runs;
``swinir-s`` is SwinIR-S x2 at batch 16, LR 64 (region 192), with all threads, and adds (b).

(b) The search for one 16 px patch in a 128 x 128 region (64 x 64 with --quick) at stride 4 (841 windows):
:class:`~xswinir.texture.TextureSearch` (one feature pass, one broadcast classifier call, one batched solve)
against the way the original research code did it: one classifier call per window in a Python loop, then the
least squares by explicit inverse.

The classifier has the real feature set with pair features (as ``xswinir texture train`` makes it); its weights
are fixed synthetic values (the timing does not depend on what it learned), its standardisation is fitted to the
benchmark's own windows. The batches come from ``skimage:train`` through the trainer's data pipeline.

    python -m bench.bench_texture [--profile swinir-s|study_cpu] [--quick] [--rounds N] [--device cuda]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch

from bench.common import measure, parse_args, print_table, sync, write_json
from xswinir.config import Config, TextureConfig, apply_overrides, load_config, read_yaml_mapping, resolve_config_path
from xswinir.data import build_train_batches
from xswinir.images import read_image
from xswinir.sources import resolve_image_files
from xswinir.texture import TextureClassifier, TextureSearch
from xswinir.trainer import build_training_parts, run_step

# Each profile's config: the study's own file, or SwinIR-S on the demo's data and degradations.
_SWINIR_S = ["model.preset=swinir-s-x2", "data.gt_size=128", "train.batch_size=16", "texture.region_size=192"]
_QUICK_SWINIR_S = ["model.preset=swinir-s-x2", "data.gt_size=64", "train.batch_size=2", "texture.region_size=128"]


def make_classifier(patch_size: int, sample: torch.Tensor, pair_features: bool = True) -> TextureClassifier:
    """The real classifier with fixed synthetic weights, standardised on the windows of ``sample``."""
    clf = TextureClassifier(patch_size, pair_features=pair_features)
    num = clf.features.num_features
    with torch.no_grad():
        feats = clf.features.window_features(sample, patch_size, patch_size).flatten(2).transpose(1, 2)
        feats = feats.reshape(-1, feats.shape[-1])[:, :num]  # the named features; a descriptor may follow
        clf.feature_mean.copy_(feats.mean(0))
        clf.feature_std.copy_(feats.std(0).clamp_min(1e-3))
        g = torch.Generator().manual_seed(0)
        clf.weight_diff.copy_(-torch.rand(clf.weight_diff.shape, generator=g))
        clf.weight_prod.copy_(0.1 * torch.randn(clf.weight_prod.shape, generator=g))
        if clf.has_pair_features:
            clf.weight_pair.fill_(1.0)  # agreement speaks for the same texture
        clf.bias.fill_(2.0)
    return clf.requires_grad_(False).eval()


def crops(size: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` random ``size`` crops of the scikit-image training pictures, (count, 3, size, size)."""
    images = [read_image(p) for p in resolve_image_files("skimage:train")]
    images = [im for im in images if min(im.shape[-2:]) >= size]
    out = []
    for i in range(count):
        im = images[i % len(images)]
        top = int(torch.randint(0, im.shape[-2] - size + 1, (1,), generator=generator))
        left = int(torch.randint(0, im.shape[-1] - size + 1, (1,), generator=generator))
        out.append(im[:, top:top + size, left:left + size])
    return torch.stack(out)


def search_per_window(clf: TextureClassifier, patch: torch.Tensor, region: torch.Tensor, stride: int,
                      top_k: int) -> torch.Tensor:
    """The original approach: one classifier call per window, top K by sorting, ``inv(X^T X) X^T y``."""
    p = patch.shape[-1]
    scores, boxes = [], []
    for top in range(0, region.shape[-2] - p + 1, stride):
        for left in range(0, region.shape[-1] - p + 1, stride):
            window = region[:, :, top:top + p, left:left + p]
            scores.append(clf(patch, window).item())
            boxes.append((top, left))
    best = sorted(range(len(scores)), key=lambda i: -scores[i])[:top_k]
    X = torch.stack([region[0, :, t:t + p, u:u + p].flatten() for t, u in (boxes[i] for i in best)], dim=1)
    coefs = torch.inverse(X.T @ X) @ X.T @ patch.flatten()
    return X @ coefs


def profile_config(profile: str, quick: bool) -> Config:
    """The profile's training config with the texture term on (projection, λ 0.1), batches from skimage:train."""
    if profile == "study_cpu":
        study = read_yaml_mapping(resolve_config_path("study_cpu"))
        cfg = load_config(study["base"], list(study["overrides"]))
    else:
        cfg = load_config("demo", _QUICK_SWINIR_S if quick else _SWINIR_S)
    return apply_overrides(cfg, {"data.train": "skimage:train", "data.loader_workers": 0, "data.small_images": "pad",
                                 "loss.texture_weight": 0.1, "loss.texture_form": "projection",
                                 "texture.search_in": "step", "model.drop_path_rate": 0.0})


def interleaved_ratios(fns: dict[str, Callable[[], object]], base: str, rounds: int, device: torch.device
                       ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Seconds of each call per round (one warm-up round first) and each one's ratio to ``base`` in that round."""
    for fn in fns.values():
        fn()
    seconds: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            seconds[name].append(time.perf_counter() - start)
    ratios = {name: [t / b for t, b in zip(values, seconds[base], strict=True)] for name, values in seconds.items()}
    return seconds, ratios


def spread(values: list[float]) -> tuple[float, float, float]:
    """Median and quartiles."""
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q2, q1, q3


def step_rows(cfg: Config, device: torch.device, rounds: int) -> tuple[list[dict], dict[str, object]]:
    """(a): the trainer's step per variant, interleaved; rows and the median ratios."""
    base_cfg = apply_overrides(cfg, {"loss.texture_weight": 0.0})
    plain = {k: v.to(device) for k, v in next(build_train_batches(base_cfg, 0, 1)).items()}
    cpu_batch = next(build_train_batches(cfg, 0, 1))  # what a loader worker searches, on the CPU
    classifier = make_classifier(cfg.texture.patch_size, cpu_batch["region"])
    loader_search = TextureSearch.from_config(cfg.texture, copy.deepcopy(classifier))
    with_match = {k: v.to(device) for k, v in loader_search.attach_match(cpu_batch).items()}
    with_region = {k: v.to(device) for k, v in cpu_batch.items()}
    classifier = classifier.to(device)
    # The loader's match is the step's: the same windows, c* and X c* (checked here on the benchmark's batch).
    in_step = TextureSearch.from_config(cfg.texture, classifier)(
        with_region["gt"], with_region["region"], with_region["gt_offset"], with_region["region_valid"])
    carried = loader_search.match_from_batch(with_match)
    same = {"boxes": torch.equal(carried.boxes, in_step.boxes),
            "max |Δ c*|": float((carried.coefs - in_step.coefs).abs().max()),
            "max |Δ X c*|": float((carried.target - in_step.target).abs().max())}
    print(f"loader's match against the step's on this batch: same windows {same['boxes']}, "
          f"max |Δ c*| {same['max |Δ c*|']:.2g}, max |Δ X c*| {same['max |Δ X c*|']:.2g}")
    step = cfg.train.warmup_steps + 1

    def trainer_step(form: str | None) -> Callable[[], object]:
        variant = base_cfg if form is None else apply_overrides(cfg, {"loss.texture_form": form})
        parts = build_training_parts(variant, device, None if form is None else classifier)
        return lambda batch: run_step(parts, parts.model, variant.train, step, 0, batch)

    fns = {
        "λ=0": (lambda fn=trainer_step(None): fn(plain)),
        "projection, search in the step": (lambda fn=trainer_step("projection"): fn(with_region)),
        "projection, search in the loader": (lambda fn=trainer_step("projection"): fn(with_match)),
        "pull, search in the loader": (lambda fn=trainer_step("pull"): fn(with_match)),
        "gated_pull, search in the loader": (lambda fn=trainer_step("gated_pull"): fn(with_match)),
        "the loader's search of one batch": (lambda: loader_search.attach_match(cpu_batch)),
    }
    seconds, ratios = interleaved_ratios(fns, "λ=0", rounds, device)
    loader, worker = seconds["projection, search in the loader"], seconds["the loader's search of one batch"]
    ratios["projection, loader step + its search (CPU per step)"] = [
        (a + b) / t for a, b, t in zip(loader, worker, seconds["λ=0"], strict=True)]
    shape = (f"SwinIR x{cfg.scale} embed {cfg.model.embed_dim} depths {list(cfg.model.depths)}, "
             f"B={cfg.train.batch_size} gt {cfg.data.gt_size}, region {cfg.texture.region_size}")
    rows = []
    for name, values in ratios.items():
        median, q1, q3 = spread(values)
        ms = statistics.median(seconds[name]) * 1e3 if name in seconds else None
        rows.append({"case": name, "shape": shape, "ms (median)": ms, "ratio to λ=0": median, "q25": q1, "q75": q3})
    return rows, {**{name: spread(values)[0] for name, values in ratios.items()}, "same_match": same}


def search_rows(tex: TextureConfig, classifier: TextureClassifier, size: int, repeat: int,
                device: torch.device) -> tuple[list[dict], float]:
    """(b): one patch in a ``size`` region, batched search against the per-window loop."""
    p = tex.patch_size
    region = crops(size, 1, torch.Generator().manual_seed(0)).to(device)
    c = size // 2 - p // 2
    patch = region[..., c:c + p, c:c + p].contiguous()
    offset = torch.tensor([[c, c]], device=device)
    search = TextureSearch.from_config(tex, classifier.to(device))
    fns = {
        "per-window loop": lambda: search_per_window(classifier, patch, region, tex.stride, tex.top_k),
        "batched": lambda: search(patch, region, offset),
    }
    t = measure(fns, repeat=max(repeat, 5), device=device)  # the batched call is short: more repeats
    n = ((size - p) // tex.stride + 1) ** 2
    rows = [{"case": f"search, {name}", "shape": f"1 patch {p}, region {size}, {n} windows", "ms": 1e3 * t[name],
             "ratio to batched": t[name] / t["batched"]} for name in fns]
    return rows, t["per-window loop"] / t["batched"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", choices=("swinir-s", "study_cpu"), default="swinir-s",
                        help="the model and batch of (a) (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved rounds of (a) (default: 5 with --quick, else 20 for study_cpu, "
                             "8 for swinir-s)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: 1 for study_cpu, as each study trial runs; else all)")


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], "bench/results/bench_texture.json", add_arguments)
    device = torch.device(args.device)
    threads = args.threads or (1 if args.profile == "study_cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = profile_config(args.profile, args.quick)
    rounds = args.rounds or (5 if args.quick else 20 if args.profile == "study_cpu" else 8)

    rows, ratios = step_rows(cfg, device, rounds)
    print_table(rows, f"(a) {args.profile}: training step on {device} ({torch.get_num_threads()} threads), ratio to "
                      f"the λ=0 step of the same round: median and quartiles over {rounds} interleaved rounds")
    extra: dict[str, object] = {}
    if args.profile == "swinir-s":
        size = 64 if args.quick else 128
        classifier = make_classifier(cfg.texture.patch_size, crops(size, 2, torch.Generator().manual_seed(1)))
        b_rows, extra["search_speedup"] = search_rows(cfg.texture, classifier, size, 3 if args.quick else 5, device)
        print_table(b_rows, "(b) batched search against the per-window loop")
        rows += b_rows
    before = ratios["projection, search in the step"]
    after = ratios["projection, search in the loader"]
    print(f"\n{args.profile}: a step with the texture term costs {before:.2f}x a λ=0 step with the search in the step, "
          f"{after:.2f}x with the search in the loader (goal <= 1.25x); with the loader's search counted, "
          f"{ratios['projection, loader step + its search (CPU per step)']:.2f}x the CPU time")
    write_json(args.json, "bench_texture", rows, quick=args.quick, profile=args.profile, rounds=rounds,
               threads=torch.get_num_threads(), step_ratio_search_in_step=before, step_ratio_search_in_loader=after,
               cpu_ratio_loader=ratios["projection, loader step + its search (CPU per step)"],
               loader_match_vs_step=ratios["same_match"], **extra)


if __name__ == "__main__":
    main()
