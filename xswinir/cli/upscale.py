"""``xswinir upscale``: run a checkpoint on image files or folders and write PNGs.

Each input becomes ``<stem>_x{s}.png`` (``<stem>_restored.png`` for an upscale-1 model) in ``--out``; files
found inside a folder keep their sub-folder there. A file that cannot be read, or whose output exists
without ``--overwrite``, is skipped, named and counted, the others are still processed, and the exit
status is 1 if anything was skipped. Grayscale inputs through an RGB model are replicated to RGB and
written back as grayscale; RGBA loses its alpha and 16-bit inputs are written as 8-bit PNGs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from xswinir.errors import UserError

HELP = "upscale/restore image files or folders with a checkpoint, writing PNGs"

# PIL modes with one colour channel: these are written back as grayscale.
_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders (searched recursively)")
    parser.add_argument("--checkpoint", required=True, help=".safetensors, training checkpoint folder, or .pth")
    parser.add_argument("--preset", help="architecture of a published .pth checkpoint (e.g. swinir-s-x2)")
    parser.add_argument("--out", default="results", help="output folder (default: %(default)s)")
    parser.add_argument("--tile", type=int, default=256,
                        help="LR tile size, bounds memory; 0 runs whole images (default: %(default)s)")
    parser.add_argument("--overlap", type=int, default=32, help="LR pixels shared by neighbouring tiles (%(default)s)")
    parser.add_argument("--self-ensemble", action="store_true", help="average over 8 flips/transposes (x8 time)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: %(default)s)")


def collect_inputs(inputs: list[str]) -> list[tuple[Path, Path]]:
    """``(file, relative output folder)`` for every input; folders are searched recursively.

    Raises:
        UserError: an input that does not exist, or a folder without images.
    """
    from xswinir.images import resolve_image_files

    files: list[tuple[Path, Path]] = []
    for text in inputs:
        path = Path(text).expanduser()
        if path.is_dir():
            try:
                found = resolve_image_files(path)
            except FileNotFoundError as err:
                raise UserError(str(err)) from err
            files.extend((f, f.parent.relative_to(path)) for f in found)
        elif path.is_file():
            files.append((path, Path()))
        else:
            raise UserError(f"{path} does not exist")
    return files


def output_name(path: Path, scale: int) -> str:
    """``<stem>_x{scale}.png``, or ``<stem>_restored.png`` for ``scale == 1``."""
    return f"{path.stem}_x{scale}.png" if scale > 1 else f"{path.stem}_restored.png"


def is_grayscale_file(path: Path) -> bool:
    """Whether the file stores one colour channel; reads only the header (decoding is images.py's job)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.mode in _GRAY_MODES
    except Exception:  # unreadable: read_image reports it with its own message
        return False


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from xswinir.checkpoint import load_model
    from xswinir.images import ImageReadError, read_image, rgb_to_gray, write_image
    from xswinir.inference import resolve_device, restore

    files = collect_inputs(args.inputs)
    device = resolve_device(args.device)
    model, cfg = load_model(args.checkpoint, preset=args.preset)
    model = model.to(device).eval()
    out_dir = Path(args.out)
    tile = args.tile or None
    processed, skipped = 0, []
    for path, subdir in tqdm(files, desc="upscale", unit="image", disable=None):
        target = out_dir / subdir / output_name(path, cfg.upscale)
        if target.exists() and not args.overwrite:
            skipped.append(f"{path}: {target} exists (pass --overwrite)")
            continue
        try:
            gray_input = is_grayscale_file(path)
            lq = read_image(path, channels=cfg.in_chans).to(device)
        except ImageReadError as err:
            skipped.append(str(err))
            continue
        sr = restore(model, lq[None], tile=tile, overlap=args.overlap, self_ensemble=args.self_ensemble)[0]
        sr = sr.clamp(0, 1).cpu()
        if gray_input and sr.shape[0] == 3:
            # The gray image was replicated into RGB for the model; write back what came in.
            sr = torch.from_numpy(rgb_to_gray(sr.permute(1, 2, 0).numpy())).permute(2, 0, 1)
        write_image(target, sr, overwrite=True)
        processed += 1
    message = f"processed {processed}, skipped {len(skipped)}"
    if len(skipped) == 1:
        message += f": {skipped[0]}"
    elif skipped:
        message += ":\n" + "\n".join(f"  {reason}" for reason in skipped)
    print(f"{message}\noutputs in {out_dir}")
    return 1 if skipped else 0
