"""Peak memory and time of ``xswinir eval --bicubic`` on one large image: this tree against an older one.

The call measured is :func:`xswinir.evaluation.evaluate` (the command's whole work: decode, MATLAB-bicubic
down- and up-sampling, PSNR/SSIM/MS-SSIM/SCC), with the same ``psnr_y`` from both trees as a check.

Each run is its own subprocess, so its peak resident memory (``ru_maxrss``) is its own. The image is smooth
random RGB (what a photo compresses like), written once. The reference tree is ``git archive REF xswinir`` into
a temporary folder, imported ahead of the installed package, so both sides run the same command on the same
file side by side. A run over ``--timeout`` seconds is stopped and reported as such.

    python -m bench.bench_memory [--quick] [--sizes 2000 4000] [--ref HEAD] [--ref-max-side 2000]

``--ref-max-side`` skips the reference tree above that side: the untiled code needs tens of GB there.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from bench.common import parse_args, print_table, write_json

REPO = Path(__file__).resolve().parents[1]

# Runs inside the subprocess: what `xswinir eval --hr IMAGE --scale S --bicubic` runs (the library call, so that
# the older tree needs none of this tree's CLI), then its own peak RSS.
CHILD = """
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
import xswinir
from xswinir.evaluation import evaluate
start = time.perf_counter()
rows = evaluate(sys.argv[2], scale=int(sys.argv[3]))
print(json.dumps({"rc": 0 if rows else 1, "seconds": time.perf_counter() - start, "package": xswinir.__file__,
                  "psnr_y": rows[0]["psnr_y"] if rows else None,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 4000], help="image sides (default: %(default)s)")
    parser.add_argument("--scale", type=int, default=2, help="SR scale (default: %(default)s)")
    parser.add_argument("--ref", default="HEAD", help="git revision to compare with (default: %(default)s)")
    parser.add_argument("--ref-max-side", type=int, default=2000,
                        help="largest side run with the reference tree (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per run (default: %(default)s)")


def write_photo_like(path: Path, side: int, seed: int = 0) -> None:
    """Smooth random RGB: a 1/16-resolution noise field up-sampled bilinearly, plus fine noise."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (side // 16 + 1, side // 16 + 1, 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((side, side), Image.BILINEAR), dtype=np.int16)
    noisy = np.clip(smooth + rng.integers(-8, 9, smooth.shape, dtype=np.int16), 0, 255).astype(np.uint8)
    Image.fromarray(noisy).save(path)


def run_eval(code_dir: Path, image: Path, scale: int, timeout: float) -> dict:
    argv = [sys.executable, "-c", CHILD, str(code_dir), str(image), str(scale)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"rc": None, "seconds": timeout, "peak_rss_mb": None, "note": "timed out"}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines or not lines[-1].startswith("{"):
        return {"rc": done.returncode, "seconds": None, "peak_rss_mb": None,
                "note": (done.stderr.strip().splitlines() or ["failed"])[-1][:120]}
    return json.loads(lines[-1])


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], "bench/results/bench_memory.json", add_arguments)
    sizes = [64, 1000] if args.quick else [64, *args.sizes]  # 64 px: the start-up baseline of each tree
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ref_dir = tmp / "ref"
        ref_dir.mkdir()
        archive = subprocess.run(["git", "archive", args.ref, "xswinir"], cwd=REPO, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(ref_dir)], input=archive.stdout, check=True)
        for side in sizes:
            image = tmp / f"photo_{side}.png"
            write_photo_like(image, side)
            for label, code_dir in (("this tree", REPO), (f"{args.ref}", ref_dir)):
                if code_dir == ref_dir and side > args.ref_max_side:
                    continue
                result = run_eval(code_dir, image, args.scale, args.timeout)
                row = {"code": label, "side": side, "megapixels": side * side / 1e6,
                       "peak_rss_mb": result.get("peak_rss_mb"), "seconds": result.get("seconds"),
                       "psnr_y": result.get("psnr_y"), "note": result.get("note", "")}
                rows.append(row)
                print(row, flush=True)
    for row in rows:  # memory above each tree's own start-up (the 64-px run)
        base = next((r["peak_rss_mb"] for r in rows if r["code"] == row["code"] and r["side"] == 64), None)
        row["above_startup_mb"] = (row["peak_rss_mb"] - base) if row["peak_rss_mb"] and base else None
        row["bytes_per_hr_pixel"] = (row["above_startup_mb"] * 2**20 / row["side"] ** 2
                                     if row["above_startup_mb"] and row["side"] > 64 else None)
    print_table(rows, f"xswinir eval --bicubic x{args.scale}: peak resident memory per run (own subprocess)")
    write_json(args.json, "bench_memory", rows, scale=args.scale, ref=args.ref)


if __name__ == "__main__":
    main()
