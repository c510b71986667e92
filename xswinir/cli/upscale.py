"""``xswinir upscale``: run a checkpoint on image files or folders and write PNG, JPEG or WebP files.

Each input becomes ``<stem>_x{s}.<format>`` (``<stem>_restored.<format>`` for an upscale-1 model) in
``--out``, keeping gray, 16-bit, alpha and the EXIF orientation (the rules are :mod:`xswinir.restore`'s). A
file that cannot be read (corrupt, truncated, over the pixel limit), or whose output exists without
``--overwrite``, is skipped, named and counted, the others are still processed, and the exit status is 1 if
anything was skipped. Outputs are written to a temporary sibling and moved into place when complete, so
``--overwrite`` keeps the old result until the new one exists.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from xswinir.cli.options import add_inference_arguments, add_max_pixels_argument, apply_max_pixels
from xswinir.errors import UserError
from xswinir.paths import printable_path

HELP = "upscale/restore image files or folders with a checkpoint, writing PNG (default), JPEG or WebP"

FORMATS = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders (searched recursively)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help=".safetensors, training checkpoint folder, or .pth")
    source.add_argument("--onnx", metavar="FILE", help="an `xswinir export --format onnx` file, run with ONNX Runtime "
                        "on the CPU through the same tiler")
    parser.add_argument("--out", default="results",
                        help="output folder (default: %(default)s); each input gives <stem>_x<scale>.<format>, and "
                             "inputs that would share a name (a.png, a.jpg) carry their extension (a_png_x2.png)")
    add_inference_arguments(parser, 256, "LR tile size, bounds memory; 0 runs whole images (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing outputs (each only once its new version is complete)")
    parser.add_argument("--format", choices=sorted(FORMATS), default="png",
                        help="output format (default: %(default)s); 16-bit inputs stay 16-bit only in PNG, "
                             "alpha is kept in PNG and WebP")
    parser.add_argument("--quality", type=int, default=95, help="JPEG / WebP quality, 1-100 (default: %(default)s)")
    parser.add_argument("--outscale", type=float, metavar="F",
                        help="final size = input size x F, resized from the model's output with bicubic "
                             "(default: the model's scale)")
    add_max_pixels_argument(parser)
    parser.add_argument("--trust", metavar="FILE",
                        help="a trust model (`xswinir trust fit`): also write <name>_trust.png (expected error per "
                             "patch) and <name>_trust.csv (patch box in output pixels, expected error, bound)")


def run(args: argparse.Namespace) -> int:
    # lazy: keeps torch off `xswinir --help`
    from tqdm import tqdm

    from xswinir.checkpoint import load_model
    from xswinir.export import OnnxModel
    from xswinir.images import ImageReadError
    from xswinir.inference import resolve_device
    from xswinir.restore import collect_inputs, plan_outputs, restore_file

    if not 1 <= args.quality <= 100:
        raise UserError(f"--quality {args.quality}: expected 1-100")
    if args.outscale is not None and not 0 < args.outscale <= 16:
        raise UserError(f"--outscale {args.outscale}: expected a factor above 0 and at most 16")
    apply_max_pixels(args)
    files = collect_inputs(args.inputs)
    device = resolve_device(args.device)
    if args.onnx:
        model = OnnxModel(args.onnx)  # runs on the CPU; its outputs come back on `device`
        model_cfg = model.cfg
    else:
        model, model_cfg = load_model(args.checkpoint, preset=args.preset)
        model = model.to(device).eval()
    trust = search = None
    if args.trust:
        # lazy, and only with --trust: the trust model's imports (pyarrow, kornia) cost half a second
        from xswinir.trust import TrustError, load_trust, write_trust_map

        trust = load_trust(args.trust)
        if trust.scale != model_cfg.upscale:
            raise TrustError(f"{printable_path(args.trust)} was fitted for x{trust.scale}, the model is "
                             f"x{model_cfg.upscale}")
        search = trust.load_search()
    out_dir = Path(args.out)
    scale = args.outscale if args.outscale is not None else model_cfg.upscale
    targets = plan_outputs(files, out_dir, scale, FORMATS[args.format])
    processed, skipped, notes = 0, [], []
    for (path, _), target in tqdm(list(zip(files, targets, strict=True)), desc="upscale", unit="image",
                                  disable=None):
        if target.exists() and not args.overwrite:
            skipped.append(f"{printable_path(path)}: {printable_path(target)} exists (pass --overwrite)")
            continue
        try:
            restored = restore_file(model, path, target, model_cfg.in_chans, tile=args.tile or None,
                                    overlap=args.overlap, self_ensemble=args.self_ensemble, outscale=args.outscale,
                                    quality=args.quality, device=device)
        except ImageReadError as err:
            skipped.append(str(err))
            continue
        if trust is not None:
            write_trust_map(trust, search, model, path, target, model_cfg.in_chans,
                            size=tuple(restored.image.shape[-2:]), tile=args.tile or None, overlap=args.overlap,
                            device=device)
        if restored.alpha is not None and args.format == "jpeg":
            notes.append(f"{printable_path(path)}: JPEG has no alpha channel, its transparency is dropped")
        processed += 1
    print(f"{_summary(processed, skipped, notes)}\noutputs in {printable_path(out_dir)}")
    return 1 if skipped else 0


def _summary(processed: int, skipped: list[str], notes: list[str]) -> str:
    """``processed N, skipped M``, then each skipped file's reason (on the same line when there is one) and notes."""
    message = f"processed {processed}, skipped {len(skipped)}"
    if len(skipped) == 1:
        message += f": {skipped[0]}"
    elif skipped:
        message += ":\n" + "\n".join(f"  {reason}" for reason in skipped)
    return message + "".join(f"\nnote: {note}" for note in notes)
