"""The ``xswinir`` command. Each sub-command lives in its own module of this package.

A sub-command module defines ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``, and
imports its heavy dependencies inside ``run`` so that ``xswinir --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from xswinir.errors import UserError

# Order as shown in --help: the main job first.
COMMANDS = ("demo", "train", "eval", "upscale", "export", "explain", "texture", "trust", "pack", "tune", "study",
            "submit")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xswinir", description="SwinIR image restoration with an explainable texture loss."
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging and full tracebacks")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"xswinir.cli.{name}")
        sub = subparsers.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(sub)
        sub.set_defaults(handler=module.run)
    return parser


class _ConsoleFormatter(logging.Formatter):
    """Our progress and results as plain lines; warnings and errors say what they are."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return message if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {message}"


def setup_logging(verbose: bool) -> None:
    """The console shows our own info lines and everyone's warnings; ``-v`` adds debug lines, logger names
    and Ray's own logs (which otherwise go to the run's log folder, see ``trainer.init_ray``)."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
                         if verbose else _ConsoleFormatter())
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, handlers=[handler])
    logging.getLogger("xswinir").setLevel(logging.DEBUG if verbose else logging.INFO)  # tune/ is xswinir.tune


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    try:
        return int(args.handler(args) or 0)
    except UserError as err:
        if args.verbose:
            raise
        print(f"xswinir {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"xswinir {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
