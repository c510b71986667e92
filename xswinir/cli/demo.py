"""``xswinir demo``: the main job, end to end on one machine with nothing to download.

Trains a tiny SwinIR x2 with the texture term on images that ship inside scikit-image (local single-node
Ray), evaluates the EMA model against plain bicubic up-sampling on held-out images, fits a small trust model on
the training images (how wrong each patch probably is, :mod:`xswinir.trust`), and draws the explanation picture
and page: which other places of the image explain each tile, how consistent the restored texture is, and the
expected error of every patch.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from xswinir.cli.train import add_set_argument
from xswinir.config import Config, load_config
from xswinir.errors import UserError
from xswinir.paths import log_dir
from xswinir.sources import resolve_image_files

if TYPE_CHECKING:
    from torch import Tensor, nn

    from xswinir.texture import TextureSearch
    from xswinir.trust import TrustModel

log = logging.getLogger(__name__)

HELP = ("the main job: a short local training run, evaluation against bicubic, a trust model and an explanation "
        "picture")
# The demo's trust model: central crops of the training images (skimage:train has 8). 160 px crops give 100
# patches per image and, with 30 % of the images held apart for the bound (2 of 8), 200 calibration patches; they
# take about 1 s on 2 idle CPU cores, 30 s on a busy one (whole images: 80 s idle). `xswinir trust fit` fits more.
TRUST_FILE = "trust.json"
TRUST_MAX_IMAGES = 8
TRUST_CROP = 160
TRUST_CALIBRATION_SHARE = 0.3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="outputs/demo", help="output folder (default: %(default)s)")
    parser.add_argument("--config", "-c", default="demo", help="config to start from (default: %(default)s)")
    add_set_argument(parser, example="train.total_steps=100")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier demo in --out")


def run(args: argparse.Namespace) -> int:
    # lazy: keeps torch and Ray off `xswinir --help`
    from xswinir.checkpoint import CLASSIFIER_DIR, load_model
    from xswinir.explain import degrade_hr, explain
    from xswinir.explain_page import page_data, write_page
    from xswinir.images import read_image
    from xswinir.texture import TextureSearch, load_texture_classifier
    from xswinir.trainer import fit, init_ray
    from xswinir.training_log import METRICS_FILE, read_metrics
    from xswinir.trust import estimate_trust

    out = Path(args.out).expanduser().resolve()
    cfg = load_config(args.config, [f"run.storage={out / 'runs'}", f"run.log_dir={out / 'logs'}",
                                    *args.overrides])
    logs = log_dir(cfg.run.storage, cfg.run.name, cfg.run.log_dir)
    if (out / "runs").exists():
        if not args.overwrite:
            raise UserError(f"{out} holds an earlier demo: pass --overwrite to replace it, or --out elsewhere")
        for name in ("runs", "logs", "eval.json", TRUST_FILE, "explain.png", "explain.html"):
            target = out / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)

    print(f"[1/3] training {cfg.model.preset or 'SwinIR'} x{cfg.scale} for {cfg.train.total_steps} steps "
          f"on {cfg.data.train} (local Ray, {cfg.run.num_workers} worker)")
    started = time.time()
    init_ray(cfg.run, logs)
    ray_ready = time.time()
    result = fit(cfg)
    trained = time.time()
    checkpoint = Path(result.checkpoint.path)
    model, _ = load_model(checkpoint)  # the EMA weights
    model.eval()

    print(f"\n[2/3] evaluation on {cfg.data.val}, degraded with '{cfg.degradation.preset}' as in training")
    evaluate_against_bicubic(model, cfg, out / "eval.json", checkpoint)
    evaluated = time.time()

    print("\n[3/3] trust model and explanation picture")
    search = TextureSearch.from_config(cfg.texture, load_texture_classifier(checkpoint / CLASSIFIER_DIR))
    trust = fit_demo_trust(model, search, cfg, out / TRUST_FILE)
    trusted = time.time()
    hr = read_image(resolve_image_files(cfg.data.val)[0], channels=cfg.model.in_chans)
    hr, lq, description = degrade_hr(hr, cfg.degradation, cfg.scale, search.patch_size, seed=0)
    # The trust model's signals were measured with this very search: it is passed on, not rebuilt from the file.
    explanation = explain(model, search, lq, hr=hr, description=description, out=out / "explain.png",
                          tile=cfg.data.val_tile, trust=None if trust is None else functools.partial(
                              estimate_trust, trust, search, model=model, tile=cfg.data.val_tile))
    picture = explanation.png
    page = write_page(page_data(search, explanation.lq, explanation.sr, hr=explanation.hr, trust=trust,
                                trust_search=search, trust_map=explanation.trust,  # made once, for both
                                model=model, name="demo", description=description, tile=cfg.data.val_tile),
                      out / "explain.html")
    print(f"explorable page written to {page} (open it in a browser: click any patch)")
    explained = time.time()

    print("\noutputs:")
    print(f"  checkpoint        {checkpoint}")
    print(f"  evaluation        {out / 'eval.json'}")
    if trust is not None:
        print(f"  trust model       {out / TRUST_FILE}")
    print(f"  explanation       {picture}")
    print(f"  explorable page   {page}")
    print(f"  training curves   {logs / 'training_curves.png'}")
    print(f"  metrics, TensorBoard  {logs}  (tensorboard --logdir {logs / 'tensorboard'})")
    if (logs / "ray").is_dir():
        print(f"  Ray's logs        {logs / 'ray'}  (xswinir -v demo shows them)")

    # When the steps ran, from the worker's metrics: its first line's time minus the steps since the loop began.
    logged = [r for r in read_metrics(logs / METRICS_FILE) if r.get("steps_per_s")]
    steps = logged[-1]["time"] - (logged[0]["time"] - logged[0]["step"] / logged[0]["steps_per_s"]) if logged else 0.0
    steps = min(max(steps, 0.0), trained - ray_ready)
    print(f"\ntime: {_duration(explained - started)} in all: Ray start-up {_duration(ray_ready - started)}, "
          f"training {_duration(trained - ray_ready)} ({cfg.train.total_steps} steps {_duration(steps)}; texture "
          f"classifier, Ray Train start and stop {_duration(trained - ray_ready - steps)}), "
          f"evaluation {_duration(evaluated - trained)}, trust model {_duration(trusted - evaluated)}, "
          f"explanation {_duration(explained - trusted)}")
    return 0


def fit_demo_trust(model: nn.Module, search: TextureSearch, cfg: Config, path: Path) -> TrustModel | None:
    """A small trust model of the trained model, fitted on its training images, saved and described in one line.

    The training images (``cfg.data.train``, never the validation images the demo evaluates and explains),
    at most :data:`TRUST_MAX_IMAGES` of them spread over the source, their central :data:`TRUST_CROP` px,
    degraded as in training (``cfg.degradation``, seeded per image name with ``cfg.train.seed``), restored and
    measured; :data:`TRUST_CALIBRATION_SHARE` of the images calibrate the 90 % bound.

    Args:
        model: the trained (EMA) model, on CPU, in eval mode.
        search: the run's texture search; the trust model's signals are measured with it.
        cfg: the run's config.
        path: the trust file to write (:func:`xswinir.trust.save_trust`).

    Returns:
        The fitted model, or None when the training images cannot give one (fewer than 2 usable images): the
        demo then explains without the trust layer and says why.
    """
    # lazy: keeps torch off `xswinir --help`
    import torch

    from xswinir.data import open_images
    from xswinir.degradations import build_degrader
    from xswinir.evaluation import degrade
    from xswinir.images import ImageReadError
    from xswinir.trust import TrustError, collect_patches, fit_trust, save_trust, split_images

    images = open_images(cfg.data.train, cfg.model.in_chans)
    count = min(len(images), TRUST_MAX_IMAGES)
    picks = sorted({i * len(images) // count for i in range(count)})  # spread over a larger source
    degrader = build_degrader(cfg.degradation, cfg.scale)

    def read() -> Iterator[tuple[str, Tensor]]:
        for i in picks:
            try:
                yield images.names[i], images.load(i)
            except ImageReadError as err:  # training skipped it too
                log.warning("trust model: skipping %s", err)

    try:
        with torch.no_grad():
            sample = collect_patches(model, search, read(), lambda gt, name: degrade(degrader, gt, name,
                                                                                         cfg.train.seed),
                                     scale=cfg.scale, crop=TRUST_CROP, label="trust model")
        fit_ids, cal_ids = split_images(len(sample.image_names), TRUST_CALIBRATION_SHARE, cfg.train.seed)
        trust = fit_trust(sample, fit_ids, cal_ids, search=search, scale=cfg.scale,
                          report={"images": cfg.data.train, "degradation": f"the run's ({cfg.degradation.preset})",
                                  "seed": cfg.train.seed, "crop": TRUST_CROP})
    except TrustError as err:
        print(f"no trust model: {err}")
        return None
    save_trust(trust, path)
    report = trust.report
    print(f"trust model written to {path}: fitted on {report['fit_images']} images of {cfg.data.train} "
          f"({TRUST_CROP} px crops), its {trust.coverage:.0%} bound covers "
          f"{report['calibration_coverage']:.1%} of the {report['calibration_patches']} patches of "
          f"{report['calibration_images']} calibration images")
    return trust


def evaluate_against_bicubic(model: nn.Module, cfg: Config, path: Path, checkpoint: Path) -> None:
    """The run's validation images, degraded as in training: the model against bicubic, printed and saved.

    Args:
        model: the trained (EMA) model, on CPU.
        cfg: the run's config (``data.val``, ``degradation``, ``scale``, ``data.val_tile``).
        path: the JSON file to write: ``{"images": rows, "mean": mean row, "checkpoint": str}``.
        checkpoint: the checkpoint ``model`` came from, recorded in the file.
    """
    # lazy: keeps torch off `xswinir --help`
    import torch

    from xswinir.degradations import build_degrader
    from xswinir.evaluation import (
        VALIDATION_COLUMNS,
        VALIDATION_METRICS,
        average,
        build_validation_set,
        format_table,
        validation_rows,
    )

    val_set = build_validation_set(cfg, build_degrader(cfg.degradation, cfg.scale), torch.device("cpu"))
    rows = validation_rows(model, val_set, cfg.scale, cfg.data.val_tile)
    print(format_table(rows, VALIDATION_COLUMNS))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": rows, "mean": average(rows, VALIDATION_METRICS),
                                "checkpoint": str(checkpoint)}, indent=2))


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes} min {seconds} s" if minutes else f"{seconds} s"
