"""``xswinir pack SRC OUT``: pack an image folder into Parquet shards for training from local disk or the cloud."""

from __future__ import annotations

import argparse

HELP = "pack an image folder into Parquet shards (byte-identical on repeat) for data.train"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC", help="image folder, image file or skimage:NAMES")
    parser.add_argument("out", metavar="OUT", help="output folder for shard-00000.parquet, ...")
    parser.add_argument("--shard-size-mb", type=float, default=256.0,
                        help="close a shard once its images reach this many MiB (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace shards already in OUT")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from xswinir.errors import UserError
    from xswinir.shards import pack_images

    if args.shard_size_mb <= 0:
        raise UserError(f"--shard-size-mb must be > 0, got {args.shard_size_mb}")
    try:
        summary = pack_images(args.src, args.out, shard_size_mb=args.shard_size_mb, overwrite=args.overwrite,
                              progress=not args.no_progress)
    except FileNotFoundError as err:
        raise UserError(str(err)) from err
    print(summary)
    for path in summary.shards:
        print(f"  {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    print(f"train on them with: --set data.train={args.out}")
    return 0
