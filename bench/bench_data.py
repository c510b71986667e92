"""Data pipeline throughput, side by side in one process.

(a) The batched :class:`~xswinir.degradations.Degrader` against the same operations applied image by image
    in a Python loop (the Degrader called with batches of one), for the ``blur-noise`` and ``realistic``
    presets on 16 x 3 x 192 x 192 gt batches.
(b) Training batches cut from Parquet shards (plain pyarrow reader) against batches cut from the PNG files of
    a folder, with the decoded-image cache off so that every item is read and decoded; plus the start-up
    scan, which decodes every file of a folder but only reads the recorded sizes of shards.

    python -m bench.bench_data [--quick] [--device cuda]
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.common import measure, parse_args, print_table, write_json
from xswinir.config import DEGRADATION_PRESETS
from xswinir.data import PatchCutter, PatchDataset, StepBatchSampler, collate, open_images
from xswinir.degradations import build_degrader, make_generator
from xswinir.shards import pack_images

SHARED_BSD = Path(__file__).resolve().parents[2] / "shared" / "data" / "BSD200"


def bench_degrader(device: str, batch: int, size: int, repeat: int) -> list[dict]:
    rows = []
    gt = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    for preset in ("blur-noise", "realistic"):
        for scale in (2, 4):
            degrader = build_degrader(DEGRADATION_PRESETS[preset], scale).to(device)

            def batched(degrader=degrader):
                degrader(gt, make_generator(0, device))

            def looped(degrader=degrader):
                generator = make_generator(0, device)
                for i in range(batch):
                    degrader(gt[i:i + 1], generator)

            times = measure({"batched": batched, "loop": looped}, repeat=repeat, device=device)
            rows.append({
                "part": "degrade", "variant": f"{preset} x{scale}", "batched_per_s": batch / times["batched"],
                "loop_per_s": batch / times["loop"], "speedup": times["loop"] / times["batched"],
            })
    return rows


def _image_folder(root: Path, count: int) -> Path:
    """``count`` PNGs: BSD200 photographs when the shared data is there, else smooth random images."""
    folder = root / "png"
    folder.mkdir()
    if SHARED_BSD.is_dir():
        for path in sorted(SHARED_BSD.glob("*.png"))[:count]:
            shutil.copy(path, folder / path.name)
    rng = np.random.default_rng(0)
    for i in range(len(list(folder.iterdir())), count):
        base = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
        Image.fromarray(base).resize((480, 320), Image.BICUBIC).save(folder / f"synthetic{i:03d}.png")
    return folder


def bench_loading(count: int, batch: int, steps: int, repeat: int) -> list[dict]:
    root = Path(tempfile.mkdtemp(prefix="bench_data_"))
    try:
        folder = _image_folder(root, count)
        pack_images(folder, root / "shards", progress=False)
        cutter = PatchCutter(gt_size=96)
        start = time.perf_counter()
        files = PatchDataset(open_images(str(folder)), cutter, cache_mb=0)
        scan_files = time.perf_counter() - start
        start = time.perf_counter()
        shards = PatchDataset(open_images(str(root / "shards")), cutter, cache_mb=0)
        scan_shards = time.perf_counter() - start
        sampler = StepBatchSampler(len(files), batch, seed=0, rank=0)

        def batches(dataset: PatchDataset) -> None:
            for step in range(steps):
                collate([dataset[key] for key in sampler.batch(step)])

        times = measure({"files": lambda: batches(files), "shards": lambda: batches(shards)}, repeat=repeat)
        patches = batch * steps
        return [{
            "part": "load", "variant": f"{count} PNGs, batch {batch} x 96px",
            "batched_per_s": patches / times["shards"], "loop_per_s": patches / times["files"],
            "speedup": times["files"] / times["shards"],
        }, {
            "part": "scan", "variant": f"start-up check of {count} images (s)",
            "batched_per_s": scan_shards, "loop_per_s": scan_files, "speedup": scan_files / scan_shards,
        }]
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], "bench/results/bench_data.json")
    torch.manual_seed(0)
    rows = bench_degrader(args.device, batch=16, size=192, repeat=2 if args.quick else 10)
    rows += bench_loading(count=16 if args.quick else 64, batch=16, steps=2 if args.quick else 8,
                          repeat=3 if args.quick else 5)
    print_table(rows, "data pipeline: 'batched' = batched Degrader / Parquet shards, "
                      "'loop' = per-image loop / PNG folder (patches per second; scan rows: seconds)")
    write_json(args.json, "bench_data", rows, quick=args.quick, device=args.device)


if __name__ == "__main__":
    main()
