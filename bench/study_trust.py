"""The trust map as a no-reference figure per study arm: does it see the difference the texture term makes?

For every finished trial of a study (``<study>/train/<arm>_s<seed>/``, its newest checkpoint), a trust model is
fitted on training images exactly as :mod:`bench.bench_trust` fits one (its own classifier, its own training
degradation, fitting and calibration images split 70/30), then every image of each evaluation set is
centre-cropped, degraded with the study's evaluation preset seeded per file name (``xswinir eval --degradation
... --seed ...``), restored and measured. Per trial and set it reports:

* ``mean_expected``: the trust map's mean expected error per 16 px patch (Y, 0-255): no HR image used;
* ``mean_error``: the measured mean error of the same patches (the HR image used), to judge the first;
* ``coverage``: the share of patches under the 90 % bound.

and per non-baseline arm the paired difference to the baseline (same seed) of both means, with the 95 % t
interval over seeds (:func:`xswinir.tune.study.paired_difference`). A trust map that is useful as a
no-reference figure moves with the measured error: same sign, similar size. Issue 20, item 4: this is a
secondary figure of the texture study; it decides nothing.

    python -m bench.study_trust --study outputs/studies/study_confirm [--study outputs/studies/study_confirm_more]
        [--sets Sun80=../shared/data/Sun80] [--seed 1] [--crop 192] [--fit-max-images 60] [--baseline lambda0]

A trial takes minutes (a trust model fitted, every image restored): each finished trial's rows are appended to
``<json>.trials.jsonl`` at once, keyed by its checkpoint and the settings, and a later run with the same settings
reuses them, so an interrupted run, or one repeated after more seeds finished, measures only what is new.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import torch

from bench.bench_trust import DATA, fit_here, load_set, seeded, trust_scores
from bench.common import parse_args, print_table, write_json
from xswinir.checkpoint import load_model
from xswinir.evaluation import build_lq_degrader
from xswinir.runs import list_checkpoints
from xswinir.trust import collect_patches
from xswinir.tune.study import EVAL_FILE, paired_difference


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--study", action="append", required=True,
                        help="a study folder (<storage>/<name>); repeatable: the trials of all are pooled")
    parser.add_argument("--baseline", default="lambda0", help="the arm the others are compared with (%(default)s)")
    parser.add_argument("--sets", default=f"Sun80={DATA / 'Sun80'}",
                        help="NAME=SOURCE,... evaluation sets (default: %(default)s)")
    parser.add_argument("--classifier", default=None,
                        help="texture classifier for every trial's trust model (default: the study's cached one)")
    parser.add_argument("--fit-images", default=f"{DATA / 'T91'};{DATA / 'BSD200'}",
                        help="training images the trust models are fitted on (default: %(default)s)")
    parser.add_argument("--fit-max-images", type=int, default=60, help="at most this many fitting images")
    parser.add_argument("--fit-crop", type=int, default=192, help="HR crop of the fitting images (%(default)s)")
    parser.add_argument("--crop", type=int, default=192, help="central HR crop of each test image (%(default)s)")
    parser.add_argument("--max-images", type=int, default=None, help="at most this many images per set")
    parser.add_argument("--degradation", default="blur-noise", help="eval degradation preset (%(default)s)")
    parser.add_argument("--seed", type=int, default=1, help="eval degradation seed (%(default)s: study_confirm's)")


def study_classifier(study: Path) -> Path:
    """The texture classifier the study's trials shared (its cache holds one per classifier config)."""
    cached = sorted(p.parent for p in (study / "classifiers").glob("*/classifier.json"))
    if len(cached) != 1:
        raise SystemExit(f"{study}: expected one cached texture classifier, found {len(cached)}; give --classifier")
    return cached[0]


def finished_trials(study: Path) -> list[tuple[str, int, str]]:
    """``(arm, seed, newest checkpoint)`` of every trial of ``study`` that wrote its evaluation rows."""
    trials = []
    for run in sorted((study / "train").glob("*_s*")):
        rows_file = run / EVAL_FILE
        checkpoints = list_checkpoints(str(run), pafs.LocalFileSystem())
        if not rows_file.is_file() or not checkpoints:
            continue  # unfinished: a study reports only what finished
        rows = json.loads(rows_file.read_text())
        trials.append((rows[0]["arm"], int(rows[0]["seed"]), checkpoints[-1]))
    return trials


def measure_trial(checkpoint: str, classifier: Path, sets: dict[str, str],
                  args: argparse.Namespace) -> list[dict[str, Any]]:
    """Fits the trial's trust model, then its mean expected error, mean real error and coverage per set.

    Every trial uses the same ``classifier`` (the study's), so that the λ = 0 models, which train without one, are
    measured with the same texture signals as the texture arms.
    """
    model, model_cfg = load_model(checkpoint)
    model = model.to(args.device).eval()
    scale = model_cfg.upscale
    trust = fit_here(model, Path(checkpoint), classifier, args.fit_images, args, scale)
    search = trust.load_search()
    degrader = build_lq_degrader(args.degradation, scale)
    crop, limit = (64, 3) if args.quick else (args.crop, args.max_images)
    out = []
    for set_name, source in sets.items():
        with torch.no_grad():
            sample = collect_patches(model, search, load_set(source, limit), seeded(degrader, args.seed),
                                     scale=scale, crop=crop, device=args.device, label=set_name)
        expected, bound = trust_scores(trust, sample)
        out.append({"set": set_name, "images": len(sample.image_names), "mean_expected": float(expected.mean()),
                    "mean_error": float(sample.error.mean()),
                    "coverage": float((sample.error <= bound).float().mean())})
    return out


def arm_differences(rows: list[dict[str, Any]], baseline: str) -> list[dict[str, Any]]:
    """Per set, arm and figure: the paired difference to ``baseline`` over seeds with its 95 % t interval."""
    out = []
    for set_name in dict.fromkeys(r["set"] for r in rows):
        for arm in dict.fromkeys(r["arm"] for r in rows if r["arm"] != baseline):
            for figure in ("mean_expected", "mean_error"):
                mine = {r["seed"]: r[figure] for r in rows if r["arm"] == arm and r["set"] == set_name}
                base = {r["seed"]: r[figure] for r in rows if r["arm"] == baseline and r["set"] == set_name}
                diff = paired_difference(mine, base)
                if diff is not None:
                    out.append({"set": set_name, "arm": arm, "figure": figure, "mean": diff["mean"],
                                "low": diff["low"], "high": diff["high"], "seeds": diff["n"]})
    return out


def trial_key(checkpoint: str, settings: dict[str, Any]) -> str:
    """What a trial's rows depend on: its checkpoint and every setting that changes a number."""
    return json.dumps({"checkpoint": str(checkpoint), **settings}, sort_keys=True)


def load_cached_trials(path: Path) -> dict[str, list[dict[str, Any]]]:
    """Rows of the trials measured before, by :func:`trial_key`; a torn last line (an interrupted run) is skipped."""
    cached: dict[str, list[dict[str, Any]]] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            cached[entry["key"]] = entry["rows"]
    return cached


def main() -> int:
    args = parse_args("mean trust map per study arm, against the measured error", "bench/results/study_trust.json",
                      add_arguments)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("xswinir.trust").setLevel(logging.INFO)  # progress lines of the long measurements
    sets = dict(item.split("=", 1) for item in args.sets.split(","))
    trials = [(*t, Path(args.classifier) if args.classifier else study_classifier(Path(study)))
              for study in args.study for t in finished_trials(Path(study))]
    if not trials:
        raise SystemExit(f"no finished trial under {', '.join(args.study)}")
    settings = {"sets": sets, "crop": args.crop, "seed": args.seed, "degradation": args.degradation,
                "fit_images": args.fit_images, "fit_max_images": args.fit_max_images, "fit_crop": args.fit_crop,
                "max_images": args.max_images, "quick": args.quick}
    cache_path = Path(f"{args.json}.trials.jsonl")
    cached = load_cached_trials(cache_path)
    started, rows = time.perf_counter(), []
    for index, (arm, seed, checkpoint, classifier) in enumerate(trials):
        key = trial_key(checkpoint, {**settings, "classifier": str(classifier)})
        if key in cached:
            trial_rows = cached[key]
            print(f"[{index + 1}/{len(trials)}] {arm} seed {seed}: measured before ({cache_path})", flush=True)
        else:
            t0 = time.perf_counter()
            torch.manual_seed(0)  # per trial: a trial's numbers do not depend on which trials came before it
            measured = measure_trial(checkpoint, classifier, sets, args)
            trial_rows = [{"arm": arm, "seed": seed, **row} for row in measured]
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            with cache_path.open("a") as f:
                f.write(json.dumps({"key": key, "rows": trial_rows}) + "\n")
            print(f"[{index + 1}/{len(trials)}] {arm} seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)
        rows.extend(trial_rows)
    crop = 64 if args.quick else args.crop
    print_table(rows, f"per trial: trust map (expected) and measured mean patch error, {crop} px crops, "
                      f"{args.degradation} at seed {args.seed}")
    differences = arm_differences(rows, args.baseline)
    print_table(differences, f"arm minus {args.baseline}, paired by seed, 95 % t interval")
    print(f"{len(trials)} trials, {time.perf_counter() - started:.0f} s")
    write_json(args.json, "study_trust", rows, differences=differences,
               settings={"studies": args.study, **settings})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
