"""Image files <-> float tensors: reading (with the pixel limit, EXIF, 16-bit, alpha) and writing atomically.

Every image enters the project through :func:`read_image_data` (or :func:`decode_image_data` for bytes);
:func:`read_image` and :func:`decode_image` are the colour-only shortcuts. They turn anything a decoder can
throw (truncated or corrupt data, a format Pillow does not know, a header that declares more than
:func:`max_pixels` pixels) into :class:`ImageReadError` naming the file, before a large image is decoded.
Grayscale, palette, CMYK, 16-bit and alpha images all become float32 ``(C, H, W)`` tensors in [0, 1]; the
alpha channel and the bit depth travel beside the colour in :class:`ImageData`, and the EXIF orientation
is applied, so a phone photo comes out upright. :func:`write_image` writes 8- or 16-bit PNG, JPEG or WebP,
with alpha, atomically.
"""

from __future__ import annotations

import io
import re
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from xswinir.atomic import atomic_path
from xswinir.errors import UserError
from xswinir.paths import printable_path
from xswinir.pixel_limit import MAX_PIXELS_ENV, max_pixels


class ImageReadError(UserError, ValueError):
    """An image file that is missing, unreadable, not an image, or larger than :func:`max_pixels`."""


@dataclass
class ImageData:
    """A decoded image file.

    Attributes:
        image: ``(C, H, W)`` float32 in [0, 1]; C is 1 for grayscale files, 3 otherwise.
        alpha: ``(1, H, W)`` float32 in [0, 1], or None when the file has no transparency.
        bits: 16 for 16-bit files, else 8.
        format: Pillow's format name (``"PNG"``, ``"JPEG"``...).
    """

    image: torch.Tensor
    alpha: torch.Tensor | None
    bits: int
    format: str | None

    @property
    def gray(self) -> bool:
        return self.image.shape[0] == 1


# EXIF orientation -> the transform that shows the image upright, as PIL.ImageOps.exif_transpose applies it.
def _orient(x: torch.Tensor, orientation: int) -> torch.Tensor:
    """``(C, H, W)`` stored pixels -> upright pixels for an EXIF orientation tag (1-8; others: unchanged)."""
    if orientation == 2:
        return x.flip(-1)
    if orientation == 3:
        return x.flip(-2, -1)
    if orientation == 4:
        return x.flip(-2)
    if orientation == 5:
        return x.transpose(-2, -1)
    if orientation == 6:
        return torch.rot90(x, -1, (-2, -1))  # 90 degrees clockwise
    if orientation == 7:
        return x.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:
        return torch.rot90(x, 1, (-2, -1))
    return x


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(0x0112, 1))
    except Exception:  # a broken EXIF block: the pixels are still fine, show them as stored
        return 1


def _png_header(data: bytes) -> tuple[int, int] | None:
    """``(bit depth, colour type)`` of PNG data (IHDR is always the first chunk), or None."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) >= 26:
        return data[24], data[25]
    return None


def _png16_decoder():
    """``bytes -> (C, H, W) uint16`` with torchvision's libpng, which keeps 16-bit colour; None where this
    torchvision has none (Pillow then reads such files at 8 bits)."""
    try:
        from torchvision.io import ImageReadMode, decode_png
    except ImportError:
        return None
    return lambda data: decode_png(torch.frombuffer(bytearray(data), dtype=torch.uint8), ImageReadMode.UNCHANGED)


def _from_pillow(image: Image.Image) -> tuple[np.ndarray, np.ndarray | None, int]:
    """Colour ``(H, W, 1|3)`` (uint8, or float32 in [0, 1]), alpha ``(H, W)`` or None, and the bit depth."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        array = np.asarray(image, dtype=np.float64)
        # 16-bit PNGs arrive as I;16 (or I in older Pillow); an 8-bit range inside mode I is possible but rare.
        sixteen = mode.startswith("I;16") or array.max(initial=0) > 255
        return (array / (65535.0 if sixteen else 255.0)).astype(np.float32)[..., None], None, 16 if sixteen else 8
    if mode == "F":
        return np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)[..., None], None, 8
    has_alpha = mode in ("RGBA", "RGBa", "LA", "La", "PA") or (mode == "P" and "transparency" in image.info)
    if mode in ("1", "L", "LA", "La"):
        target = "LA" if has_alpha else "L"
    else:
        target = "RGBA" if has_alpha else "RGB"
    if mode != target:
        image = image.convert(target)
    array = np.asarray(image)  # uint8: the float copy is made once, channels first, by _planes
    if array.ndim == 2:
        array = array[..., None]
    if has_alpha:
        return array[..., :-1], array[..., -1], 8
    return array, None, 8


def _planes(array: np.ndarray) -> torch.Tensor:
    """``(H, W, C)`` uint8 or float32 -> ``(C, H, W)`` float32 in [0, 1], with one full-size float copy."""
    planes = torch.from_numpy(np.require(np.moveaxis(array, -1, 0), requirements=["C", "W"]))
    return planes.float().div_(255.0) if planes.dtype == torch.uint8 else planes


def decode_image_data(data: bytes, name: str = "<bytes>") -> ImageData:
    """Decodes encoded image bytes, checking the declared size against :func:`max_pixels` first.

    Args:
        data: the file's bytes.
        name: what error messages call it (pass it through :func:`xswinir.paths.printable_path`).

    Raises:
        ImageReadError: empty, truncated, corrupt or unknown data, more than :func:`max_pixels` pixels, or no
            pixels at all.
    """
    limit = max_pixels()
    if Image.MAX_IMAGE_PIXELS is not None and limit > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = limit  # the user raised our limit: Pillow's bomb check must not undercut it
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit below decides
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                if width * height > limit:
                    raise ImageReadError(
                        f"{name}: declares {width}x{height} = {width * height:,} pixels, over the limit of "
                        f"{limit:,} (set {MAX_PIXELS_ENV} to raise it)")
                if width < 1 or height < 1:
                    raise ImageReadError(f"{name}: image has no pixels")
                image_format = image.format
                png = _png_header(data)
                decode_png = _png16_decoder() if png is not None and png[0] == 16 and png[1] in (2, 4, 6) else None
                if decode_png is not None:
                    # Pillow reduces 16-bit RGB(A) and gray+alpha PNGs to 8 bits; libpng keeps all 16.
                    warnings.simplefilter("ignore", DeprecationWarning)  # torchvision.io points to torchcodec
                    raw = decode_png(data)
                    pixels = raw.to(torch.float32) / 65535.0  # (C, H, W), C = 2, 3 or 4
                    has_alpha = png[1] != 2
                    colour, alpha, bits = (pixels[:-1], pixels[-1:], 16) if has_alpha else (pixels, None, 16)
                    image.load()  # a PNG's eXIf chunk may follow the pixel data
                else:
                    image.load()
                    array, alpha_array, bits = _from_pillow(image)
                    colour = _planes(array)
                    alpha = None if alpha_array is None else _planes(alpha_array[..., None])
                orientation = _orientation(image)
    except ImageReadError:
        raise
    except Image.DecompressionBombError as err:  # Pillow's own guard, at twice its MAX_IMAGE_PIXELS
        declared = re.search(r"\((\d+) pixels\)", str(err))
        size = f"{int(declared.group(1)):,} pixels" if declared else "too many pixels"
        raise ImageReadError(f"{name}: declares {size}, over the limit of {limit:,} (set {MAX_PIXELS_ENV} to raise "
                             f"it)") from err
    except UnidentifiedImageError as err:
        raise ImageReadError(f"{name}: not a readable image (no image format Pillow knows)") from err
    except Exception as err:  # any decoder failure, Pillow's DecompressionBombError included, is this file's fault
        reason = str(err).strip() or type(err).__name__
        raise ImageReadError(f"{name}: not a readable image ({reason})") from err
    colour = _orient(colour, orientation).contiguous()
    alpha = None if alpha is None else _orient(alpha, orientation).contiguous()
    return ImageData(colour, alpha, bits, image_format)


def read_image_data(path: str | Path) -> ImageData:
    """Reads and decodes an image file (see :func:`decode_image_data`).

    Raises:
        ImageReadError: the file is missing, unreadable, truncated, corrupt, not an image or too large.
    """
    path = Path(path)
    name = printable_path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ImageReadError(f"{name}: cannot be read ({err.strerror or err})") from err
    return decode_image_data(data, name)


def to_channels(image: torch.Tensor, channels: int) -> torch.Tensor:
    """``(1 or 3, H, W)`` -> ``(channels, H, W)``: gray is replicated to RGB, RGB reduced to BT.601 luma."""
    if channels == 3 and image.shape[0] == 1:
        return image.expand(3, -1, -1).contiguous()
    if channels == 1 and image.shape[0] == 3:
        weights = torch.tensor([0.299, 0.587, 0.114], dtype=image.dtype).view(3, 1, 1)
        return (image * weights).sum(dim=0, keepdim=True)
    return image


def decode_image(data: bytes, name: str = "<bytes>", channels: int = 3) -> torch.Tensor:
    """Decodes encoded image bytes to a float32 ``(channels, H, W)`` tensor in [0, 1]; alpha is dropped.

    Raises:
        ImageReadError: as :func:`decode_image_data`.
    """
    return to_channels(decode_image_data(data, name).image, channels)


def read_image(path: str | Path, channels: int = 3) -> torch.Tensor:
    """Reads an image file as a float32 ``(channels, H, W)`` tensor in [0, 1]; alpha is dropped.

    Raises:
        ImageReadError: the file is missing, truncated, corrupt, not an image or over :func:`max_pixels`.
    """
    return to_channels(read_image_data(path).image, channels)


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """``(C, H, W)`` float in [0, 1] -> ``(H, W, C)`` uint8, rounded half up as MATLAB's ``im2uint8``."""
    array = image.detach().float().clamp(0, 1).mul(255.0).add(0.5).floor().to(torch.uint8).cpu().numpy()
    return array.transpose(1, 2, 0)


def to_uint16(image: torch.Tensor) -> np.ndarray:
    """``(C, H, W)`` float in [0, 1] -> ``(H, W, C)`` uint16, rounded half up."""
    array = image.detach().double().clamp(0, 1).mul(65535.0).add(0.5).floor().to(torch.int32).cpu().numpy()
    return array.astype(np.uint16).transpose(1, 2, 0)


def _png16_bytes(array: np.ndarray) -> bytes:
    """A 16-bit PNG of an ``(H, W, C)`` uint16 array, C = 1 (gray), 2 (gray+alpha), 3 (RGB) or 4 (RGBA).

    Pillow cannot write 16-bit colour PNGs, so this writes the file itself: every row with the "Up" filter
    (byte-wise difference from the row above), zlib-compressed.
    """
    h, w, c = array.shape
    rows = np.ascontiguousarray(array.astype(">u2")).view(np.uint8).reshape(h, w * c * 2)
    filtered = rows.copy()
    filtered[1:] -= rows[:-1]  # uint8 arithmetic wraps modulo 256, as the PNG filter does
    raw = np.concatenate([np.full((h, 1), 2, dtype=np.uint8), filtered], axis=1)
    compressed = zlib.compress(raw.tobytes(), 6)

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", w, h, 16, {1: 0, 2: 4, 3: 2, 4: 6}[c], 0, 0, 0)
    step = 1 << 24  # IDAT chunks of 16 MiB
    idat = b"".join(chunk(b"IDAT", compressed[i:i + step]) for i in range(0, max(1, len(compressed)), step))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + idat + chunk(b"IEND", b"")


# Pillow format name per output suffix; these are the formats write_image takes.
WRITE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP", ".tif": "TIFF",
                 ".tiff": "TIFF"}


def write_image(path: str | Path, image: torch.Tensor, overwrite: bool = False, *, alpha: torch.Tensor | None = None,
                bits: int = 8, quality: int | None = None) -> Path:
    """Writes a ``(C, H, W)`` tensor in [0, 1] atomically, as the suffix says (PNG, JPEG, WebP, BMP, TIFF).

    Args:
        path: the file; written as a temporary sibling and moved into place when complete.
        image: ``(1, H, W)`` gray or ``(3, H, W)`` RGB in [0, 1] (clipped).
        overwrite: replace an existing file (only once the new one is complete).
        alpha: ``(1, H, W)`` in [0, 1], stored as the alpha channel; formats without alpha (JPEG, BMP) drop it.
        bits: 16 writes a 16-bit PNG; other formats are always 8-bit.
        quality: JPEG / WebP quality, 1-100 (Pillow's default when None).

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
        ValueError: a suffix of none of the formats above.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{printable_path(path)} exists; pass overwrite to replace it")
    image_format = WRITE_FORMATS.get(path.suffix.lower())
    if image_format is None:
        raise ValueError(f"{printable_path(path)}: cannot write {path.suffix or 'files without a suffix'}; use one "
                         f"of {', '.join(WRITE_FORMATS)}")
    if alpha is not None and image_format in ("JPEG", "BMP"):
        alpha = None
    planes = image if alpha is None else torch.cat([image, alpha.to(image.dtype)], dim=0)
    with atomic_path(path) as tmp:
        if bits == 16 and image_format == "PNG":
            tmp.write_bytes(_png16_bytes(to_uint16(planes)))
        else:
            array = to_uint8(planes)
            options = {"quality": int(quality)} if quality is not None and image_format in ("JPEG", "WEBP") else {}
            Image.fromarray(array[..., 0] if array.shape[2] == 1 else array).save(tmp, format=image_format, **options)
    return path
