"""Reading and writing image files as float tensors, and finding the images a source names.

Every image enters the project through :func:`read_image` or :func:`decode_image`: grayscale, palette,
RGBA (alpha dropped, as BasicSR's loaders do) and 16-bit files all become float32 ``(C, H, W)`` tensors in
[0, 1]. A file that cannot be decoded raises :class:`ImageReadError` naming it.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from xswinir.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

# Images inside the scikit-image wheel: real photographs and textures with nothing to download.
# The two default sets are disjoint, so validation never sees a training image.
SKIMAGE_FILES = {
    "astronaut": "astronaut.png",
    "coffee": "coffee.png",
    "rocket": "rocket.jpg",
    "immunohistochemistry": "ihc.png",
    "hubble_deep_field": "hubble_deep_field.jpg",
    "brick": "brick.png",
    "grass": "grass.png",
    "gravel": "gravel.png",
    "chelsea": "chelsea.png",
    "camera": "camera.png",
    "coins": "coins.png",
}
SKIMAGE_SETS = {
    "train": ("astronaut", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field", "brick", "grass",
              "gravel"),
    "val": ("chelsea", "camera", "coins"),
}


class ImageReadError(UserError, ValueError):
    """An image file that is missing, unreadable or not an image."""


def printable_path(path: str | Path | bytes) -> str:
    """A path as it can always be printed: bytes that are not valid UTF-8 appear as ``\\xNN`` escapes.

    POSIX file names are bytes; Python keeps undecodable ones as lone surrogates, which a UTF-8 console or log
    file refuses with ``UnicodeEncodeError``. Every message that names a user's file goes through this.
    """
    if isinstance(path, bytes):
        raw = path
    else:
        import os

        raw = os.fsencode(str(path))
    return raw.decode("utf-8", errors="backslashreplace")


def _to_tensor(image: Image.Image, channels: int, name: str) -> torch.Tensor:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        # 16-bit PNGs arrive as mode I or I;16; an 8-bit range inside mode I is possible but rare.
        peak = 65535.0 if array.max(initial=0) > 255 or image.mode.startswith("I;16") else 255.0
        array = (array / peak).astype(np.float32)[..., None]
    elif image.mode == "F":
        array = np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)[..., None]
    else:
        if image.mode not in ("L", "RGB"):
            image = image.convert("RGB" if image.mode in ("RGBA", "LA", "P", "PA", "CMYK", "YCbCr", "1") else "L")
        array = np.asarray(image, dtype=np.float32) / 255.0
        if array.ndim == 2:
            array = array[..., None]
    if array.shape[2] == 2:  # LA without conversion: drop alpha
        array = array[..., :1]
    if channels == 3 and array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    elif channels == 1 and array.shape[2] == 3:
        array = rgb_to_gray(array)
    if array.shape[0] < 1 or array.shape[1] < 1:
        raise ImageReadError(f"{name}: image has no pixels")
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def rgb_to_gray(array: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma of an (H, W, 3) array in [0, 1], as (H, W, 1)."""
    return (array @ np.array([0.299, 0.587, 0.114], dtype=array.dtype))[..., None]


def decode_image(data: bytes, name: str = "<bytes>", channels: int = 3) -> torch.Tensor:
    """Decodes encoded image bytes to a float32 ``(channels, H, W)`` tensor in [0, 1]."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return _to_tensor(image, channels, name)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        if isinstance(err, ImageReadError):
            raise
        raise ImageReadError(f"{name}: not a readable image ({err})") from err


def read_image(path: str | Path, channels: int = 3) -> torch.Tensor:
    """Reads an image file as a float32 ``(channels, H, W)`` tensor in [0, 1].

    Raises:
        ImageReadError: the file is missing, truncated, corrupt or not an image.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ImageReadError(f"{path}: cannot be read ({err.strerror or err})") from err
    return decode_image(data, str(path), channels)


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """``(C, H, W)`` float in [0, 1] -> ``(H, W, C)`` uint8, rounded half up as MATLAB's ``im2uint8``."""
    array = image.detach().float().clamp(0, 1).mul(255.0).add(0.5).floor().to(torch.uint8).cpu().numpy()
    return array.transpose(1, 2, 0)


def write_image(path: str | Path, image: torch.Tensor, overwrite: bool = False) -> Path:
    """Writes a ``(C, H, W)`` tensor in [0, 1] as an 8-bit image (PNG unless the suffix says otherwise).

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    array = to_uint8(image)
    Image.fromarray(array[..., 0] if array.shape[2] == 1 else array).save(path)
    return path


def skimage_data_dir() -> Path:
    import skimage

    return Path(skimage.__file__).parent / "data"


def absolute_source(source: str) -> str:
    """A source with its existing local paths made absolute (each part of a ``;`` list); URIs and
    ``skimage:`` names unchanged. Ray Tune trials run in their own working directory."""
    parts = []
    for part in source.split(";"):
        text = part.strip()
        local = text and "://" not in text and not text.startswith("skimage:")
        parts.append(str(Path(text).expanduser().resolve()) if local and Path(text).expanduser().exists() else text)
    return ";".join(parts)


def resolve_image_files(source: str | Path) -> list[Path]:
    """The image files a source names, sorted.

    Args:
        source: an image file, a folder (searched recursively for image suffixes), or
            ``skimage:NAME,...`` where a NAME is a key of ``SKIMAGE_FILES`` or of ``SKIMAGE_SETS``; several
            such sources joined by ``;`` (``T91;BSD200``) name all their files, in that order.

    Raises:
        FileNotFoundError: the source names nothing that exists.
    """
    text = str(source)
    if ";" in text:
        return [file for part in text.split(";") if part.strip() for file in resolve_image_files(part.strip())]
    if text.startswith("skimage:"):
        names: list[str] = []
        for name in filter(None, text[len("skimage:"):].split(",")):
            if name in SKIMAGE_SETS:
                names.extend(SKIMAGE_SETS[name])
            elif name in SKIMAGE_FILES:
                names.append(name)
            else:
                raise FileNotFoundError(
                    f"'{name}' is not an image shipped with scikit-image here; choose from "
                    f"{sorted(SKIMAGE_FILES)} or the sets {sorted(SKIMAGE_SETS)}"
                )
        return [skimage_data_dir() / SKIMAGE_FILES[name] for name in names]
    path = Path(text).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"{path} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
        return files
    raise FileNotFoundError(f"{path} does not exist")
