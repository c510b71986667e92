"""``xswinir upscale``: run a checkpoint on image files or folders and write PNG, JPEG or WebP files.

Each input becomes ``<stem>_x{s}.<format>`` (``<stem>_restored.<format>`` for an upscale-1 model) in
``--out``; files found inside a folder keep their sub-folder there. Two inputs that would get the same
output name (``a.png`` and ``a.jpg``) both carry their source extension instead (``a_png_x2.png``,
``a_jpg_x2.png``). A file that cannot be read (corrupt, truncated, over the pixel limit), or whose output
exists without ``--overwrite``, is skipped, named and counted, the others are still processed, and the exit
status is 1 if anything was skipped. Outputs are written to a temporary sibling and moved into place when
complete, so ``--overwrite`` keeps the old result until the new one exists.

What comes in goes out: a grayscale input (replicated to RGB for an RGB model) is written as grayscale, a
16-bit PNG as a 16-bit PNG, and an alpha channel is up-sampled on its own (bicubic) and kept, except in
JPEG, which has none. The EXIF orientation is applied on reading, so outputs are upright.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from xswinir.errors import UserError
from xswinir.pixel_limit import add_max_pixels_argument, apply_max_pixels

HELP = "upscale/restore image files or folders with a checkpoint, writing PNG (default), JPEG or WebP"

FORMATS = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders (searched recursively)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help=".safetensors, training checkpoint folder, or .pth")
    source.add_argument("--onnx", metavar="FILE", help="an `xswinir export --format onnx` file, run with ONNX Runtime "
                        "on the CPU through the same tiler")
    parser.add_argument("--preset", help="architecture of a published .pth checkpoint (e.g. swinir-s-x2)")
    parser.add_argument("--out", default="results",
                        help="output folder (default: %(default)s); each input gives <stem>_x<scale>.<format>, and "
                             "inputs that would share a name (a.png, a.jpg) carry their extension (a_png_x2.png)")
    parser.add_argument("--tile", type=int, default=256,
                        help="LR tile size, bounds memory; 0 runs whole images (default: %(default)s)")
    parser.add_argument("--overlap", type=int, default=32, help="LR pixels shared by neighbouring tiles (%(default)s)")
    parser.add_argument("--self-ensemble", action="store_true", help="average over 8 flips/transposes (x8 time)")
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
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: %(default)s)")


def collect_inputs(inputs: list[str]) -> list[tuple[Path, Path]]:
    """``(file, relative output folder)`` for every input; folders are searched recursively.

    Raises:
        UserError: an input that does not exist, or a folder without images.
    """
    from xswinir.images import printable_path, resolve_image_files

    files: list[tuple[Path, Path]] = []
    for text in inputs:
        path = Path(text).expanduser()
        if path.is_dir():
            try:
                found = resolve_image_files(path)
            except FileNotFoundError as err:
                raise UserError(printable_path(str(err))) from err
            files.extend((f, f.parent.relative_to(path)) for f in found)
        elif path.is_file():
            files.append((path, Path()))
        else:
            raise UserError(f"{printable_path(path)} does not exist")
    return list(dict.fromkeys(files))  # the same file named twice is processed once


def output_name(path: Path, scale: float, suffix: str = ".png", with_source_suffix: bool = False) -> str:
    """``<stem>_x{scale}<suffix>``, or ``<stem>_restored<suffix>`` for ``scale == 1``.

    ``with_source_suffix`` puts the input's extension into the name (``a.jpg`` -> ``a_jpg_x2.png``), which
    keeps inputs that differ only in their extension apart.
    """
    stem = f"{path.stem}_{path.suffix.lstrip('.').lower()}" if with_source_suffix and path.suffix else path.stem
    if scale == 1:
        return f"{stem}_restored{suffix}"
    text = f"{scale:g}" if isinstance(scale, float) else str(scale)
    return f"{stem}_x{text}{suffix}"


def plan_outputs(files: list[tuple[Path, Path]], out_dir: Path, scale: float, suffix: str) -> list[Path]:
    """The output path of every input: unique, also on case-insensitive file systems.

    Inputs that would share a name get their source extension in it; a clash left after that is an error.

    Raises:
        UserError: two inputs still map to one output.
    """
    from collections import Counter

    from xswinir.images import printable_path

    def key(target: Path) -> str:
        return str(target).casefold()

    plain = [out_dir / subdir / output_name(path, scale, suffix) for path, subdir in files]
    counts = Counter(key(t) for t in plain)
    targets = [out_dir / subdir / output_name(path, scale, suffix, with_source_suffix=True)
               if counts[key(t)] > 1 else t for (path, subdir), t in zip(files, plain, strict=True)]
    seen: dict[str, Path] = {}
    for (path, _), target in zip(files, targets, strict=True):
        if key(target) in seen:
            raise UserError(f"{printable_path(seen[key(target)])} and {printable_path(path)} would both be written "
                            f"to {printable_path(target)}; rename one or upscale them into different --out folders")
        seen[key(target)] = path
    return targets


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from xswinir.checkpoint import load_model
    from xswinir.images import ImageReadError, printable_path, read_image_data, to_channels, write_image
    from xswinir.inference import resolve_device, restore
    from xswinir.resize import imresize

    if not 1 <= args.quality <= 100:
        raise UserError(f"--quality {args.quality}: expected 1-100")
    if args.outscale is not None and not 0 < args.outscale <= 16:
        raise UserError(f"--outscale {args.outscale}: expected a factor above 0 and at most 16")
    apply_max_pixels(args)
    files = collect_inputs(args.inputs)
    device = resolve_device(args.device)
    if args.onnx:
        from xswinir.export import OnnxModel

        model = OnnxModel(args.onnx)  # runs on the CPU; its outputs come back on `device`
        cfg = model.cfg
    else:
        model, cfg = load_model(args.checkpoint, preset=args.preset)
        model = model.to(device).eval()
    out_dir = Path(args.out)
    tile = args.tile or None
    scale = args.outscale if args.outscale is not None else cfg.upscale
    targets = plan_outputs(files, out_dir, scale, FORMATS[args.format])
    processed, skipped, notes = 0, [], []
    for (path, _), target in tqdm(list(zip(files, targets, strict=True)), desc="upscale", unit="image",
                                  disable=None):
        if target.exists() and not args.overwrite:
            skipped.append(f"{printable_path(path)}: {printable_path(target)} exists (pass --overwrite)")
            continue
        try:
            data = read_image_data(path)
        except ImageReadError as err:
            skipped.append(str(err))
            continue
        lq = to_channels(data.image, cfg.in_chans).to(device)
        sr = restore(model, lq[None], tile=tile, overlap=args.overlap, self_ensemble=args.self_ensemble)
        h, w = data.image.shape[-2:]
        if args.outscale is not None:
            size = (max(1, round(h * args.outscale)), max(1, round(w * args.outscale)))
            if tuple(sr.shape[-2:]) != size:
                sr = imresize(sr, size=size)
        sr = sr[0].clamp(0, 1).cpu()
        if data.gray:
            sr = to_channels(sr, 1)  # a gray input was replicated to RGB for the model; write back what came in
        alpha = None
        if data.alpha is not None:
            # Alpha is not an image the model knows: bicubic up-sampling on its own, to the output size.
            alpha = imresize(data.alpha, size=tuple(sr.shape[-2:])).clamp(0, 1)
            if args.format == "jpeg":
                notes.append(f"{printable_path(path)}: JPEG has no alpha channel, its transparency is dropped")
        write_image(target, sr, overwrite=True, alpha=alpha, bits=data.bits if args.format == "png" else 8,
                    quality=args.quality)
        processed += 1
    message = f"processed {processed}, skipped {len(skipped)}"
    if len(skipped) == 1:
        message += f": {skipped[0]}"
    elif skipped:
        message += ":\n" + "\n".join(f"  {reason}" for reason in skipped)
    for note in notes:
        message += f"\nnote: {note}"
    print(f"{message}\noutputs in {printable_path(out_dir)}")
    return 1 if skipped else 0
