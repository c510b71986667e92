"""``xswinir demo``: the main job, end to end on one machine with nothing to download.

Trains a tiny SwinIR x2 with the texture term on images that ship inside scikit-image (local single-node
Ray), evaluates the EMA model against plain bicubic up-sampling on held-out images, and draws the
explanation picture: which other places of the image explain each tile, and how consistent the restored
texture is.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

from xswinir.cli.train import add_set_argument
from xswinir.config import Config, load_config
from xswinir.errors import UserError
from xswinir.paths import log_dir
from xswinir.sources import resolve_image_files

if TYPE_CHECKING:
    from torch import nn

HELP = "the main job: a short local training run, evaluation against bicubic, and an explanation picture"


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

    out = Path(args.out).expanduser().resolve()
    cfg = load_config(args.config, [f"run.storage={out / 'runs'}", f"run.log_dir={out / 'logs'}",
                                    *args.overrides])
    logs = log_dir(cfg.run.storage, cfg.run.name, cfg.run.log_dir)
    if (out / "runs").exists():
        if not args.overwrite:
            raise UserError(f"{out} holds an earlier demo: pass --overwrite to replace it, or --out elsewhere")
        for name in ("runs", "logs", "eval.json", "explain.png", "explain.html"):
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

    print("\n[3/3] explanation picture")
    search = TextureSearch.from_config(cfg.texture, load_texture_classifier(checkpoint / CLASSIFIER_DIR))
    hr = read_image(resolve_image_files(cfg.data.val)[0], channels=cfg.model.in_chans)
    hr, lq, description = degrade_hr(hr, cfg.degradation, cfg.scale, search.patch_size, seed=0)
    explanation = explain(model, search, lq, hr=hr, description=description, out=out / "explain.png",
                          tile=cfg.data.val_tile)
    picture = explanation.png
    page = write_page(page_data(search, explanation.lq, explanation.sr, hr=explanation.hr, name="demo",
                                description=description, tile=cfg.data.val_tile), out / "explain.html")
    print(f"explorable page written to {page} (open it in a browser: click any patch)")
    explained = time.time()

    print("\noutputs:")
    print(f"  checkpoint        {checkpoint}")
    print(f"  evaluation        {out / 'eval.json'}")
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
          f"evaluation {_duration(evaluated - trained)}, explanation {_duration(explained - evaluated)}")
    return 0


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
