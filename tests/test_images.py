"""Reading and writing image files: modes, bit depth, alpha, EXIF orientation, size limits, atomic writes
(a failed write leaves the previous file)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from xswinir.errors import UserError
from xswinir.images import (
    ImageReadError,
    decode_image_data,
    read_image,
    read_image_data,
    to_channels,
    to_uint8,
    write_image,
)
from xswinir.paths import printable_path
from xswinir.pixel_limit import DEFAULT_MAX_PIXELS, MAX_PIXELS_ENV, max_pixels


def load_hostile_generator():
    """``tests/data/make_hostile_images.py`` as a module (tests/ is not a package)."""
    import importlib.util
    import sys

    name = "make_hostile_images"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).parent / "data" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name]


def _png(array: np.ndarray, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", **options)
    return buffer.getvalue()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pillow_exif_transpose(orientation: int) -> None:
    stored = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3) * 3
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _png(stored, exif=exif.tobytes())
    reference = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))))
    upright = to_uint8(decode_image_data(data).image)
    assert upright.shape == reference.shape and (upright == reference).all()


def test_16_bit_rgb_png_keeps_16_bits_and_alpha(tmp_path: Path, generator: torch.Generator) -> None:
    rgb, alpha = torch.rand(3, 9, 7, generator=generator), torch.rand(1, 9, 7, generator=generator)
    path = write_image(tmp_path / "deep.png", rgb, alpha=alpha, bits=16)
    assert path.read_bytes()[24:26] == bytes([16, 6])  # IHDR: 16 bits, colour type RGBA
    data = read_image_data(path)
    assert data.bits == 16 and data.image.shape == (3, 9, 7) and data.alpha.shape == (1, 9, 7)
    # Within half a 16-bit step: far finer than the 8-bit grid (1/255) that Pillow alone would give.
    torch.testing.assert_close(data.image, rgb, atol=0.5 / 65535 + 1e-7, rtol=0)
    torch.testing.assert_close(data.alpha, alpha, atol=0.5 / 65535 + 1e-7, rtol=0)
    gray = write_image(tmp_path / "gray16.png", rgb[:1], bits=16)
    assert Image.open(gray).mode == "I;16" and read_image_data(gray).bits == 16


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_alpha_is_read_beside_the_colour(mode: str) -> None:
    rgba = np.zeros((6, 5, 4), np.uint8)
    rgba[..., :3] = 90
    rgba[..., 3] = np.arange(30, dtype=np.uint8).reshape(6, 5) * 8
    image = Image.fromarray(rgba, "RGBA")
    if mode == "P":
        image = image.convert("RGB").convert("P")
        image.info["transparency"] = 0
        data = decode_image_data(_pil_bytes(image, transparency=0))
    else:
        data = decode_image_data(_pil_bytes(image.convert(mode)))
    assert data.alpha is not None and data.alpha.shape == (1, 6, 5)
    assert data.gray == (mode == "LA") and data.bits == 8
    if mode != "P":
        assert to_uint8(data.alpha)[..., 0].tolist() == rgba[..., 3].tolist()


def _pil_bytes(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **options)
    return buffer.getvalue()


@pytest.mark.parametrize("mode, channels", [("1", 1), ("L", 1), ("I;16", 1), ("CMYK", 3), ("RGB", 3), ("P", 3)])
def test_modes_decode_to_gray_or_rgb(mode: str, channels: int) -> None:
    base = Image.fromarray(np.random.default_rng(0).integers(0, 256, (5, 6, 3), dtype=np.uint8))
    image = Image.fromarray(np.full((5, 6), 30000, np.uint16)) if mode == "I;16" else base.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG" if mode == "CMYK" else "PNG")
    data = decode_image_data(buffer.getvalue())
    assert data.image.shape == (channels, 5, 6) and data.image.dtype == torch.float32
    assert 0 <= data.image.min() and data.image.max() <= 1 and data.alpha is None
    assert read_image_tensor_channels(buffer.getvalue()) == (3, 1)


def read_image_tensor_channels(data: bytes) -> tuple[int, int]:
    from xswinir.images import decode_image

    return decode_image(data, channels=3).shape[0], decode_image(data, channels=1).shape[0]


def test_every_decoder_failure_is_an_image_read_error_naming_the_file(tmp_path: Path) -> None:
    valid = _png(np.zeros((40, 40, 3), np.uint8) + 7)
    flipped = bytearray(valid)
    flipped[45:60] = bytes(15)
    for name, data in {"empty.png": b"", "text.png": b"not a picture", "cut.png": valid[:50],
                       "flipped.png": bytes(flipped), "header_only.png": valid[:33]}.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ImageReadError, match=name):
            read_image(tmp_path / name)
    with pytest.raises(ImageReadError, match="missing.png: cannot be read"):
        read_image(tmp_path / "missing.png")


def test_pixel_limit_refuses_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    png_declaring = load_hostile_generator().png_declaring
    monkeypatch.delenv(MAX_PIXELS_ENV, raising=False)
    assert max_pixels() == DEFAULT_MAX_PIXELS
    # 20000 x 20000 declared by 150 bytes: over Pillow's own bomb limit too, but named as ours.
    with pytest.raises(ImageReadError, match=r"bomb.png: declares 400,000,000 pixels, over the limit of 64,000,000"):
        decode_image_data(png_declaring(20000, 20000), "bomb.png")
    with pytest.raises(ImageReadError, match=r"9000x8000 = 72,000,000 pixels.*XSWINIR_MAX_PIXELS"):
        decode_image_data(png_declaring(9000, 8000), "big.png")
    small = _png(np.zeros((20, 30), np.uint8))
    monkeypatch.setenv(MAX_PIXELS_ENV, "599")
    with pytest.raises(ImageReadError, match="600 pixels, over the limit of 599"):
        decode_image_data(small, "small.png")
    monkeypatch.setenv(MAX_PIXELS_ENV, "600")
    assert decode_image_data(small).image.shape == (1, 20, 30)
    monkeypatch.setenv(MAX_PIXELS_ENV, "lots")
    with pytest.raises(UserError, match="XSWINIR_MAX_PIXELS='lots'"):
        decode_image_data(small)


def test_non_utf8_names_print_and_are_read(tmp_path: Path) -> None:
    name = os.fsdecode(b"caf\xe9 photo.png")
    path = tmp_path / name
    path.write_bytes(_png(np.zeros((4, 4, 3), np.uint8)))
    assert printable_path(path).endswith("caf\\xe9 photo.png")
    printable_path(path).encode("utf-8")  # never a UnicodeEncodeError
    assert read_image(path).shape == (3, 4, 4)
    (tmp_path / "broken \udce9.png").write_bytes(b"junk")
    with pytest.raises(ImageReadError) as err:
        read_image(tmp_path / "broken \udce9.png")
    str(err.value).encode("utf-8")


def test_write_image_formats_quality_and_alpha(tmp_path: Path, generator: torch.Generator) -> None:
    image, alpha = torch.rand(3, 32, 32, generator=generator), torch.rand(1, 32, 32, generator=generator)
    low = write_image(tmp_path / "low.jpg", image, quality=20)
    high = write_image(tmp_path / "high.jpg", image, quality=95)
    assert low.stat().st_size < high.stat().st_size and Image.open(high).format == "JPEG"
    assert read_image_data(low).alpha is None  # JPEG has no alpha channel
    webp = read_image_data(write_image(tmp_path / "a.webp", image, alpha=alpha, quality=90))
    assert webp.format == "WEBP" and webp.alpha is not None
    with pytest.raises(FileExistsError):
        write_image(tmp_path / "a.webp", image)
    with pytest.raises(ValueError, match="cannot write .gif"):
        write_image(tmp_path / "a.gif", image)


def test_write_image_failure_leaves_the_previous_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_image(tmp_path / "out.png", torch.zeros(3, 4, 4))
    before = path.read_bytes()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        write_image(path, torch.ones(3, 4, 4), overwrite=True)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["out.png"]


def test_to_channels() -> None:
    gray = torch.full((1, 2, 3), 0.5)
    assert to_channels(gray, 3).shape == (3, 2, 3) and to_channels(gray, 1) is gray
    torch.testing.assert_close(to_channels(to_channels(gray, 3), 1), gray)
