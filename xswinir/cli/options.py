"""Options shared by several commands, added to their parsers and applied once their arguments are parsed.

Kept light (no torch, no Pillow): every command's parser is built when ``xswinir --help`` runs.
"""

from __future__ import annotations

import argparse
import os

from xswinir.errors import UserError
from xswinir.pixel_limit import DEFAULT_MAX_PIXELS, MAX_PIXELS_ENV


def add_max_pixels_argument(parser: argparse.ArgumentParser) -> None:
    """The ``--max-pixels N`` option of the commands that read user images."""
    parser.add_argument("--max-pixels", type=int, metavar="N",
                        help=f"skip images whose header declares more than N pixels, before decoding them "
                             f"(default: ${MAX_PIXELS_ENV} or {DEFAULT_MAX_PIXELS:,})")


def apply_max_pixels(args: argparse.Namespace) -> None:
    """Makes ``--max-pixels`` the limit of this process and of the processes it starts (via the environment).

    Raises:
        UserError: a value below 1.
    """
    value = getattr(args, "max_pixels", None)
    if value is None:
        return
    if value < 1:
        raise UserError(f"--max-pixels {value}: expected a positive number of pixels")
    os.environ[MAX_PIXELS_ENV] = str(value)
