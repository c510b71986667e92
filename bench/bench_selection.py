"""Which windows explain a patch: the texture classifier against random and correlation-chosen windows.

The classifier is fitted on T91 only (``--train``); everything it is evaluated on is held out from that fit, and
the evaluation images were fixed before any run (Sun80 is never used here).

**Fit error.** On held-out photographs (Set5 HR and BSD200), crops of ``gt_size`` px are cut inside a
``region_size`` search region and degraded with ``blur-noise`` (seeded). For every 16 px patch the search picks K
windows of the region (no overlap with the patch) by

* ``classifier``: the trained linear texture classifier, min_score as configured (patches may get fewer than K);
* ``classifier-rank``: the same classifier's K best, no score cut (K windows like the baselines);
* ``random``: K random allowed windows;
* ``correlation``: the K windows with the largest |normalised cross-correlation| with the query patch (the
  strongest simple baseline: it ranks by exactly what the least-squares fit rewards);

each with the query taken from ``gt`` (what the loss uses in training) and from the degraded input up-sampled to
the HR grid (``lq``: what a user has). Reported per method (mean over crops, 95 % CI over crops):

* ``fit_err``: mean ``|X c* - gt|`` on the patches (c* fits gt; the patch's mean is its own);
* ``r2``: share of the patch's structure explained;
* ``err_share``: ``||P_X e||^2 / ||e||^2`` for ``e = bicubic(lq) - gt``, the share of the restoration error that
  the projection term sees;
* ``pull_helps``: share of patches where ``X c*`` is closer to gt than bicubic(lq);
* ``used``: share of patches with at least one window.

**Stochastic textures.** Patches of textures without repeated structure: 128 px regions of the scikit-image
texture images ``brick``, ``grass`` and ``gravel`` (seeded positions) and textured regions of held-out photographs
(fur, grass, gravel, soil, lichen in BSD200; the cat's fur of scikit-image's ``chelsea``; boxes in
``PHOTO_TEXTURE_REGIONS``, chosen by eye before any classifier ran on them). Every patch of the region's central
``gt_size`` crop counts. Reported: the share of patches that get at least one partner (``partnered``), how many of
the K windows pass ``min_score`` per patch (``windows``), and the
honest r² and fit error of those textures (low: windows of a stochastic texture share its statistics, not its
pixels).

**Goals** (issue 19): at least 30 % less fit error than random windows, no worse than correlation-chosen windows
(``classifier``, both queries), and at least 90 % of stochastic-texture patches partnered (both queries). Writes
``--json`` and a Markdown copy of the tables beside it. Needs ``../shared/data`` (or ``--data``).

    python -m bench.bench_selection [--quick] [--crops 96] [--set texture.classifier.num_pairs=16384]
"""

from __future__ import annotations

import argparse
import io
import math
from contextlib import redirect_stdout
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.common import print_table, write_json
from xswinir.config import DEGRADATION_PRESETS, Config, apply_overrides
from xswinir.data import open_images
from xswinir.degradations import build_degrader
from xswinir.losses import project_onto_windows
from xswinir.texture import TextureSearch, train_texture_classifier
from xswinir.texture.search import centre_patches, to_patches, upsample_query
from xswinir.texture.training import load_training_images, run_degradation

SCALE = 2
GT_SIZE = 64
BATCH = 16  # crops per search call
GOAL_VS_RANDOM = 0.30  # at least this share of random windows' fit error removed
GOAL_PARTNERED = 0.90  # at least this share of stochastic-texture patches with a partner
TEXTURE_IMAGES = ("brick", "grass", "gravel")  # scikit-image's texture images (not in the T91 fit)
TEXTURE_REGIONS_PER_IMAGE = 8
STOCHASTIC_REGION = 128  # the boxes below are this big
# (source, top, left, what): 128 px regions inside stochastic texture, held out from the fit.
PHOTO_TEXTURE_REGIONS = (
    ("BSD200/100080.png", 272, 80, "bear fur and grass"),
    ("BSD200/105053.png", 192, 0, "grass"),
    ("BSD200/134008.png", 0, 0, "dry ground"),
    ("BSD200/134008.png", 192, 320, "dry ground and grass"),
    ("BSD200/28096.png", 160, 256, "grass"),
    ("BSD200/183087.png", 192, 64, "polar bear fur"),
    ("BSD200/202012.png", 192, 352, "ploughed soil"),
    ("BSD200/87065.png", 192, 0, "gravel"),
    ("BSD200/87065.png", 192, 320, "gravel"),
    ("BSD200/106020.png", 193, 0, "shells and gravel"),
    ("BSD200/8143.png", 0, 353, "dry grass"),
    ("BSD200/41004.png", 193, 0, "dry grass"),
    ("BSD200/35091.png", 193, 0, "lichen on rock"),
    ("skimage:chelsea", 0, 190, "cat fur, forehead"),
    ("skimage:chelsea", 160, 20, "cat fur, cheek"),
)


MARKDOWN_INTRO = """Written by `python -m bench.bench_selection` (the JSON beside it has every figure, the classifier's
report and weights). The classifier is fitted on T91; the crops (Set5 HR, BSD200) and the stochastic-texture
regions (scikit-image's brick, grass and gravel; the boxes of `PHOTO_TEXTURE_REGIONS` in BSD200 and chelsea) are
held out from that fit and were fixed before the first run. `fit_err`: mean |X c* - gt| per patch; `partnered`:
share of patches with at least one window scoring at least `texture.min_score`; `windows`: how many of the K
windows per patch do (mean).
"""


class _RandomFeatures:
    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def window_features(self, images: torch.Tensor, patch_size: int, stride: int) -> torch.Tensor:
        B, _, H, W = images.shape
        nh, nw = (H - patch_size) // stride + 1, (W - patch_size) // stride + 1
        return torch.rand(B, 1, nh, nw, generator=self.generator)


class RandomScorer:
    """Scores every window by a random number: K random allowed windows."""

    def __init__(self, patch_size: int, seed: int) -> None:
        self.patch_size = patch_size
        self.features = _RandomFeatures(torch.Generator().manual_seed(seed))

    def pair_logits(self, fa: torch.Tensor, fb: torch.Tensor) -> torch.Tensor:
        return (fb[..., 0] + 0 * fa[..., 0]) * 10 - 5


class _PixelFeatures:
    def window_features(self, images: torch.Tensor, patch_size: int, stride: int) -> torch.Tensor:
        luma = images.mean(1, keepdim=True)
        B, _, H, W = luma.shape
        nh, nw = (H - patch_size) // stride + 1, (W - patch_size) // stride + 1
        x = F.unfold(luma, patch_size, stride=stride)  # (B, p*p, nh*nw)
        x = x - x.mean(1, keepdim=True)
        x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-6)
        return x.reshape(B, -1, nh, nw)


class CorrelationScorer:
    """|normalised cross-correlation| of the luma of the query patch and each window."""

    def __init__(self, patch_size: int) -> None:
        self.patch_size = patch_size
        self.features = _PixelFeatures()

    def pair_logits(self, fa: torch.Tensor, fb: torch.Tensor) -> torch.Tensor:
        # (B, T, 1, F) x (B, 1, N, F) -> (B, T, N) as one matrix product
        return (fa.squeeze(-2) @ fb.squeeze(-3).transpose(-1, -2)).abs() * 10


def _degrade(gt: torch.Tensor, seed: int) -> torch.Tensor:
    """``gt`` (B, 3, h, w) degraded with seeded ``blur-noise`` x2 and up-sampled back: the ``lq`` query."""
    degrader = build_degrader(DEGRADATION_PRESETS["blur-noise"], SCALE)
    lq, _ = degrader(gt, torch.Generator().manual_seed(seed))
    return upsample_query(lq, gt.shape[-2:])


def _centre_crop(region: torch.Tensor) -> torch.Tensor:
    o = (region.shape[-1] - GT_SIZE) // 2
    return region[..., o:o + GT_SIZE, o:o + GT_SIZE]


def held_out_crops(sources: list[str], count: int, region_size: int, seed: int) -> torch.Tensor:
    """``count`` seeded ``region_size`` regions (count, 3, R, R) from the images of ``sources``, in turn."""
    images = []
    for source in sources:
        listed = open_images(source)
        images += [img for img in map(listed.load, range(len(listed))) if min(img.shape[-2:]) >= region_size]
    g = torch.Generator().manual_seed(seed)
    regions = []
    for n in range(count):
        img = images[n % len(images)]
        top = int(torch.randint(0, img.shape[-2] - region_size + 1, (1,), generator=g))
        left = int(torch.randint(0, img.shape[-1] - region_size + 1, (1,), generator=g))
        regions.append(img[:, top:top + region_size, left:left + region_size])
    return torch.stack(regions)


def stochastic_regions(data: Path, seed: int) -> tuple[torch.Tensor, list[str]]:
    """The stochastic-texture regions (N, 3, 128, 128) and the group of each (``skimage`` or ``photos``)."""
    regions = held_out_crops([f"skimage:{name}" for name in TEXTURE_IMAGES],
                             TEXTURE_REGIONS_PER_IMAGE * len(TEXTURE_IMAGES), STOCHASTIC_REGION, seed)
    groups = ["skimage textures"] * len(regions)
    photos = []
    for source, top, left, _ in PHOTO_TEXTURE_REGIONS:
        image = open_images(source if source.startswith("skimage:") else str(data / source), channels=3).load(0)
        photos.append(image[:, top:top + STOCHASTIC_REGION, left:left + STOCHASTIC_REGION])
    return torch.cat([regions, torch.stack(photos)]), groups + ["photo textures"] * len(photos)


def _ci(values: torch.Tensor) -> tuple[float, float]:
    values = values.double()
    n = len(values)
    half = 1.96 * float(values.std()) / math.sqrt(n) if n > 1 else float("nan")
    return float(values.mean()), half


def evaluate(search: TextureSearch, region: torch.Tensor, query: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Per-crop means (N,) of fit error, r², error share, pull-helps and windows used; per patch (N * T,) whether
    it has a partner and how many windows it got."""
    p = search.patch_size
    offset = torch.full((len(region), 2), (region.shape[-1] - GT_SIZE) // 2, dtype=torch.long)
    gt = _centre_crop(region)
    lq_up = _degrade(gt, seed=1)
    error = lq_up - gt
    out: dict[str, list[torch.Tensor]] = {k: [] for k in ("fit_err", "r2", "err_share", "pull_helps", "used",
                                                         "partnered", "windows")}
    for i in range(0, len(region), BATCH):
        sl = slice(i, i + BATCH)
        q = None if query is None else query[sl]
        match = search(gt[sl], region[sl], offset[sl], query=q)
        patch_err = to_patches((match.target - gt[sl]).abs(), p).mean(-1)  # (b, T)
        flat_err = centre_patches(to_patches(gt[sl], p), 3).abs().mean(-1)
        ok = match.valid.any(-1)
        patch_err = torch.where(ok, patch_err, flat_err)  # without a window X c* is the patch's mean
        bicubic_err = to_patches(error[sl].abs(), p).mean(-1)
        e = centre_patches(to_patches(error[sl], p), 3)
        projected = project_onto_windows(match, error[sl])
        out["fit_err"].append(patch_err.mean(-1))
        out["r2"].append(match.tile_r2.mean(-1))
        out["err_share"].append(projected.square().sum((-1, -2)) / e.square().sum((-1, -2)).clamp_min(1e-12))
        out["pull_helps"].append((patch_err < bicubic_err).float().mean(-1))
        out["used"].append(ok.float().mean(-1))
        out["partnered"].append(ok.flatten())
        out["windows"].append(match.valid.sum(-1).flatten().float())
    return {k: torch.cat(v) for k, v in out.items()}


def _markdown(rows: list[dict], title: str) -> str:
    columns = list(rows[0])
    lines = [f"### {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [f"{v:.4g}" if isinstance(v, float) else str(v) for v in (row.get(c) for c in columns)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--train", default="T91", help="the images the classifier is fitted on, under --data")
    parser.add_argument("--crops", type=int, default=96)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default="docs/selection/selection.json")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="classifier and search overrides, e.g. texture.classifier.num_pairs=16384")
    args = parser.parse_args()
    torch.manual_seed(0)
    data = Path(args.data)
    crops = 16 if args.quick else args.crops
    cfg = apply_overrides(Config(), [f"texture.classifier.num_pairs={2048 if args.quick else 8192}",
                                     *args.overrides])
    tex = cfg.texture
    p, region_size = tex.patch_size, tex.region_size or STOCHASTIC_REGION

    train_images = load_training_images(str(data / args.train), 64)
    clf, report = train_texture_classifier(train_images, p, tex.classifier, progress=False, max_iou=tex.max_iou,
                                           degrade=run_degradation(cfg))
    texture_auc = report.get("roc_auc_texture")
    print(f"classifier ({args.train}): held-out-image ROC AUC {report['roc_auc']:.3f} (HR queries), "
          f"{report['roc_auc_lq']:.3f} (LQ queries), {texture_auc if texture_auc is None else round(texture_auc, 3)} "
          f"(same-texture-region positives)")

    def search_with(scorer: object, min_score: float) -> TextureSearch:
        return TextureSearch(scorer, stride=tex.stride, top_k=tex.top_k, min_score=min_score, max_iou=tex.max_iou,
                             ridge=tex.ridge, query="gt", region_size=region_size)

    methods = {
        "classifier": search_with(clf, tex.min_score),
        "classifier-rank": search_with(clf, 0.0),
        "random": search_with(RandomScorer(p, seed=0), 0.0),
        "correlation": search_with(CorrelationScorer(p), 0.0),
    }
    region = held_out_crops([str(data / "Set5" / "HR"), str(data / "BSD200")], crops, region_size, seed=0)
    lq_up = _degrade(_centre_crop(region), seed=1)
    rows, per_crop = [], {}
    for name, search in methods.items():
        for query_name, query in (("gt", None), ("lq", lq_up)):
            values = evaluate(search, region, query)
            values.pop("partnered")
            values.pop("windows")
            per_crop[(name, query_name)] = values
            row = {"method": name, "query": query_name}
            for key, v in values.items():
                mean, half = _ci(v)
                row[key] = mean
                if key in ("fit_err", "err_share"):
                    row[f"{key}_ci95"] = half
            rows.append(row)
    for row in rows:
        mine = per_crop[(row["method"], row["query"])]["fit_err"]
        random_err = per_crop[("random", row["query"])]["fit_err"]
        row["vs_random"] = float(1 - mine.mean() / random_err.mean())  # share of random's fit error removed

    stochastic, groups = stochastic_regions(data, seed=0)
    stochastic_lq = _degrade(_centre_crop(stochastic), seed=1)
    texture_rows = []
    for query_name, query in (("gt", None), ("lq", stochastic_lq)):
        values = evaluate(methods["classifier"], stochastic, query)
        per_patch_group = [g for g in groups for _ in range((GT_SIZE // p) ** 2)]
        for group in ("all", "skimage textures", "photo textures"):
            crop_sel = torch.tensor([group in ("all", g) for g in groups])
            patch_sel = torch.tensor([group in ("all", g) for g in per_patch_group])
            texture_rows.append({"query": query_name, "textures": group, "patches": int(patch_sel.sum()),
                                 "partnered": float(values["partnered"][patch_sel].float().mean()),
                                 "windows": float(values["windows"][patch_sel].mean()),
                                 "r2": float(values["r2"][crop_sel].mean()),
                                 "fit_err": float(values["fit_err"][crop_sel].mean())})

    def row_of(method: str, query: str) -> dict:
        return next(r for r in rows if r["method"] == method and r["query"] == query)

    goals = []
    for query in ("gt", "lq"):
        mine, corr = row_of("classifier", query), row_of("correlation", query)
        partnered = next(r for r in texture_rows if r["query"] == query and r["textures"] == "all")["partnered"]
        goals += [
            {"goal": f"fit error vs random ({query})", "target": f">= {GOAL_VS_RANDOM:.0%} less",
             "value": f"{mine['vs_random']:.1%} less", "met": mine["vs_random"] >= GOAL_VS_RANDOM},
            {"goal": f"fit error vs correlation ({query})", "target": "no worse",
             "value": f"{mine['fit_err']:.4f} vs {corr['fit_err']:.4f}", "met": mine["fit_err"] <= corr["fit_err"]},
            {"goal": f"stochastic patches partnered ({query})", "target": f">= {GOAL_PARTNERED:.0%}",
             "value": f"{partnered:.1%}", "met": partnered >= GOAL_PARTNERED},
        ]

    references = {"bicubic_err": float(to_patches((lq_up - _centre_crop(region)).abs(), p).mean()),
                  "flat_mean_err": float(centre_patches(to_patches(_centre_crop(region), p), 3).abs().mean())}
    titles = [f"window selection on {crops} held-out crops (Set5 + BSD200), p={p}, K={tex.top_k}, "
              f"region {region_size}, blur-noise x{SCALE}, classifier fitted on {args.train}",
              f"stochastic textures: {len(stochastic)} regions ({len(TEXTURE_IMAGES) * TEXTURE_REGIONS_PER_IMAGE} of "
              f"scikit-image's {', '.join(TEXTURE_IMAGES)}; {len(PHOTO_TEXTURE_REGIONS)} of held-out photos), "
              f"classifier with min_score {tex.min_score}",
              "goals (issue 19)"]
    printed = io.StringIO()
    with redirect_stdout(printed):
        for table, title in zip((rows, texture_rows, goals), titles, strict=True):
            print_table(table, title)
        print(f"references: |bicubic(lq) - gt| {references['bicubic_err']:.4f}, flat patch mean "
              f"{references['flat_mean_err']:.4f}")
    print(printed.getvalue(), end="")
    json_path = Path(args.json)
    write_json(json_path, "bench_selection", rows, stochastic=texture_rows, goals=goals, references=references,
               classifier_report=report, weights=dict(clf.weight_table()), crops=crops,
               photo_texture_regions=[list(r) for r in PHOTO_TEXTURE_REGIONS], overrides=args.overrides)
    markdown = "\n".join(_markdown(table, title) for table, title in zip((rows, texture_rows, goals), titles,
                                                                          strict=True))
    json_path.with_suffix(".md").write_text(f"# bench_selection\n\n{MARKDOWN_INTRO}\n{markdown}")


if __name__ == "__main__":
    main()
