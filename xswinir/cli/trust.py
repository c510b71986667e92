"""``xswinir trust fit | show``: fit the per-patch trust model of a checkpoint, or print a fitted one's weights."""

from __future__ import annotations

import argparse
from pathlib import Path

from xswinir.cli.options import add_max_pixels_argument, apply_max_pixels

HELP = "fit a trust model (expected error and a calibrated bound per patch, no HR image needed) or show its weights"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="trust_command", required=True, metavar="ACTION")
    fit = sub.add_parser("fit", help="measure training images restored by a checkpoint, fit and calibrate, save",
                         description="Degrade training images as the model was trained, restore them, fit a linear "
                                     "model of each patch's error on named signals and calibrate its bound on "
                                     "held-apart images (split conformal).")
    fit.add_argument("--checkpoint", required=True,
                     help="training checkpoint folder, .safetensors or .pth; local or s3://...")
    fit.add_argument("--preset", default=None, help="model preset, needed for official .pth files")
    fit.add_argument("--images", metavar="SRC", default=None,
                     help="training images: folder, file, skimage:NAME,... or several joined by ';' (default: the "
                          "checkpoint's data.train); never a test set")
    fit.add_argument("--out", metavar="FILE", required=True, help="the trust file to write (JSON)")
    fit.add_argument("--classifier", default=None,
                     help="texture classifier folder (default: the one inside a training checkpoint)")
    fit.add_argument("--degradation", default=None,
                     help="degradation preset of the inputs (default: the checkpoint's training degradation)")
    fit.add_argument("--seed", type=int, default=0, help="seed of the degradations and of the split (default: 0)")
    fit.add_argument("--crop", type=int, default=192,
                     help="central crop of each image in HR pixels, 0 for whole images (default: %(default)s)")
    fit.add_argument("--max-images", type=int, default=None, help="use at most this many images (default: all)")
    fit.add_argument("--calibration-share", type=float, default=0.3,
                     help="share of the images kept apart to calibrate the bound (default: %(default)s)")
    fit.add_argument("--coverage", type=float, default=0.9,
                     help="share of patches whose error the bound covers (default: %(default)s)")
    fit.add_argument("--ridge", type=float, default=1e-3, help="relative ridge penalty (default: %(default)s)")
    fit.add_argument("--self-ensemble", action="store_true",
                     help="add the x8 self-ensemble spread as a signal (8 more passes per image, here and in use)")
    fit.add_argument("--tile", type=int, default=None, help="LR tile size of the model (default: whole images)")
    fit.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    add_max_pixels_argument(fit)
    show = sub.add_parser("show", help="print a trust file's weights by signal name and its calibration",
                          description="Print a trust model's weights by signal name and how it was fitted.")
    show.add_argument("file", metavar="FILE", help="a file written by `xswinir trust fit`")


def print_trust(trust, path: str | Path) -> None:
    """The weight table and the fit report of a trust model, as ``trust show`` prints it."""
    print(f"trust model {path}: x{trust.scale}, {trust.patch_size} px patches, predicts ln(1 + error), error = mean "
          "|Y error| of a patch (Y on 0-255)")
    width = max(len(name) for name in trust.signal_names)
    print(f"  {'signal'.ljust(width)}  {'per std':>8}  {'per unit':>9}  {'mean':>8}  {'std':>8}")
    for (name, per_std, per_unit), mean, std in zip(trust.weight_table(), trust.signal_mean, trust.signal_std,
                                                    strict=True):
        print(f"  {name.ljust(width)}  {per_std:+8.4f}  {per_unit:+9.4f}  {mean:8.3f}  {std:8.3f}")
    print(f"  {'bias'.ljust(width)}  {trust.bias:+8.4f}  (ln(1 + error) at average signals)")
    print(f"expected error = exp(prediction) x {trust.smear:.4f} - 1;  {trust.coverage:.0%} bound = "
          f"exp(prediction + {trust.quantile:.4f}) - 1")
    report = trust.report
    if report:
        print(f"fitted on {report.get('fit_images')} images ({report.get('fit_patches')} patches), R² of ln(1 + error) "
              f"{report.get('r2_log_error_fit', float('nan')):.3f}; calibrated on {report.get('calibration_images')} "
              f"other images ({report.get('calibration_patches')} patches): coverage "
              f"{report.get('calibration_coverage', float('nan')):.3f}")
        if report.get("degradation"):
            print(f"inputs: {report['degradation']} degradation of {report.get('images')}, seed {report.get('seed')}, "
                  f"{report.get('crop') or 'whole'} px crops")


def _fit(args: argparse.Namespace) -> int:
    from xswinir.checkpoint import local_checkpoint  # lazy: keeps torch off `xswinir --help`

    with local_checkpoint(args.checkpoint) as checkpoint:  # s3://... is downloaded and checked once
        return _fit_local(args, checkpoint)


def _fit_local(args: argparse.Namespace, checkpoint: Path) -> int:
    import dataclasses

    import torch

    # lazy: keeps torch off `xswinir --help`
    from xswinir.checkpoint import CLASSIFIER_DIR, CONFIG_FILE, CheckpointError, load_model
    from xswinir.config import DEGRADATION_PRESETS, ConfigError, TextureConfig, load_config
    from xswinir.data import open_images
    from xswinir.degradations import build_degrader
    from xswinir.evaluation import degrade
    from xswinir.images import ImageReadError
    from xswinir.inference import resolve_device
    from xswinir.paths import printable_path
    from xswinir.texture import TextureSearch, load_texture_classifier
    from xswinir.trust import TrustError, collect_patches, fit_trust, save_trust, split_images

    apply_max_pixels(args)
    if args.crop < 0 or (args.max_images is not None and args.max_images < 2):
        raise TrustError("--crop must be >= 0 and --max-images >= 2")
    if not checkpoint.exists():  # said first: a missing checkpoint holds no classifier either
        raise CheckpointError(f"checkpoint {printable_path(args.checkpoint)} does not exist")
    cfg = load_config(checkpoint / CONFIG_FILE) if (checkpoint / CONFIG_FILE).is_file() else None
    classifier_path = args.classifier or (checkpoint / CLASSIFIER_DIR if (checkpoint / CLASSIFIER_DIR).is_dir()
                                          else None)
    if classifier_path is None:
        raise TrustError(f"{printable_path(args.checkpoint)} holds no texture classifier; pass --classifier FOLDER")
    source = args.images or (cfg.data.train if cfg is not None else None)
    if source is None:
        raise TrustError(f"{printable_path(args.checkpoint)} carries no config naming its training images; "
                         "pass --images")
    if args.degradation is not None:
        if args.degradation not in DEGRADATION_PRESETS:
            raise ConfigError(f"unknown --degradation {args.degradation!r}; choose one of "
                              f"{sorted(DEGRADATION_PRESETS)}")
        degradation, degradation_name = DEGRADATION_PRESETS[args.degradation], args.degradation
    elif cfg is not None:
        degradation, degradation_name = cfg.degradation, f"the checkpoint's training ({cfg.degradation.preset})"
    else:
        raise TrustError(f"{printable_path(args.checkpoint)} carries no training config; pass --degradation PRESET")

    device = resolve_device(args.device)
    model, model_cfg = load_model(checkpoint, preset=args.preset)
    model = model.to(device).eval()
    classifier = load_texture_classifier(classifier_path)
    texture = dataclasses.replace(cfg.texture if cfg is not None else TextureConfig(),
                                  patch_size=classifier.patch_size)
    search = TextureSearch.from_config(texture, classifier)
    scale = model_cfg.upscale
    degrader = build_degrader(degradation, scale)
    images = open_images(source, model_cfg.in_chans)
    count = len(images) if args.max_images is None else min(len(images), args.max_images)

    def read() -> object:
        for i in range(count):
            try:
                yield images.names[i], images.load(i)
            except ImageReadError as err:
                print(f"skipping {err}")

    print(f"trust fit: {count} images of {printable_path(source)}, {degradation_name} degradation, seed {args.seed}"
          f"{', x8 self-ensemble' if args.self_ensemble else ''}")
    with torch.no_grad():
        sample = collect_patches(model, search, read(), lambda gt, name: degrade(degrader, gt, name,
                                                                                               args.seed),
                                 scale=scale, crop=args.crop or None, self_ensemble=args.self_ensemble,
                                 tile=args.tile, device=device, total=count, label="trust fit")
    fit_ids, cal_ids = split_images(len(sample.image_names), args.calibration_share, args.seed)
    trust = fit_trust(sample, fit_ids, cal_ids, search=search, scale=scale,
                      coverage=args.coverage, ridge=args.ridge,
                      report={"images": str(source), "degradation": degradation_name, "seed": args.seed,
                              "crop": args.crop or None, "checkpoint": str(args.checkpoint)})
    save_trust(trust, args.out)
    print_trust(trust, args.out)
    print(f"wrote {printable_path(args.out)}; use it with: xswinir upscale ... --trust {printable_path(args.out)}")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.trust_command == "fit":
        return _fit(args)
    from xswinir.trust import load_trust  # lazy: keeps torch off `xswinir --help`

    print_trust(load_trust(args.file), args.file)
    return 0
