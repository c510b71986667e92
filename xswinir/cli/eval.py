"""``xswinir eval``: metrics of a model, or of bicubic up-sampling, on one or more HR test sets.

By default the LR inputs are made exactly as the official benchmark files were (MATLAB bicubic), so the
PSNR/SSIM columns compare with the papers'; ``--lr`` reads them from a folder, ``--degradation PRESET
--seed S`` makes seeded blurry/noisy inputs that every model sees identically. This module only parses
arguments and prints; the evaluation itself is :mod:`xswinir.evaluation`. Images that cannot be read or
are too small to measure at the scale are skipped and listed; the command fails only if none is left.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from xswinir.cli.options import add_inference_arguments, add_max_pixels_argument, apply_max_pixels
from xswinir.errors import UserError
from xswinir.paths import printable_path
from xswinir.storage import check_output_file, check_writable

HELP = "PSNR/SSIM, MS-SSIM, SCC and LPIPS of a checkpoint or of bicubic up-sampling on HR test sets"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hr", required=True, action="append",
                        help="ground-truth HR images: a folder, a file, skimage:NAMES or Parquet shards; repeat "
                             "for several sets")
    parser.add_argument("--lr", help="folder of LR inputs matched by file stem (baby.png <-> babyx2.png); "
                                     "default: MATLAB-bicubic down-sampling of the HR images")
    parser.add_argument("--degradation", metavar="PRESET",
                        help="make the inputs with this degradation preset (e.g. blur-noise), seeded per file "
                             "name, instead of MATLAB bicubic; excludes --lr")
    parser.add_argument("--seed", type=int, help="seed of --degradation (default: 0)")
    parser.add_argument("--save-lq", metavar="DIR",
                        help="write the LQ inputs as DIR/{stem}.png (DIR/{set}/{stem}.png for several --hr sets)")
    parser.add_argument("--scale", type=int, help="SR scale; default: the model's, or HR size / LR size")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--checkpoint", help="model to evaluate: .safetensors, training checkpoint folder, or .pth")
    what.add_argument("--bicubic", action="store_true",
                      help="evaluate plain MATLAB-bicubic up-sampling of the same inputs")
    add_inference_arguments(parser, None, "LR tile size for bounded memory (default: whole images)")
    parser.add_argument("--out", help="write the per-image results to this .csv or .json file (atomically)")
    add_max_pixels_argument(parser)


def _set_folder(source: str) -> str:
    """A folder name for one HR source: ``skimage:val`` -> ``skimage_val``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", source).strip("_.") or "set"


def _check_args(args: argparse.Namespace) -> None:
    """What the flags alone can tell, before a checkpoint is loaded; the routes are checked by the library."""
    from xswinir.evaluation import check_results_path  # lazy: keeps torch off `xswinir --help`

    if args.out:
        check_results_path(args.out)
        check_output_file(args.out, "--out")  # before any image is measured, as run.storage is checked
    if args.save_lq:
        check_writable(args.save_lq)
    if args.bicubic and (args.self_ensemble or args.preset):
        raise UserError("--self-ensemble and --preset need a --checkpoint")
    if args.seed is not None and not args.degradation:
        raise UserError("--seed only applies with --degradation")
    if args.lr and len(args.hr) > 1:
        raise UserError("--lr matches one HR set; give a single --hr with it")
    if len(set(args.hr)) < len(args.hr):
        raise UserError("the same --hr set is given twice")
    if args.save_lq and len({_set_folder(h) for h in args.hr}) < len(args.hr):
        raise UserError("--save-lq: two --hr sets would share a folder name; rename one")


def run(args: argparse.Namespace) -> int:
    # lazy: keeps torch off `xswinir --help`
    from xswinir.checkpoint import load_model
    from xswinir.evaluation import evaluate, format_table, write_results
    from xswinir.inference import resolve_device

    _check_args(args)
    apply_max_pixels(args)
    gt_sources, lq_dir = args.hr, args.lr  # --hr / --lr for users; gt / lq in the library
    device = resolve_device(args.device)
    seed = args.seed if args.seed is not None else 0
    model = None
    info: dict[str, Any] = {"hr": gt_sources, "lr": lq_dir, "degradation": args.degradation,
                            "seed": seed if args.degradation else None, "method": "bicubic"}
    if args.checkpoint:
        model, model_cfg = load_model(args.checkpoint, preset=args.preset)
        model = model.to(device).eval()
        info.update(method="model", checkpoint=args.checkpoint, preset=model_cfg.preset, tile=args.tile,
                    overlap=args.overlap, self_ensemble=args.self_ensemble)
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    for source in gt_sources:
        save_lq = None
        if args.save_lq:
            save_lq = Path(args.save_lq) / _set_folder(source) if len(gt_sources) > 1 else Path(args.save_lq)
        rows += evaluate(source, scale=args.scale, model=model, lq=lq_dir, tile=args.tile, overlap=args.overlap,
                         self_ensemble=args.self_ensemble, device=device, degradation=args.degradation, seed=seed,
                         save_lq=save_lq, set_name=printable_path(source), skipped=skipped)
    if not rows:
        first = f"; first: {skipped[0]}" if skipped else ""
        raise UserError(f"no image in {printable_path(', '.join(gt_sources))} could be measured ({len(skipped)} "
                        f"skipped{first})")
    info["scale"] = rows[0]["scale"]
    what = f"checkpoint {args.checkpoint}" if args.checkpoint else "bicubic"
    inputs = (f"degradation '{args.degradation}' seed {seed}" if args.degradation
              else "--lr folder" if lq_dir else "MATLAB bicubic")
    print(f"{what}, x{info['scale']}, {len(rows)} images, inputs: {inputs}, crop_border={info['scale']}, "
          f"device {device}")
    print(format_table(rows))
    if skipped:
        print(f"skipped {len(skipped)}:\n" + "\n".join(f"  {reason}" for reason in skipped))
    if args.save_lq:
        print(f"wrote the LQ inputs to {args.save_lq}")
    if args.out:
        print(f"wrote {printable_path(write_results(args.out, rows, info))}")
    return 0
