"""Writes a corpus of hostile image files: what users' folders really hold. Generated, never checked in.

    python tests/data/make_hostile_images.py OUT_DIR

Valid files in every mode Pillow decodes (P with transparency, LA, RGBA, I;16, 16-bit RGB, CMYK, 1), files
that are truncated, empty, not images or lying about their size (a small PNG declaring 20000 x 20000, a real
10000 x 10000 gray PNG of a few hundred KB), EXIF-rotated photos, tiny images, and names that are not
UTF-8 or hold spaces and emoji. :func:`make_hostile_images` returns what each file is, so tests know what to
expect; :func:`hostile_png` builds one case from parameters (for property-based tests).
"""

from __future__ import annotations

import io
import os
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

OK, UNREADABLE, TOO_LARGE = "ok", "unreadable", "too large"


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_declaring(width: int, height: int, rows: int = 4) -> bytes:
    """A valid-looking 8-bit gray PNG whose header declares ``width x height`` but holds only ``rows`` rows."""
    data = zlib.compress(b"".join(b"\x00" + bytes(width) for _ in range(min(rows, height))))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


def huge_gray_png(side: int = 10000, value: int = 128) -> bytes:
    """A real, complete ``side x side`` gray PNG: a few hundred KB on disk, ``side**2`` pixels decoded."""
    row = b"\x00" + bytes([value]) * side
    compressor = zlib.compressobj(9)
    parts = [compressor.compress(row) for _ in range(side)]
    data = b"".join(parts) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


def png16_rgb(array: np.ndarray) -> bytes:
    """A 16-bit RGB PNG of an ``(H, W, 3)`` uint16 array (Pillow cannot write one)."""
    h, w, _ = array.shape
    raw = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(h))
    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b"")


def encode(mode: str, width: int, height: int, seed: int = 0, fmt: str = "PNG", orientation: int = 1) -> bytes:
    """A random image of a Pillow mode, encoded (16-bit RGB as ``mode="RGB;16"``)."""
    rng = np.random.default_rng(seed)
    if mode == "RGB;16":
        return png16_rgb(rng.integers(0, 65536, (height, width, 3), dtype=np.uint16))
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
    else:
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)
    if mode == "P":
        image.info["transparency"] = 0
    buffer = io.BytesIO()
    options = {}
    if orientation != 1:
        exif = Image.Exif()
        exif[0x0112] = orientation
        options["exif"] = exif.tobytes()
    if mode == "P" and fmt == "PNG":
        options["transparency"] = 0
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def hostile_png(mode: str, width: int, height: int, fault: str, seed: int = 0) -> tuple[bytes, str]:
    """One generated case and what a reader must make of it (:data:`OK`, :data:`UNREADABLE`, :data:`TOO_LARGE`).

    Args:
        mode: a Pillow mode (``"RGB"``, ``"P"``, ``"LA"``, ``"RGBA"``, ``"I;16"``, ``"CMYK"``, ``"1"``) or
            ``"RGB;16"``; CMYK is written as JPEG, the rest as PNG.
        fault: ``"none"``, ``"truncated"`` (cut in the middle), ``"garbage"`` (bytes flipped after the header),
            ``"empty"``, ``"bomb"`` (a header declaring 20000 x 20000).
    """
    if fault == "empty":
        return b"", UNREADABLE
    if fault == "bomb":
        return png_declaring(20000, 20000), TOO_LARGE
    data = encode(mode, width, height, seed, fmt="JPEG" if mode == "CMYK" else "PNG")
    if fault == "truncated":
        return data[: max(8, len(data) // 2)], UNREADABLE
    if fault == "garbage":
        rng = np.random.default_rng(seed)
        raw = bytearray(data)
        start = min(len(raw) - 1, 40)
        for i in rng.integers(start, len(raw), 16):
            raw[i] ^= 0xFF
        return bytes(raw), "unknown"  # flipped bytes may or may not break the decoder
    return data, OK


def make_hostile_images(folder: str | Path, with_huge: bool = True) -> dict[bytes, str]:
    """Writes the corpus into ``folder``; returns file name (bytes, as on disk) -> what it is."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cases: dict[bytes, tuple[bytes, str]] = {
        b"valid.png": (encode("RGB", 24, 20), OK),
        b"valid.jpg": (encode("RGB", 24, 20, fmt="JPEG"), OK),
        b"palette_transparent.png": (encode("P", 20, 18), OK),
        b"gray_alpha.png": (encode("LA", 18, 20), OK),
        b"rgba.png": (encode("RGBA", 20, 20), OK),
        b"gray16.png": (encode("I;16", 20, 22), OK),
        b"rgb16.png": (encode("RGB;16", 22, 20), OK),
        b"cmyk.jpg": (encode("CMYK", 20, 20, fmt="JPEG"), OK),
        b"bilevel.png": (encode("1", 24, 24), OK),
        b"exif_rotated.jpg": (encode("RGB", 24, 16, fmt="JPEG", orientation=6), OK),  # shows as 16 x 24
        b"tiny_1x1.png": (encode("RGB", 1, 1), OK),
        b"tiny_2x2.png": (encode("RGB", 2, 2), OK),
        b"truncated.png": (encode("RGB", 24, 20)[:60], UNREADABLE),
        b"truncated.jpg": (encode("RGB", 64, 64, fmt="JPEG")[:300], UNREADABLE),
        b"empty.png": (b"", UNREADABLE),
        b"not_an_image.png": (b"this is text, not a picture\n", UNREADABLE),
        b"bomb_20000x20000.png": (png_declaring(20000, 20000), TOO_LARGE),
        b"with space.png": (encode("RGB", 20, 20, seed=1), OK),
        "café 🙂.png".encode(): (encode("RGB", 20, 20, seed=2), OK),
        b"latin1_caf\xe9.png": (encode("RGB", 20, 20, seed=3), OK),  # not valid UTF-8
    }
    if with_huge:
        cases[b"huge_gray_10000x10000.png"] = (huge_gray_png(), TOO_LARGE)
    for name, (data, _) in cases.items():
        with open(os.path.join(os.fsencode(folder), name), "wb") as handle:
            handle.write(data)
    return {name: kind for name, (_, kind) in cases.items()}


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    for name, kind in make_hostile_images(sys.argv[1]).items():
        print(f"{kind:>10}  {name.decode('utf-8', errors='backslashreplace')}")
