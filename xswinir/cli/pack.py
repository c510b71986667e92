"""``xswinir pack SRC OUT``: pack an image folder into Parquet shards for training from local disk or the cloud."""

from __future__ import annotations

import argparse
import os

HELP = "pack an image folder into Parquet shards (byte-identical on repeat) for data.train"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC", help="image folder, image file or skimage:NAMES")
    parser.add_argument("out", metavar="OUT", help="output folder for shard-00000.parquet, ...")
    parser.add_argument("--shard-size-mb", type=float, default=256.0,
                        help="close a shard once its images reach this many MiB (default: %(default)s)")
    parser.add_argument("--sub-image", type=int, default=None, metavar="PX",
                        help="cut every image into PX x PX sub-images stored as PNG, so that training decodes "
                             "small files (480 for DIV2K, as BasicSR)")
    parser.add_argument("--sub-image-step", type=int, default=None, metavar="PX",
                        help="distance between sub-images (default: half of --sub-image); keep PX + the "
                             "texture.region_size <= --sub-image so every search region fits in one")
    parser.add_argument("--lq", default=None, metavar="FOLDER",
                        help="LQ partners of the images, matched by file stem (name, namex2, name_x2): "
                             "shards for paired training")
    parser.add_argument("--scale", type=int, default=None, help="HR / LQ size ratio (with --lq)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="processes that decode and cut the images (default: %(default)s); the shards are the "
                             "same for any number")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace shards already in OUT (once the new ones are complete)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    # lazy: keeps pyarrow and torch off `xswinir --help`
    from xswinir.errors import UserError
    from xswinir.paths import filesystem_and_path, printable_path
    from xswinir.shards import pack_images

    if args.shard_size_mb <= 0:
        raise UserError(f"--shard-size-mb must be > 0, got {args.shard_size_mb}")
    if args.sub_image is not None and args.sub_image < 1:
        raise UserError(f"--sub-image must be >= 1, got {args.sub_image}")
    if args.sub_image_step is not None and args.sub_image is None:
        raise UserError("--sub-image-step needs --sub-image")
    if args.workers < 1:
        raise UserError(f"--workers must be >= 1, got {args.workers}")
    if args.scale is not None and args.scale < 1:
        raise UserError(f"--scale must be >= 1, got {args.scale}")
    try:
        summary = pack_images(args.src, args.out, shard_size_mb=args.shard_size_mb, overwrite=args.overwrite,
                              progress=not args.no_progress, sub_image=args.sub_image,
                              sub_step=args.sub_image_step, lq_source=args.lq, scale=args.scale,
                              workers=args.workers)
    except FileNotFoundError as err:
        raise UserError(printable_path(str(err))) from err
    print(summary)
    for path in summary.shards:  # local paths, or URIs when OUT is a bucket
        fs, where = filesystem_and_path(path)
        print(f"  {printable_path(path)} ({fs.get_file_info(where).size / 2**20:.1f} MiB)")
    print(f"train on them with: --set data.train={printable_path(args.out)}")
    return 0
