"""Does the trust map tell the truth? Its per-patch estimate against the real error, beside simple baselines.

For each model (``--checkpoint``, with its trust file from ``xswinir trust fit``, or one fitted here on the
training images when ``--trust`` is not given) and each evaluation set (Sun80 and Set5 HR by default; neither is
ever used to fit or choose anything), every image is centre-cropped (``--crop`` HR px), degraded with the x2
``blur-noise`` preset seeded per file name exactly as ``xswinir eval --degradation blur-noise --seed 0`` does
(:func:`xswinir.evaluation.degrade`), restored, and cut into the trust model's patches (16 px of the output).
Each patch has its real error (mean |Y error|, Y on 0-255, 8-bit images) and five scores that should rise with it:

* ``trust``: the trust map's expected error (:mod:`xswinir.trust`; no HR image used);
* ``input_std``: the local standard deviation of the up-sampled input;
* ``output_std``: the local standard deviation of the output;
* ``ensemble_spread``: the mean per-pixel spread of the x8 self-ensemble;
* ``1-r2``: one minus the texture consistency r² (:func:`xswinir.explain.consistency_map`, input as query).

Patches of all images of a set are pooled (per model and set). Reported per score:

* ``spearman``: rank correlation with the real error;
* ``auc_worst10``: ROC AUC of the score for flagging the worst 10 % of patches (error at or above the set's
  90th percentile);
* ``spearman_within``: the mean over images of the within-image rank correlation (information only: it shows
  what a score says about patches of one photo, where per-image signals such as the noise level do not help);

and for ``trust`` the empirical coverage of its bound (share of patches whose error is at or below it) and the
mean expected against the mean measured error. A reliability plot (``--plot``) bins the patches by expected error
(deciles) and draws the mean measured error of each bin against the mean expected one, per model and set.

**Goal, fixed before the first run** (issue 19, item 2): on *both* sets and for *every* model,

1. the trust map's ``auc_worst10`` is at least 0.03 above every baseline's, and
2. its ``spearman`` is above every baseline's, and
3. the empirical coverage of its 90 % bound lies within 2 points of 90 % (0.88 to 0.92).

The closing lines say which of the three held where. ``--quick``: 3 images per set, 64 px crops, a trust model
fitted here on 4 images: a smoke run in seconds (its figures mean nothing).

    python -m bench.bench_trust --checkpoint A --trust A.json --checkpoint B --trust B.json [--crop 256]
        [--max-images 80] [--sets Sun80=../shared/data/Sun80,Set5=../shared/data/Set5/HR] [--plot FILE]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from bench.common import parse_args, print_table, write_json
from xswinir.checkpoint import CLASSIFIER_DIR, CONFIG_FILE, load_model
from xswinir.config import DEGRADATION_PRESETS, TextureConfig, load_config
from xswinir.data import open_images
from xswinir.degradations import build_degrader
from xswinir.evaluation import build_lq_degrader, degrade
from xswinir.texture import TextureSearch, load_texture_classifier, roc_auc
from xswinir.trust import (
    ENSEMBLE_SIGNAL,
    PatchSample,
    TrustModel,
    collect_patches,
    fit_trust,
    load_trust,
    split_images,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
BASELINES = {  # name -> (signal, sign): the score is sign * signal
    "input_std": ("log_input_std", 1.0),
    "output_std": ("log_output_std", 1.0),
    "ensemble_spread": (ENSEMBLE_SIGNAL, 1.0),
    "1-r2": ("consistency_r2", -1.0),
}
WORST_SHARE = 0.10
AUC_MARGIN = 0.03
COVERAGE_TOLERANCE = 0.02


def ranks(x: torch.Tensor) -> torch.Tensor:
    """Average ranks (1..n), ties sharing the mean of their ranks."""
    values, inverse, counts = torch.unique(x.double(), return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    return (ends - (counts.double() - 1) / 2)[inverse]


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation (Pearson on average ranks); NaN when one side is constant."""
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denom if denom > 0 else math.nan


def trust_scores(trust: TrustModel, sample: PatchSample) -> tuple[torch.Tensor, torch.Tensor]:
    """Expected error and bound of every patch of ``sample`` (whose signals include the trust model's)."""
    columns = [sample.names.index(name) for name in trust.signal_names]
    z = trust.log_error(sample.signals[:, columns])
    return (z.exp() * trust.smear - 1).clamp_min(0), ((z + trust.quantile).exp() - 1).clamp_min(0)


def score_rows(scores: dict[str, torch.Tensor], sample: PatchSample) -> list[dict[str, Any]]:
    """Spearman, AUC for the worst 10 % and within-image Spearman of each score against the real error."""
    error = sample.error
    worst = error >= torch.quantile(error.double(), 1 - WORST_SHARE).float()
    rows = []
    for name, score in scores.items():
        within = [spearman(score[sample.image == i], error[sample.image == i]) for i in sample.image.unique().tolist()
                  if int((sample.image == i).sum()) > 2]
        within = [w for w in within if not math.isnan(w)]
        rows.append({"score": name, "spearman": spearman(score, error), "auc_worst10": roc_auc(score, worst),
                     "spearman_within": sum(within) / len(within) if within else math.nan})
    return rows


def goal_checks(rows: list[dict[str, Any]]) -> list[tuple[str, bool]]:
    """The three goals of the docstring for one model and set: (description, met)."""
    by_score = {row["score"]: row for row in rows}
    trust = by_score["trust"]
    baselines = [row for row in rows if row["score"] != "trust"]
    best_auc = max(row["auc_worst10"] for row in baselines)
    best_rho = max(row["spearman"] for row in baselines)
    coverage = trust["coverage"]
    return [
        (f"AUC {trust['auc_worst10']:.3f} >= best baseline {best_auc:.3f} + {AUC_MARGIN}",
         trust["auc_worst10"] >= best_auc + AUC_MARGIN),
        (f"Spearman {trust['spearman']:.3f} > best baseline {best_rho:.3f}", trust["spearman"] > best_rho),
        (f"coverage {coverage:.3f} within {COVERAGE_TOLERANCE} of {trust['target_coverage']:.2f}",
         abs(coverage - trust["target_coverage"]) <= COVERAGE_TOLERANCE + 1e-9),
    ]


def seeded(degrader: torch.nn.Module, seed: int) -> Callable[[torch.Tensor, str], torch.Tensor]:
    """``(gt, file name) -> lq``: the degradation seeded per file name, as ``xswinir eval --degradation`` does."""
    return lambda gt, name: degrade(degrader, gt, name, seed)


def load_set(source: str, limit: int | None) -> list[tuple[str, torch.Tensor]]:
    images = open_images(source)
    count = len(images) if limit is None else min(limit, len(images))
    return [(Path(images.names[i]).name, images.load(i)) for i in range(count)]


def fit_here(model: torch.nn.Module, checkpoint: Path, classifier_path: Path, images: str, args: argparse.Namespace,
             scale: int) -> TrustModel:
    """A trust model fitted on training images, as ``xswinir trust fit`` does (when no ``--trust`` is given)."""
    cfg = load_config(checkpoint / CONFIG_FILE) if (checkpoint / CONFIG_FILE).is_file() else None
    degradation = cfg.degradation if cfg is not None else DEGRADATION_PRESETS["blur-noise"]
    classifier = load_texture_classifier(classifier_path)
    texture = replace(TextureConfig() if cfg is None else cfg.texture, patch_size=classifier.patch_size)
    search = TextureSearch.from_config(texture, classifier)
    limit = 4 if args.quick else args.fit_max_images
    sample = collect_patches(model, search, load_set(images, limit),
                             seeded(build_degrader(degradation, scale), 0), scale=scale,
                             crop=64 if args.quick else args.fit_crop, device=args.device, label="fit")
    fit_ids, cal_ids = split_images(len(sample.image_names), 0.3, 0)
    return fit_trust(sample, fit_ids, cal_ids, search=search, scale=scale)


def reliability_plot(curves: list[dict[str, Any]], path: Path) -> Path:
    """Measured against expected error by decile of the expected error, one panel per model."""
    from matplotlib.figure import Figure

    models = list(dict.fromkeys(c["model"] for c in curves))
    fig = Figure(figsize=(4.2 * len(models), 4.0))
    axes = fig.subplots(1, len(models), squeeze=False)[0]
    for ax, model in zip(axes, models, strict=True):
        top = 0.0
        for curve in (c for c in curves if c["model"] == model):
            ax.plot(curve["expected"], curve["measured"], marker="o", label=f"{curve['set']} (coverage "
                    f"{curve['coverage']:.2f})")
            top = max(top, *curve["expected"], *curve["measured"])
        ax.plot([0, top], [0, top], color="gray", linestyle="--", linewidth=0.8, label="perfectly calibrated")
        ax.set_xlabel("expected error of the patch (mean |Y error|, 0-255)")
        ax.set_ylabel("measured error, mean per decile")
        ax.set_title(model, fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def deciles(expected: torch.Tensor, error: torch.Tensor) -> tuple[list[float], list[float]]:
    order = expected.argsort()
    bins = [chunk for chunk in order.tensor_split(10) if len(chunk)]
    return [float(expected[b].mean()) for b in bins], [float(error[b].mean()) for b in bins]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", action="append", required=True, help="a model (repeatable)")
    parser.add_argument("--trust", action="append", default=None,
                        help="its trust file, one per --checkpoint in order (default: fit one here)")
    parser.add_argument("--name", action="append", default=None, help="a short name per model for the table")
    parser.add_argument("--classifier", default=None,
                        help="texture classifier for trust models fitted here (default: the checkpoint's)")
    parser.add_argument("--sets", default=f"Sun80={DATA / 'Sun80'},Set5={DATA / 'Set5' / 'HR'}",
                        help="NAME=SOURCE,... evaluation sets (default: %(default)s)")
    parser.add_argument("--fit-images", default=f"{DATA / 'T91'};{DATA / 'BSD200'}",
                        help="training images for trust models fitted here (default: %(default)s)")
    parser.add_argument("--fit-max-images", type=int, default=None, help="at most this many fitting images")
    parser.add_argument("--fit-crop", type=int, default=192, help="HR crop of the fitting images (%(default)s)")
    parser.add_argument("--crop", type=int, default=256, help="central HR crop of each test image (%(default)s)")
    parser.add_argument("--max-images", type=int, default=None, help="at most this many images per set")
    parser.add_argument("--degradation", default="blur-noise", help="eval degradation preset (%(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="eval degradation seed (%(default)s)")
    parser.add_argument("--plot", default="bench/results/trust_reliability.png", help="reliability plot PNG")


def main() -> int:
    args = parse_args("the trust map against the real per-patch error, beside simple baselines",
                      "bench/results/bench_trust.json", add_arguments)
    if args.trust is not None and len(args.trust) != len(args.checkpoint):
        raise SystemExit("give one --trust per --checkpoint (or none: fitted here)")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("xswinir.trust").setLevel(logging.INFO)  # the progress lines of long measurements
    names = args.name or [Path(c).name for c in args.checkpoint]
    sets = dict(item.split("=", 1) for item in args.sets.split(","))
    crop, limit = (64, 3) if args.quick else (args.crop or None, args.max_images)
    torch.manual_seed(0)
    results: list[dict[str, Any]] = []
    curves: list[dict[str, Any]] = []
    verdicts: list[tuple[str, str, list[tuple[str, bool]]]] = []
    measured: dict[tuple[str, ...], PatchSample] = {}
    started = time.perf_counter()
    for index, (checkpoint, name) in enumerate(zip(args.checkpoint, names, strict=True)):
        model, model_cfg = load_model(checkpoint)
        model = model.to(args.device).eval()
        scale = model_cfg.upscale
        if args.trust is not None:
            trust = load_trust(args.trust[index])
        else:
            clf_path = Path(args.classifier) if args.classifier else Path(checkpoint) / CLASSIFIER_DIR
            trust = fit_here(model, Path(checkpoint), clf_path, args.fit_images, args, scale)
        search = trust.load_search()
        degrader = build_lq_degrader(args.degradation, scale)
        for set_name, source in sets.items():
            t0 = time.perf_counter()
            # One model measured twice with the same search (two trust files of it) gives the same patches.
            key = (str(checkpoint), set_name, json.dumps(trust.search, sort_keys=True), trust.classifier["safetensors"])
            if key not in measured:
                with torch.no_grad():
                    measured[key] = collect_patches(model, search, load_set(source, limit), seeded(degrader, args.seed),
                                                    scale=scale, crop=crop, self_ensemble=True, device=args.device,
                                                    label=f"{name} {set_name}")
            sample = measured[key]
            expected, bound = trust_scores(trust, sample)
            scores = {"trust": expected}
            scores.update({b: sign * sample.column(signal) for b, (signal, sign) in BASELINES.items()})
            rows = score_rows(scores, sample)
            coverage = float((sample.error <= bound).float().mean())
            for row in rows:
                row.update({"model": name, "set": set_name, "images": len(sample.image_names),
                            "patches": len(sample.error)})
                if row["score"] == "trust":
                    row.update({"coverage": coverage, "target_coverage": trust.coverage,
                                "mean_expected": float(expected.mean()), "mean_error": float(sample.error.mean())})
            results.extend(rows)
            verdicts.append((name, set_name, goal_checks(rows)))
            xs, ys = deciles(expected, sample.error)
            curves.append({"model": name, "set": set_name, "expected": xs, "measured": ys, "coverage": coverage})
            print(f"{name} / {set_name}: {len(sample.image_names)} images, {len(sample.error)} patches, "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)

    columns = ("model", "set", "score", "spearman", "auc_worst10", "spearman_within", "coverage", "images", "patches")
    print_table([{c: row.get(c, "") for c in columns} for row in results],
                f"trust map vs baselines: per-patch error, x{scale} {args.degradation} (seed {args.seed}), "
                f"{crop or 'whole'} px crops")
    all_met = True
    for name, set_name, checks in verdicts:
        for text, met in checks:
            all_met &= met
            print(f"{name} / {set_name}: {'met   ' if met else 'MISSED'} {text}")
    print(f"goal {'met' if all_met else 'not met'} on every model and set; {time.perf_counter() - started:.0f} s")
    plot = reliability_plot(curves, Path(args.plot))
    print(f"wrote {plot}")
    write_json(args.json, "bench_trust", results, curves=curves, goal_met=all_met,
               goals=[{"model": n, "set": s, "checks": [{"text": t, "met": m} for t, m in c]} for n, s, c in verdicts],
               settings={"crop": crop, "max_images": limit, "degradation": args.degradation, "seed": args.seed,
                         "checkpoints": args.checkpoint, "trust": args.trust, "quick": args.quick})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
