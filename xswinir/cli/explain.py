"""``xswinir explain IMAGE``: a picture of what the texture term does for a restored image."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "degrade an HR image, restore it and draw the texture windows behind the loss (PNG, optional HTML)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", help="an HR image file (PNG, JPEG, ...)")
    parser.add_argument("--checkpoint", required=True,
                        help="a model: training checkpoint folder, .safetensors or official .pth (with --preset)")
    parser.add_argument("--classifier", default=None,
                        help="a texture classifier folder (default: the one inside a training checkpoint)")
    parser.add_argument("--preset", default=None, help="model preset, needed for official .pth files")
    parser.add_argument("--degradation", default="blur-noise",
                        help="degradation preset applied to IMAGE (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the degradation (default: %(default)s)")
    parser.add_argument("--patches", type=int, default=3,
                        help="how many tiles to explain, where the texture is strongest (default: %(default)s)")
    parser.add_argument("--tile-at", action="append", default=None, metavar="TOP,LEFT",
                        help="explain the tile at these HR pixel coordinates instead (repeatable)")
    parser.add_argument("--out", default="explain.png", help="the PNG to write (default: %(default)s)")
    parser.add_argument("--html", action="store_true", help="also write a self-contained HTML page beside it")
    parser.add_argument("--tile", type=int, default=None,
                        help="LR tile size for the model on large images (default: the whole image at once)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")


def _tiles(values: list[str] | None):
    from xswinir.explain import ExplainError

    if not values:
        return None
    import torch

    out = []
    for text in values:
        try:
            top, left = (int(v) for v in text.split(","))
        except ValueError as err:
            raise ExplainError(f"--tile-at {text!r} is not TOP,LEFT in pixels") from err
        out.append((top, left))
    return torch.tensor(out)


def run(args: argparse.Namespace) -> int:
    import dataclasses

    import torch

    from xswinir.config import DEGRADATION_PRESETS, Config, ConfigError, DataConfig, TextureConfig, load_config
    from xswinir.explain import ExplainError, explain
    from xswinir.images import read_image
    from xswinir.model import load_model
    from xswinir.texture import load_texture_classifier
    from xswinir.trainer import CLASSIFIER_DIR, CONFIG_FILE

    if args.patches < 1:
        raise ExplainError(f"--patches must be >= 1, got {args.patches}")
    if args.degradation not in DEGRADATION_PRESETS:
        raise ConfigError(f"unknown --degradation {args.degradation!r}; choose one of {sorted(DEGRADATION_PRESETS)}")
    checkpoint = Path(args.checkpoint)
    classifier_path = args.classifier
    if classifier_path is None:
        if not (checkpoint / CLASSIFIER_DIR).is_dir():
            raise ExplainError(f"{checkpoint} holds no texture classifier; pass --classifier FOLDER")
        classifier_path = checkpoint / CLASSIFIER_DIR
    model, model_cfg = load_model(checkpoint, preset=args.preset)
    hr = read_image(args.image, channels=model_cfg.in_chans)
    classifier = load_texture_classifier(classifier_path)

    # A training checkpoint carries its config: its texture search settings are what the loss used.
    texture = TextureConfig()
    if (checkpoint / CONFIG_FILE).is_file():
        texture = load_config(checkpoint / CONFIG_FILE).texture
    texture = dataclasses.replace(texture, patch_size=classifier.patch_size)
    scale = model_cfg.upscale
    cfg = Config(model=model_cfg, data=dataclasses.replace(DataConfig(), gt_size=64 * scale),
                 degradation=DEGRADATION_PRESETS[args.degradation], texture=texture)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    result = explain(model, classifier, hr, cfg, seed=args.seed, patches=args.patches, tiles=_tiles(args.tile_at),
                     out=args.out, html=args.html, tile=args.tile, device=device)
    print(f"wrote {result.png}" + (f" and {result.html}" if result.html else ""))
    print(f"degradation: {result.description}")
    for r in result.rows:
        print(f"  tile {r['patch']} at {r['tile'][:2]}: window {r['rank']} at {r['window'][:2]}  "
              f"c*={r['coef']:+.3f}  score={r['score']:.3f}")
    return 0
