"""``xswinir texture train | show``: fit the linear texture classifier, print and plot its weights."""

from __future__ import annotations

import argparse
from pathlib import Path

from xswinir.cli.train import add_set_argument
from xswinir.config import TextureConfig, load_config

HELP = "train the linear texture classifier (texture train) or show a trained one's weights (texture show)"
TOP_FEATURES = 12  # rows of the weight table printed after training


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="texture_command", required=True, metavar="ACTION")
    train = sub.add_parser("train", help="fit a classifier on HR images, print held-out scores, save it",
                           description="Fit the linear texture classifier on windows of HR images.")
    train.add_argument("--images", metavar="SRC", default=None,
                       help="image folder, file or skimage:NAME,... (default: the config's data.train)")
    train.add_argument("--patch-size", type=int, default=None,
                       help=f"window side p (default: the config's texture.patch_size, {TextureConfig.patch_size})")
    train.add_argument("--out", metavar="DIR", default=None, help="output folder (default: outputs/texture_p{p})")
    train.add_argument("--config", metavar="YAML", default=None, help="a config file or shipped config name")
    add_set_argument(train, example="texture.classifier.steps=100")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    show = sub.add_parser("show", help="print a classifier's weight table and plot it",
                          description="Print a trained texture classifier's weights and write a bar chart.")
    show.add_argument("classifier", metavar="CLASSIFIER", help="folder written by `xswinir texture train`")
    show.add_argument("--out", metavar="PNG", default=None, help="plot file (default: CLASSIFIER/weights.png)")


def _print_weights(clf, limit: int | None) -> None:
    rows = sorted(clf.weight_table(), key=lambda row: -abs(row[1]))
    shown = rows if limit is None else rows[:limit]
    width = max(len(name) for name, _ in shown)
    title = "all weights" if limit is None else f"top {len(shown)} of {len(rows)} weights"
    print(f"{title} (on standardised features; negative |diff| = a difference speaks against same texture):")
    for name, weight in shown:
        print(f"  {name.ljust(width)}  {weight:+.3f}")
    print(f"  {'bias'.ljust(width)}  {float(clf.bias.detach()):+.3f}")


def _train(args: argparse.Namespace) -> int:
    # lazy: keeps torch off `xswinir --help`
    from xswinir.texture import plot_classifier_weights, save_texture_classifier, train_texture_classifier
    from xswinir.texture.training import load_training_images, run_degradation

    cfg = load_config(args.config, args.overrides)
    p = args.patch_size or cfg.texture.patch_size
    source = args.images or cfg.data.train
    out = Path(args.out or f"outputs/texture_p{p}")
    images = load_training_images(source, cfg.texture.classifier.max_images)
    clf, report = train_texture_classifier(images, p, cfg.texture.classifier, progress=not args.no_progress,
                                           max_iou=cfg.texture.max_iou, degrade=run_degradation(cfg))
    print(f"texture classifier p={p} on {source}: {report['num_images']} images, {report['num_features']} features, "
          f"{report['num_parameters']} weights, {report['seconds']:.1f} s")
    print(f"pairs: {report['num_positive']} positive; negative: {report.get('num_negative_nearby', 0)} nearby, "
          f"{report['num_negative_same_image']} far in the same image, {report['num_negative_other_image']} across "
          f"images; {report['num_holdout_pairs']} held out")
    lq = f", LQ queries {report['roc_auc_lq']:.3f}" if report.get("roc_auc_lq") is not None else ""
    print(f"held-out ({report['holdout']}) accuracy {report['accuracy']:.3f}  ROC AUC {report['roc_auc']:.3f}{lq}   "
          f"(training pairs: {report['train_accuracy']:.3f} / {report['train_roc_auc']:.3f})")
    _print_weights(clf, TOP_FEATURES)
    save_texture_classifier(clf, out)
    plot = plot_classifier_weights(clf, out / "weights.png")
    print(f"saved {out}/ (classifier.safetensors, classifier.json) and {plot}")
    print(f"use it with: --set texture.classifier.path={out}")
    return 0


def _show(args: argparse.Namespace) -> int:
    from xswinir.texture import load_texture_classifier, plot_classifier_weights  # lazy: keeps torch off --help

    clf = load_texture_classifier(args.classifier)
    folder = Path(args.classifier)
    folder = folder.parent if folder.is_file() else folder
    report = clf.report
    print(f"texture classifier p={clf.patch_size}, {len(clf.feature_names)} features")
    if report.get("roc_auc") is not None:
        print(f"held-out accuracy {report['accuracy']:.3f}  ROC AUC {report['roc_auc']:.3f}")
    _print_weights(clf, None)
    plot = plot_classifier_weights(clf, Path(args.out) if args.out else folder / "weights.png")
    print(f"wrote {plot}")
    return 0


def run(args: argparse.Namespace) -> int:
    return _train(args) if args.texture_command == "train" else _show(args)
