"""Which windows explain a tile: the texture classifier against random and correlation-chosen windows.

On held-out images (Set5 HR and BSD200, which the classifier never saw: it is trained on T91 here), crops of
``gt_size`` px are cut inside a ``region_size`` search region and degraded with ``blur-noise`` (seeded). For
every 16 px tile the search picks K windows of the region (no overlap with the tile) by

* ``classifier``: the trained linear texture classifier, min_score as configured (tiles may get fewer than K);
* ``classifier-rank``: the same classifier's K best, no score cut (K windows like the baselines);
* ``random``: K random allowed windows;
* ``correlation``: the K windows with the largest |normalised cross-correlation| with the query tile (the
  strongest simple baseline: it ranks by exactly what the least-squares fit rewards);

each with the query taken from ``gt`` (what the loss uses in training) and from the degraded input up-sampled to
the HR grid (``lq``: what a user has). Reported per method (mean over crops, 95 % CI over crops):

* ``fit_err``: mean ``|X c* - gt|`` on the tiles (c* fits gt; the tile's mean is its own);
* ``r2``: share of the tile's structure explained;
* ``err_share``: ``||P_X e||^2 / ||e||^2`` for ``e = bicubic(lq) - gt``, the share of the restoration error that
  the projection term sees;
* ``pull_helps``: share of tiles where ``X c*`` is closer to gt than bicubic(lq) (only there can the ``pull``
  form move an output towards gt; a gradient step on the projection term reduces ``|sr - gt|`` on every tile).

The bicubic error and the flat per-tile mean are printed as references. Needs ``../shared/data`` (or
``--data``).

    python -m bench.bench_selection [--quick] [--crops 96] [--set texture.classifier.layout_grid=8]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.common import print_table, write_json
from xswinir.config import DEGRADATION_PRESETS, Config, apply_overrides
from xswinir.data import open_images
from xswinir.degradations import build_degrader
from xswinir.losses import _centre, _tiles, project_onto_windows, texture_search, upsample_query
from xswinir.texture import train_texture_classifier
from xswinir.texture.training import load_training_images, run_degradation


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
    """|normalised cross-correlation| of the luma of the query tile and each window."""

    def __init__(self, patch_size: int) -> None:
        self.patch_size = patch_size
        self.features = _PixelFeatures()

    def pair_logits(self, fa: torch.Tensor, fb: torch.Tensor) -> torch.Tensor:
        # (B, T, 1, F) x (B, 1, N, F) -> (B, T, N) as one matrix product
        return (fa.squeeze(-2) @ fb.squeeze(-3).transpose(-1, -2)).abs() * 10


def held_out_crops(sources: list[str], count: int, gt_size: int, region_size: int, scale: int,
                   seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``count`` (region, gt, lq) triples from the images of ``sources``, crops and degradations seeded."""
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
    region = torch.stack(regions)
    o = (region_size - gt_size) // 2
    gt = region[:, :, o:o + gt_size, o:o + gt_size]
    degrader = build_degrader(DEGRADATION_PRESETS["blur-noise"], scale)
    lq, _ = degrader(gt, torch.Generator().manual_seed(seed + 1))
    return region, gt, lq


def _ci(values: torch.Tensor) -> tuple[float, float]:
    values = values.double()
    n = len(values)
    half = 1.96 * float(values.std()) / math.sqrt(n) if n > 1 else float("nan")
    return float(values.mean()), half


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--crops", type=int, default=96)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default="bench/results/selection.json")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="classifier and search overrides, e.g. texture.classifier.layout_grid=8")
    args = parser.parse_args()
    torch.manual_seed(0)
    data = Path(args.data)
    crops = 16 if args.quick else args.crops
    cfg = apply_overrides(Config(), [f"texture.classifier.num_pairs={2048 if args.quick else 8192}",
                                     *args.overrides])
    tex = cfg.texture
    p, scale, gt_size, region_size = tex.patch_size, 2, 64, tex.region_size

    train_images = load_training_images(str(data / "T91"), 64)
    clf, report = train_texture_classifier(train_images, p, tex.classifier, progress=False, max_iou=tex.max_iou,
                                           degrade=run_degradation(cfg))
    print(f"classifier (T91): held-out-image ROC AUC {report['roc_auc']:.3f} (HR queries), "
          f"{report['roc_auc_lq']:.3f} (LQ queries)")

    region, gt, lq = held_out_crops([str(data / "Set5" / "HR"), str(data / "BSD200")], crops, gt_size,
                                    region_size, scale, seed=0)
    offset = torch.full((crops, 2), (region_size - gt_size) // 2, dtype=torch.long)
    lq_up = upsample_query(lq, gt.shape[-2:])
    error = lq_up - gt
    tiles_gt = _tiles(gt, p)
    bicubic_err = _tiles(error.abs(), p).mean(-1)  # (B, T)
    flat_err = (_centre(tiles_gt, 3)).abs().mean(-1)

    methods = {
        "classifier": (clf, tex.min_score),
        "classifier-rank": (clf, 0.0),
        "random": (RandomScorer(p, seed=0), 0.0),
        "correlation": (CorrelationScorer(p), 0.0),
    }
    rows, per_crop = [], {}
    for name, (scorer, min_score) in methods.items():
        for query_name, query in (("gt", None), ("lq", lq_up)):
            fit_err, r2, share, helps, used = [], [], [], [], []
            for i in range(0, crops, 16):
                sl = slice(i, i + 16)
                match = texture_search(scorer, gt[sl], region[sl], offset[sl], query=None if query is None else
                                       query[sl], stride=tex.stride, top_k=tex.top_k, min_score=min_score,
                                       max_iou=tex.max_iou, ridge=tex.ridge)
                tile_err = _tiles((match.target - gt[sl]).abs(), p).mean(-1)  # (b, T)
                ok = match.valid.any(-1)
                # Tiles without a window are fitted by their flat mean: what X c* then is.
                tile_err = torch.where(ok, tile_err, flat_err[sl])
                fit_err.append(tile_err.mean(-1))
                r2.append(match.tile_r2.mean(-1))
                projected = project_onto_windows(match, error[sl])
                e = _centre(_tiles(error[sl], p), 3)
                share.append(projected.square().sum((-1, -2)) / e.square().sum((-1, -2)).clamp_min(1e-12))
                helps.append((tile_err < bicubic_err[sl]).float().mean(-1))
                used.append(ok.float().mean(-1))
            values = {k: torch.cat(v) for k, v in
                      {"fit_err": fit_err, "r2": r2, "err_share": share, "pull_helps": helps, "used": used}.items()}
            per_crop[(name, query_name)] = values
            row = {"method": name, "query": query_name}
            for key, v in values.items():
                mean, half = _ci(v)
                row[key] = mean
                if key in ("fit_err", "err_share"):
                    row[f"{key}_ci95"] = half
            rows.append(row)
    random_gt = per_crop[("random", "gt")]["fit_err"]
    for row in rows:
        mine = per_crop[(row["method"], row["query"])]["fit_err"]
        row["vs_random"] = float(1 - mine.mean() / random_gt.mean())  # share of random's fit error removed
    references = {"bicubic_err": float(bicubic_err.mean()), "flat_mean_err": float(flat_err.mean())}
    print_table(rows, f"window selection on {crops} held-out crops (Set5 + BSD200), p={p}, K={tex.top_k}, "
                      f"region {region_size}, blur-noise x{scale}")
    print(f"references: |bicubic(lq) - gt| {references['bicubic_err']:.4f}, flat tile mean "
          f"{references['flat_mean_err']:.4f}")
    write_json(args.json, "bench_selection", rows, references=references, classifier_report=report,
               crops=crops, overrides=args.overrides)


if __name__ == "__main__":
    main()
