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


def add_inference_arguments(parser: argparse.ArgumentParser, tile_default: int | None, tile_help: str) -> None:
    """The options of the commands that run a model over whole images (``eval``, ``upscale``): the architecture
    of a ``.pth``, tiling, the x8 self-ensemble and the device."""
    parser.add_argument("--preset", help="architecture of a published .pth checkpoint (e.g. swinir-s-x2)")
    parser.add_argument("--tile", type=int, default=tile_default, help=tile_help)
    parser.add_argument("--overlap", type=int, default=32, help="LR pixels shared by neighbouring tiles (%(default)s)")
    parser.add_argument("--self-ensemble", action="store_true", help="average over 8 flips/transposes (x8 time)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: %(default)s)")


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
