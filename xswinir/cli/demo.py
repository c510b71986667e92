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

from xswinir.cli.train import add_set_argument

HELP = "the main job: a short local training run, evaluation against bicubic, and an explanation picture"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="outputs/demo", help="output folder (default: %(default)s)")
    parser.add_argument("--config", "-c", default="demo", help="config to start from (default: %(default)s)")
    add_set_argument(parser, example="train.total_steps=100")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier demo in --out")


def run(args: argparse.Namespace) -> int:
    import torch

    from xswinir.checkpoint import CLASSIFIER_DIR, load_model
    from xswinir.config import load_config
    from xswinir.degradations import build_degrader
    from xswinir.errors import UserError
    from xswinir.evaluation import build_validation_set, evaluate_images
    from xswinir.explain import explain
    from xswinir.images import read_image, resolve_image_files
    from xswinir.metrics import VAL_PSNR_BICUBIC_Y, VAL_PSNR_Y, VAL_SSIM_BICUBIC_Y, VAL_SSIM_Y
    from xswinir.storage import log_dir
    from xswinir.texture import load_texture_classifier
    from xswinir.trainer import fit, init_ray
    from xswinir.training_log import METRICS_FILE, read_metrics

    out = Path(args.out).expanduser().resolve()
    cfg = load_config(args.config, [f"run.storage={out / 'runs'}", f"run.log_dir={out / 'logs'}",
                                    *args.overrides])
    if (out / "runs").exists():
        if not args.overwrite:
            raise UserError(f"{out} holds an earlier demo: pass --overwrite to replace it, or --out elsewhere")
        for name in ("runs", "logs", "eval.json", "explain.png", "explain.html"):
            target = out / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)

    print(f"[1/3] training {cfg.model.preset or 'SwinIR'} x{cfg.scale} for {cfg.train.total_steps} steps "
          f"on {cfg.data.train} (local Ray, {cfg.run.num_workers} worker)")
    started = time.time()
    init_ray(cfg.run, log_dir(cfg.run))
    ray_ready = time.time()
    result = fit(cfg)
    trained = time.time()
    checkpoint = Path(result.checkpoint.path)
    model, _ = load_model(checkpoint)  # the EMA weights
    model.eval()

    print(f"\n[2/3] evaluation on {cfg.data.val}, degraded with '{cfg.degradation.preset}' as in training")
    degrader = build_degrader(cfg.degradation, cfg.scale)
    val_set = build_validation_set(cfg, degrader, torch.device("cpu"))
    rows = evaluate_images(model, val_set, cfg.scale, cfg.data.val_tile)
    print(f"{'image':<16}{'Y-PSNR model':>14}{'Y-PSNR bicubic':>16}{'Y-SSIM model':>14}{'Y-SSIM bicubic':>16}")
    for row in rows:
        print(f"{row['image']:<16}{row[VAL_PSNR_Y]:>14.3f}{row[VAL_PSNR_BICUBIC_Y]:>16.3f}"
              f"{row[VAL_SSIM_Y]:>14.4f}{row[VAL_SSIM_BICUBIC_Y]:>16.4f}")
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0] if k != "image"}
    print(f"{'mean':<16}{mean[VAL_PSNR_Y]:>14.3f}{mean[VAL_PSNR_BICUBIC_Y]:>16.3f}"
          f"{mean[VAL_SSIM_Y]:>14.4f}{mean[VAL_SSIM_BICUBIC_Y]:>16.4f}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps({"images": rows, "mean": mean, "checkpoint": str(checkpoint)},
                                              indent=2))
    evaluated = time.time()

    print("\n[3/3] explanation picture")
    classifier = load_texture_classifier(checkpoint / CLASSIFIER_DIR)
    hr = read_image(resolve_image_files(cfg.data.val)[0], channels=cfg.model.in_chans)
    explanation = explain(model, classifier, hr, cfg, seed=0, out=out / "explain.png", html=True,
                          tile=cfg.data.val_tile)
    picture = explanation.png
    explained = time.time()

    print("\noutputs:")
    print(f"  checkpoint        {checkpoint}")
    print(f"  evaluation        {out / 'eval.json'}")
    print(f"  explanation       {picture}")
    print(f"  training curves   {log_dir(cfg.run) / 'training_curves.png'}")
    print(f"  metrics, TensorBoard  {log_dir(cfg.run)}  (tensorboard --logdir {log_dir(cfg.run) / 'tensorboard'})")
    if (log_dir(cfg.run) / "ray").is_dir():
        print(f"  Ray's logs        {log_dir(cfg.run) / 'ray'}  (xswinir -v demo shows them)")

    # When the steps ran, from the worker's metrics: its first line's time minus the steps since the loop began.
    logged = [r for r in read_metrics(log_dir(cfg.run) / METRICS_FILE) if r.get("steps_per_s")]
    steps = logged[-1]["time"] - (logged[0]["time"] - logged[0]["step"] / logged[0]["steps_per_s"]) if logged else 0.0
    steps = min(max(steps, 0.0), trained - ray_ready)
    print(f"\ntime: {_duration(explained - started)} in all: Ray start-up {_duration(ray_ready - started)}, "
          f"training {_duration(trained - ray_ready)} ({cfg.train.total_steps} steps {_duration(steps)}; texture "
          f"classifier, Ray Train start and stop {_duration(trained - ray_ready - steps)}), "
          f"evaluation {_duration(evaluated - trained)}, explanation {_duration(explained - evaluated)}")
    return 0


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes} min {seconds} s" if minutes else f"{seconds} s"
