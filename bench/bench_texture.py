"""Cost of the texture term: (a) in a training step, against a λ = 0 step, (b) batched search against a per-window loop.

(a) The trainer's own step (``xswinir.trainer.run_step``: degradations, forward, loss, backward, Adam, EMA) on one
fixed batch, for each variant below, interleaved round by round in this one process; each variant's time is
divided by the λ = 0 step of the same round, and the table gives the median of those ratios with their spread
(quartiles), so that the load of a shared machine hits both sides of every ratio alike. Times are taken by the
wall clock and by this process's CPU clock, which on a busy machine leaves out the time other processes take.

* ``λ = 0``: the plain SwinIR loss (its batches carry no search region);
* ``search in the step``: the projection term with the search on the training thread (``texture.search_in=step``,
  the path before issue 20, and still the path on a GPU);
* ``search in the loader``: the projection, pull and gated-pull terms with the match found by the data
  pipeline (``texture.search_in=loader``, the default on the CPU): the step only computes the term;
* ``the loader's search``: what a DataLoader worker spends per batch on that search
  (:meth:`~xswinir.texture.TextureSearch.attach_match`); with the loader step it gives the CPU time per step of
  the whole run, which is what a machine whose every core is busy pays.

(c) The loader's search measured where training runs it, inside a DataLoader worker process (one torch thread, by
that process's CPU clock, kernel time included): this search and, with ``--reference DIR``, an earlier
implementation, each in worker processes of its own, in alternating blocks; each must find the same match bit for
bit. DIR holds
copies of ``xswinir/texture/{features,classifier,search}.py`` from an earlier commit (``git show
<commit>:xswinir/texture/search.py > DIR/search.py``, and so on), loaded in place of the installed ones. With the
loader step of (a) they give the CPU per texture step of a whole run relative to a λ = 0 step, before and after.

Goal (issue 20): the texture term costs at most 1.25x a λ = 0 step on the study's model.

Profiles (``--profile``): ``study_cpu`` is the study's configuration (``xswinir/configs/study_cpu.yaml``: SwinIR
x2, embed 32, depths [2, 2], window 8, gt 64, region 128, batch 8) on one torch thread, as each study trial runs;
``swinir-s`` (the default) is SwinIR-S x2 at batch 16, LR 64 (region 192; --quick: batch 2, LR 32, region 128),
with all threads, and adds (b).

(b) The search for one 16 px patch in a 128 x 128 region (64 x 64 with --quick) at stride 4 (841 windows):
:class:`~xswinir.texture.TextureSearch` (one feature pass, one broadcast classifier call, one batched solve)
against the way the original research code did it: one classifier call per window in a Python loop, then the
least squares by explicit inverse.

The classifier has the real feature set with pair features (as ``xswinir texture train`` makes it); its weights
are fixed synthetic values (the timing does not depend on what it learned), its standardisation is fitted to the
benchmark's own windows. The batches come from ``skimage:train`` through the trainer's data pipeline.

    python -m bench.bench_texture [--profile swinir-s|study_cpu] [--quick] [--rounds N] [--threads N] [--device cuda]
        [--reference DIR]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
from torch.utils.data import DataLoader

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


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, device: torch.device
                ) -> dict[str, dict[str, list[float]]]:
    """Seconds of each call per round, by the wall clock and by this process's CPU clock (one warm-up round first).

    The CPU clock counts only what this process computes, not the time other processes of a busy machine take
    from it: with one torch thread it is the step's own work (on a GPU, only the host's share of it).
    """
    for fn in fns.values():
        fn()
    seconds: dict[str, dict[str, list[float]]] = {"wall": {n: [] for n in fns}, "cpu": {n: [] for n in fns}}
    for _ in range(rounds):
        for name, fn in fns.items():
            sync(device)
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            sync(device)
            seconds["wall"][name].append(time.perf_counter() - wall)
            seconds["cpu"][name].append(time.process_time() - cpu)
    return seconds


def spread(values: list[float]) -> tuple[float, float, float]:
    """Median and quartiles."""
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q2, q1, q3


STEP = "projection, search in the step"
LOADER = "projection, search in the loader"
WORKER = "the loader's search of one batch"
TOTAL = "projection, loader step + its search"


def step_rows(cfg: Config, device: torch.device, rounds: int
              ) -> tuple[list[dict], dict[str, object], dict[str, object]]:
    """(a): the trainer's step per variant, interleaved; the rows, the median ratios by clock, and for (c) the
    loader's search, its batch and the median CPU seconds of the λ = 0 and the loader step."""
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
    same = {"same_windows": torch.equal(carried.boxes, in_step.boxes),
            "max_abs_diff_coefs": float((carried.coefs - in_step.coefs).abs().max()),
            "max_abs_diff_target": float((carried.target - in_step.target).abs().max())}
    print(f"the loader's match against the step's on this batch: same windows {same['same_windows']}, "
          f"max |Δ c*| {same['max_abs_diff_coefs']:.2g}, max |Δ X c*| {same['max_abs_diff_target']:.2g}")
    step = cfg.train.warmup_steps + 1

    def trainer_step(form: str | None) -> Callable[[dict[str, torch.Tensor]], object]:
        variant = base_cfg if form is None else apply_overrides(cfg, {"loss.texture_form": form})
        parts = build_training_parts(variant, device, None if form is None else classifier)
        return lambda batch: run_step(parts, parts.model, variant.train, step, 0, batch)

    fns = {
        "λ=0": (lambda fn=trainer_step(None): fn(plain)),
        STEP: (lambda fn=trainer_step("projection"): fn(with_region)),
        LOADER: (lambda fn=trainer_step("projection"): fn(with_match)),
        "pull, search in the loader": (lambda fn=trainer_step("pull"): fn(with_match)),
        "gated_pull, search in the loader": (lambda fn=trainer_step("gated_pull"): fn(with_match)),
        WORKER: (lambda: loader_search.attach_match(cpu_batch)),
    }
    seconds = interleaved(fns, rounds, device)
    rows, medians = [], {}
    for clock in ("wall", "cpu"):
        t = seconds[clock]
        t[TOTAL] = [a + b for a, b in zip(t[LOADER], t[WORKER], strict=True)]  # the CPU per step of a whole run
        ratios = {name: [x / b for x, b in zip(values, t["λ=0"], strict=True)] for name, values in t.items()}
        medians[clock] = {name: spread(values)[0] for name, values in ratios.items()}
        for i, (name, values) in enumerate(ratios.items()):
            if clock == "wall":
                rows.append({"case": name})
            median, q1, q3 = spread(values)
            rows[i].update({f"{clock} ms": 1e3 * statistics.median(t[name]), f"ratio ({clock})": median,
                            f"{clock} q25-q75": f"{q1:.2f}-{q3:.2f}"})
    step_cpu = {name: statistics.median(seconds["cpu"][name]) for name in ("λ=0", LOADER)}
    worker = {"search": loader_search, "batch": cpu_batch, "step_cpu": step_cpu}
    return rows, {"ratios": medians, "loader_match_vs_step": same}, worker


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


_TEXTURE_MODULES = ("features", "classifier", "search")  # in import order: each imports the one before


def load_reference(folder: Path) -> dict[str, ModuleType]:
    """The texture modules of an earlier implementation, from copies of their files in ``folder``.

    Each is loaded under its installed name for the moment of its import, so that the copies import each other
    (``classifier.py``'s ``from xswinir.texture.features import ...``) and not the installed modules; the
    installed ones are back in place afterwards.
    """
    names = [f"xswinir.texture.{name}" for name in _TEXTURE_MODULES]
    saved = {name: sys.modules[name] for name in names if name in sys.modules}
    modules = {}
    try:
        for short, name in zip(_TEXTURE_MODULES, names, strict=True):
            file = folder / f"{short}.py"
            if not file.is_file():
                raise SystemExit(f"--reference {folder}: {file.name} is missing (copy it from an earlier commit)")
            spec = importlib.util.spec_from_file_location(name, file)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
            modules[short] = module
    finally:
        for name in names:
            sys.modules.pop(name, None)
        sys.modules.update(saved)
    return modules


def reference_search(modules: dict[str, ModuleType], tex: TextureConfig, classifier: TextureClassifier) -> object:
    """The earlier implementation's search with the same settings and a classifier with the same weights."""
    old = modules["classifier"].TextureClassifier(classifier.patch_size, pair_features=classifier.has_pair_features)
    old.load_state_dict(classifier.state_dict())
    return modules["search"].TextureSearch.from_config(tex, old.requires_grad_(False).eval())


class _TimedSearches:
    """A DataLoader's collate function: runs the named search on the batch and returns its CPU seconds and match."""

    def __init__(self, searches: dict[str, Callable[[dict], dict]], batch: dict[str, torch.Tensor]) -> None:
        self.searches, self.batch = searches, batch

    def __call__(self, name: str) -> tuple[str, float, dict[str, torch.Tensor]]:
        start = time.process_time()
        match = self.searches[name](dict(self.batch))
        return name, time.process_time() - start, match


def worker_search_rows(searches: dict[str, Callable[[dict], dict]], batch: dict[str, torch.Tensor], rounds: int,
                       step_cpu: dict[str, float]) -> tuple[list[dict], dict[str, object]]:
    """(c): each search of one batch inside DataLoader worker processes, by the worker's CPU clock.

    Args:
        searches: name -> ``attach_match`` of a search; the first is the one the others are compared with.
        batch: a collated training batch with its region.
        rounds: measured calls of each (after one warm-up call of each).
        step_cpu: median CPU seconds of the λ = 0 step and of the loader step, from (a).
    """
    # Each search in worker processes of its own (what one process sets up, e.g. its allocator, stays its own),
    # in blocks that alternate between the searches, so that the machine's load hits them alike.
    blocks = min(rounds, 4)
    seconds: dict[str, list[float]] = {name: [] for name in searches}
    matches: dict[str, dict[str, torch.Tensor]] = {}
    for block in range(blocks):
        calls = rounds // blocks + (block < rounds % blocks)
        for name in searches:
            loader = DataLoader([name] * (calls + 1), batch_size=None, num_workers=1,
                                collate_fn=_TimedSearches(searches, batch))
            for i, (_, cpu, match) in enumerate(loader):
                if i > 0:  # a worker's first call warms up
                    seconds[name].append(cpu)
                matches[name] = match
    first = next(iter(searches))
    rows, summary = [], {}
    for name, values in seconds.items():
        same = all(torch.equal(matches[name][k], matches[first][k]) for k in matches[first])
        search_cpu = statistics.median(values)
        total = (step_cpu[LOADER] + search_cpu) / step_cpu["λ=0"]
        rows.append({"case": f"the loader's search in a worker: {name}", "cpu ms": 1e3 * search_cpu,
                     "q25-q75 ms": "{:.0f}-{:.0f}".format(*(1e3 * v for v in spread(values)[1:])),
                     "ratio to λ=0 step (cpu)": search_cpu / step_cpu["λ=0"],
                     "loader step + search / λ=0 (cpu)": total, f"match = {first}'s": same})
        summary[name] = {"search_cpu_ms": 1e3 * search_cpu, "total_cpu_ratio": total, "same_match": same}
    return rows, summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", choices=("swinir-s", "study_cpu"), default="swinir-s",
                        help="the model and batch of (a) (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved rounds of (a) (default: 5 with --quick, else 20 for study_cpu, "
                             "8 for swinir-s)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: 1 for study_cpu, as each study trial runs; else all)")
    parser.add_argument("--reference", type=Path, default=None,
                        help="a folder with copies of xswinir/texture/{features,classifier,search}.py from an earlier "
                             "commit: (c) measures that search beside this one")


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], "bench/results/bench_texture.json", add_arguments)
    device = torch.device(args.device)
    threads = args.threads or (1 if args.profile == "study_cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = profile_config(args.profile, args.quick)
    rounds = args.rounds or (5 if args.quick else 20 if args.profile == "study_cpu" else 8)

    rows, result, worker = step_rows(cfg, device, rounds)
    shape = (f"SwinIR x{cfg.scale} embed {cfg.model.embed_dim} depths {list(cfg.model.depths)}, batch "
             f"{cfg.train.batch_size}, gt {cfg.data.gt_size}, region {cfg.texture.region_size}")
    print_table(rows, f"(a) {args.profile} ({shape}): training step on {device}, {torch.get_num_threads()} threads; "
                      f"ratio to the λ=0 step of the same round, median and quartiles over {rounds} interleaved "
                      "rounds, by the wall clock and by this process's CPU clock")
    extra: dict[str, object] = {}
    searches = {"this search": worker["search"].attach_match}
    if args.reference is not None:
        old = reference_search(load_reference(args.reference), cfg.texture, worker["search"].classifier)
        searches[f"reference ({args.reference})"] = old.attach_match
    c_rows, extra["worker_search"] = worker_search_rows(searches, worker["batch"], rounds, worker["step_cpu"])
    print_table(c_rows, "(c) the loader's search of one batch inside DataLoader worker processes, median over "
                        f"{rounds} calls in alternating blocks, by the worker's CPU clock; with the loader step of "
                        "(a), the CPU of a whole texture step against a λ=0 step")
    rows += c_rows
    if len(searches) == 2:
        new, ref = extra["worker_search"].values()
        extra["worker_search_speedup"] = ref["search_cpu_ms"] / new["search_cpu_ms"]
        print(f"the loader's search costs {extra['worker_search_speedup']:.2f}x less CPU than the reference's; a whole "
              f"texture step {ref['total_cpu_ratio']:.2f}x -> {new['total_cpu_ratio']:.2f}x the CPU of a λ=0 step")
    if args.profile == "swinir-s":
        size = 64 if args.quick else 128
        classifier = make_classifier(cfg.texture.patch_size, crops(size, 2, torch.Generator().manual_seed(1)))
        b_rows, extra["search_speedup"] = search_rows(cfg.texture, classifier, size, 3 if args.quick else 5, device)
        print_table(b_rows, "(b) batched search against the per-window loop")
        rows += b_rows
    for clock, ratios in result["ratios"].items():
        print(f"{args.profile}, {clock} clock: a step with the texture term costs {ratios[STEP]:.2f}x a λ=0 step "
              f"with the search in the step, {ratios[LOADER]:.2f}x with the search in the loader (goal <= 1.25x); "
              f"with the loader's search counted, {ratios[TOTAL]:.2f}x")
    write_json(args.json, "bench_texture", rows, quick=args.quick, profile=args.profile, shape=shape, rounds=rounds,
               threads=torch.get_num_threads(), **result, **extra)


if __name__ == "__main__":
    main()
