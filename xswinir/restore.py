"""Restoring image files: what comes in goes out, under names that never collide.

A grayscale input (replicated to RGB for an RGB model) is written as grayscale, a 16-bit PNG as a 16-bit
PNG, and an alpha channel is up-sampled on its own (bicubic) and kept, except in JPEG, which has none. The
EXIF orientation is applied on reading, so outputs are upright. ``outscale`` resizes the model's result
(bicubic) to ``input size x outscale``.

Each input becomes ``<stem>_x{s}<suffix>`` (``<stem>_restored<suffix>`` at scale 1); files found inside a
folder keep their sub-folder. Two inputs that would get the same output name (``a.png`` and ``a.jpg``) both
carry their source extension instead (``a_png_x2.png``, ``a_jpg_x2.png``), also on case-insensitive file
systems. Outputs are written atomically (:func:`xswinir.images.write_image`).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch
from torch import nn

from xswinir.errors import UserError
from xswinir.images import ImageData, read_image_data, to_channels, write_image
from xswinir.inference import restore
from xswinir.paths import printable_path
from xswinir.resize import imresize
from xswinir.sources import resolve_image_files


def collect_inputs(inputs: list[str]) -> list[tuple[Path, Path]]:
    """``(file, relative output folder)`` for every input; folders are searched recursively.

    Raises:
        UserError: an input that does not exist, or a folder without images.
    """
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
    """The output path of every input of :func:`collect_inputs`: unique, also on case-insensitive file systems.

    Inputs that would share a name get their source extension in it; a clash left after that is an error.

    Raises:
        UserError: two inputs still map to one output.
    """

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


def restore_image(
    model: nn.Module,
    data: ImageData,
    in_chans: int,
    *,
    tile: int | None = None,
    overlap: int = 32,
    self_ensemble: bool = False,
    outscale: float | None = None,
    device: str | torch.device = "cpu",
) -> ImageData:
    """The restored image, with the input's channels, alpha and bit depth.

    Args:
        model: a restoration model in eval mode that takes ``(1, in_chans, h, w)`` on ``device``.
        data: the decoded input (:func:`xswinir.images.read_image_data`).
        in_chans: the model's input channels: a gray input is replicated to RGB for it.
        tile: LQ tile size for :func:`xswinir.inference.restore`; None runs the whole image.
        overlap: LQ pixels shared by neighbouring tiles.
        self_ensemble: average over the 8 flips and transposes.
        outscale: final size = input size x this, resized from the model's output with MATLAB bicubic;
            None keeps the model's scale.
        device: where the model runs.

    Returns:
        ``image`` ``(C, H', W')`` on CPU in [0, 1] with the input's C (1 or 3); ``alpha`` the input's alpha
        up-sampled to ``(1, H', W')`` (or None); ``bits`` the input's; ``format`` None (not encoded yet).
    """
    lq = to_channels(data.image, in_chans).to(device)
    sr = restore(model, lq[None], tile=tile, overlap=overlap, self_ensemble=self_ensemble)
    if outscale is not None:
        h, w = data.image.shape[-2:]
        size = (max(1, round(h * outscale)), max(1, round(w * outscale)))
        if tuple(sr.shape[-2:]) != size:
            sr = imresize(sr, size=size)
    sr = sr[0].clamp(0, 1).cpu()
    if data.gray:
        sr = to_channels(sr, 1)  # replicated to RGB for the model; written back as it came in
    alpha = None
    if data.alpha is not None:
        # Alpha is not an image the model knows: bicubic up-sampling on its own, to the output size.
        alpha = imresize(data.alpha, size=tuple(sr.shape[-2:])).clamp(0, 1)
    return ImageData(sr, alpha, data.bits, None)


def restore_file(
    model: nn.Module,
    path: str | Path,
    target: str | Path,
    in_chans: int,
    *,
    tile: int | None = None,
    overlap: int = 32,
    self_ensemble: bool = False,
    outscale: float | None = None,
    quality: int | None = None,
    device: str | torch.device = "cpu",
) -> ImageData:
    """Reads ``path``, restores it with :func:`restore_image` and writes ``target`` (replacing it atomically).

    Args:
        model: as :func:`restore_image` takes it.
        path: the input image file.
        target: the output file; its suffix picks the format. 16-bit stays 16-bit in PNG only; alpha is kept
            except in JPEG and BMP.
        in_chans: the model's input channels.
        tile, overlap, self_ensemble, outscale, device: as :func:`restore_image` takes them.
        quality: JPEG / WebP quality, 1-100 (Pillow's default when None).

    Returns:
        What was written, before encoding (its ``alpha`` is what JPEG drops).

    Raises:
        ImageReadError: ``path`` cannot be read (corrupt, truncated, over the pixel limit).
    """
    restored = restore_image(model, read_image_data(path), in_chans, tile=tile, overlap=overlap,
                             self_ensemble=self_ensemble, outscale=outscale, device=device)
    write_image(target, restored.image, overwrite=True, alpha=restored.alpha, bits=restored.bits, quality=quality)
    return restored
