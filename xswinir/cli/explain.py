"""``xswinir explain IMAGE``: a picture of what the texture term does for a restored image."""

from __future__ import annotations

import argparse
from pathlib import Path

from xswinir.pixel_limit import add_max_pixels_argument, apply_max_pixels

HELP = ("restore an image (a real low-quality one with --lq, or a degraded HR one) and draw the texture windows "
        "and texture consistency behind the loss (PNG, optional HTML)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", help="an image file (PNG, JPEG, ...): HR, degraded first; with --lq the input itself")
    parser.add_argument("--lq", action="store_true",
                        help="IMAGE is a real low-quality input: restore it as it is, no degradation, no HR needed")
    parser.add_argument("--checkpoint", required=True,
                        help="a model: training checkpoint folder, .safetensors or official .pth (with --preset)")
    parser.add_argument("--classifier", default=None,
                        help="a texture classifier folder (default: the one inside a training checkpoint)")
    parser.add_argument("--preset", default=None, help="model preset, needed for official .pth files")
    parser.add_argument("--degradation", default=None,
                        help="degradation preset applied to an HR IMAGE (default: blur-noise; not with --lq)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the degradation (default: 0; not with --lq)")
    parser.add_argument("--patches", type=int, default=3,
                        help="how many tiles to explain, where the texture is strongest (default: %(default)s)")
    parser.add_argument("--tile-at", action="append", default=None, metavar="TOP,LEFT",
                        help="explain the tile at these pixel coordinates of the HR image (with --lq: of the "
                             "restored output) instead (repeatable)")
    parser.add_argument("--out", default="explain.png", help="the PNG to write (default: %(default)s)")
    parser.add_argument("--html", action="store_true", help="also write a self-contained HTML page beside it")
    parser.add_argument("--tile", type=int, default=None,
                        help="LR tile size for the model on large images (default: the whole image at once)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    add_max_pixels_argument(parser)


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

    from xswinir.checkpoint import CLASSIFIER_DIR, CONFIG_FILE, load_model
    from xswinir.config import DEGRADATION_PRESETS, Config, ConfigError, DataConfig, TextureConfig, load_config
    from xswinir.explain import ExplainError, explain, explain_lq
    from xswinir.images import printable_path, read_image
    from xswinir.inference import resolve_device
    from xswinir.texture import load_texture_classifier

    apply_max_pixels(args)
    if args.patches < 1:
        raise ExplainError(f"--patches must be >= 1, got {args.patches}")
    if args.lq and (args.degradation is not None or args.seed is not None):
        raise ExplainError("--degradation and --seed degrade an HR image; with --lq the image is used as it is")
    degradation = args.degradation or "blur-noise"
    if degradation not in DEGRADATION_PRESETS:
        raise ConfigError(f"unknown --degradation {degradation!r}; choose one of {sorted(DEGRADATION_PRESETS)}")
    checkpoint = Path(args.checkpoint)
    classifier_path = args.classifier
    if classifier_path is None:
        if not (checkpoint / CLASSIFIER_DIR).is_dir():
            raise ExplainError(f"{checkpoint} holds no texture classifier; pass --classifier FOLDER")
        classifier_path = checkpoint / CLASSIFIER_DIR
    device = resolve_device(args.device)
    model, model_cfg = load_model(checkpoint, preset=args.preset)
    image = read_image(args.image, channels=model_cfg.in_chans)
    classifier = load_texture_classifier(classifier_path)

    # A training checkpoint carries its config: its texture search settings are what the loss used.
    texture = TextureConfig()
    if (checkpoint / CONFIG_FILE).is_file():
        texture = load_config(checkpoint / CONFIG_FILE).texture
    texture = dataclasses.replace(texture, patch_size=classifier.patch_size)
    tiles = _tiles(args.tile_at)
    try:
        if args.lq:
            result = explain_lq(model, classifier, image, texture, patches=args.patches, tiles=tiles, out=args.out,
                                html=args.html, tile=args.tile, device=device)
        else:
            scale = model_cfg.upscale
            cfg = Config(model=model_cfg, data=dataclasses.replace(DataConfig(), gt_size=64 * scale),
                         degradation=DEGRADATION_PRESETS[degradation], texture=texture)
            result = explain(model, classifier, image, cfg, seed=args.seed or 0, patches=args.patches, tiles=tiles,
                             out=args.out, html=args.html, tile=args.tile, device=device)
    except ExplainError as err:
        raise ExplainError(f"{printable_path(args.image)}: {err}") from err  # say which of the user's files
    print(f"wrote {printable_path(result.png)}" + (f" and {printable_path(result.html)}" if result.html else ""))
    print(("input: " if args.lq else "degradation: ") + result.description)
    r2 = "consistency r²" if args.lq else "HR fit r²  restored consistency r²"
    print(f"  tile  top,left   windows  {r2}")
    for s in result.tile_summary:
        line = f"  {s['patch']:>4}  {s['tile'][0]:>4},{s['tile'][1]:<4} {s['windows']:>7}  {s['r2']:>10.3f}"
        print(line if args.lq else f"{line}  {s['consistency']:>21.3f}")
        for r in (r for r in result.rows if r["patch"] == s["patch"]):
            print(f"          window {r['rank']} at {r['window'][0]},{r['window'][1]}  c*={r['coef']:+.3f}  "
                  f"score={r['score']:.3f}")
    th, tw = result.consistency.shape
    print(f"mean texture consistency of the restored image: {result.consistency_mean:.3f} "
          f"({th}x{tw} tiles of {classifier.patch_size} px)")
    return 0
