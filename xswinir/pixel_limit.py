"""The largest image any command decodes, checked on the file's header before decoding.

A small file can declare a huge image (a PNG of 120 KB holding 10000 x 10000 gray pixels, or a
"decompression bomb" declaring 20000 x 20000); decoding it, and the float copies made after, exhaust memory.
:func:`xswinir.images.decode_image_data` refuses (and the commands skip, naming it) any image over
:func:`max_pixels`. Light on purpose (no torch, no Pillow): the CLI's ``--max-pixels`` option
(:mod:`xswinir.cli.options`) describes its default from here while building the parser.
"""

from __future__ import annotations

import os

from xswinir.errors import UserError

# 64 MP holds a 48-MP phone photo; decoded as float32 RGB it takes 768 MB. Pillow's own guard (89 MP warns,
# 179 MP fails) is both later and higher than what the float copies after decoding can afford.
DEFAULT_MAX_PIXELS = 64_000_000
MAX_PIXELS_ENV = "XSWINIR_MAX_PIXELS"


def max_pixels() -> int:
    """The limit: ``$XSWINIR_MAX_PIXELS`` if set, else :data:`DEFAULT_MAX_PIXELS`.

    Raises:
        UserError: the variable is set but is not a positive whole number.
    """
    text = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        value = 0
    if value < 1:
        raise UserError(f"{MAX_PIXELS_ENV}={text!r}: expected a positive whole number of pixels")
    return value
