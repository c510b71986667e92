"""The ``xswinir`` command. Each sub-command lives in its own module of this package.

A sub-command module defines ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``, and
imports its heavy dependencies inside ``run`` so that ``xswinir --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys

from xswinir.errors import UserError

# Order as shown in --help: the main job first.
COMMANDS = ("demo", "train", "eval", "upscale", "explain", "texture", "pack", "tune", "study", "submit")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xswinir", description="SwinIR image restoration with an explainable texture loss."
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging and full tracebacks")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        if importlib.util.find_spec(f"xswinir.cli.{name}") is None:
            continue  # a sub-command under construction; tests/test_cli.py requires all of them
        module = importlib.import_module(f"xswinir.cli.{name}")
        sub = subparsers.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(sub)
        sub.set_defaults(handler=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
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
