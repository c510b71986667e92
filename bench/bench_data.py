"""Data pipeline throughput, side by side in one process.

(a) The batched :class:`~xswinir.degradations.Degrader` against the same operations applied image by image
    in a Python loop (the Degrader called with batches of one), for the ``blur-noise`` and ``realistic``
    presets on 16 x 3 x 192 x 192 gt batches.
(b) Training patches per CPU core from Parquet shards of large (DIV2K-sized, 2040 x 1356) PNGs: one decode
    per crop from whole images (the data path before sub-images and multi-crop), against shards of 480-pixel
    sub-images (``xswinir pack --sub-image 480``) with ``data.crops_per_image`` crops per decode, with and
    without the sha256 check. Every variant runs the real dataset, sampler and collate in this process with
    one torch thread and the decoded-image cache off; the rate is patches per CPU-second of this process
    (``time.process_time``), so it holds on a busy machine. One GPU that trains at N patches/s needs about
    N / rate cores of DataLoader workers (``data.loader_workers``).

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
from xswinir.degradations import build_degrader
from xswinir.seeds import make_generator
from xswinir.shards import pack_images

SHARED_BSD = Path(__file__).resolve().parents[2] / "shared" / "data" / "BSD200"
LARGE = (2040, 1356)  # a DIV2K training image


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


def _large_images(folder: Path, count: int) -> Path:
    """``count`` 2040 x 1356 PNGs: mosaics of BSD200 photographs when the shared data is there (PNG decoding
    costs what it costs on photographs), else smooth random images."""
    folder.mkdir(parents=True)
    photos = sorted(SHARED_BSD.glob("*.png")) if SHARED_BSD.is_dir() else []
    rng = np.random.default_rng(0)
    for i in range(count):
        canvas = Image.new("RGB", LARGE)
        for k, (x, y) in enumerate((x, y) for y in range(0, LARGE[1], 321) for x in range(0, LARGE[0], 481)):
            if photos:
                tile = Image.open(photos[(i * 20 + k) % len(photos)]).convert("RGB")
                tile = tile if tile.size == (481, 321) else tile.transpose(Image.Transpose.TRANSPOSE)
            else:
                tile = Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).resize((481, 321),
                                                                                                  Image.BICUBIC)
            canvas.paste(tile, (x, y))
        canvas.save(folder / f"{i:04d}.png")
    return folder


def _cpu_seconds(dataset: PatchDataset, sampler: StepBatchSampler, steps: range) -> float:
    start = time.process_time()
    for step in steps:
        collate([dataset[key] for key in sampler.batch(step)])
    return time.process_time() - start


def bench_shards(count: int, batch: int, steps: int, repeat: int, gt_size: int = 128) -> list[dict]:
    root = Path(tempfile.mkdtemp(prefix="bench_data_"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core: DataLoader workers run one torch thread each
    try:
        folder = _large_images(root / "png", count)
        start = time.perf_counter()
        whole = pack_images(folder, root / "whole", progress=False)
        pack_whole = time.perf_counter() - start
        start = time.perf_counter()
        subs = pack_images(folder, root / "sub480", sub_image=480, sub_step=240, progress=False)
        pack_subs = time.perf_counter() - start
        cutter = PatchCutter(gt_size=gt_size)

        def dataset(name: str, verify: bool) -> PatchDataset:
            return PatchDataset(open_images(str(root / name), verify_checksums=verify), cutter, cache_mb=0)

        variants = [  # (label, shards, crops per decode, verify sha256)
            ("before: whole 2040x1356 PNGs, 1 crop per decode", "whole", 1, False),
            ("whole PNGs, 4 crops per decode", "whole", 4, True),
            ("480 px sub-images, 1 crop per decode", "sub480", 1, True),
            ("after: 480 px sub-images, 4 crops per decode", "sub480", 4, True),
            ("after, data.verify_checksums=false", "sub480", 4, False),
            ("480 px sub-images, 8 crops per decode", "sub480", 8, True),
        ]
        runs = []
        for _, name, crops, verify in variants:
            data = dataset(name, verify)
            runs.append((data, StepBatchSampler(len(data), batch, seed=0, rank=0, crops_per_image=crops)))
        seconds: list[list[float]] = [[] for _ in variants]
        for r in range(repeat):  # interleaved, so that machine noise hits every variant alike
            for i, (data, sampler) in enumerate(runs):
                seconds[i].append(_cpu_seconds(data, sampler, range(r * steps, (r + 1) * steps)))
        rows = [{"part": "load", "variant": label, "patches_per_core_s": batch * steps / float(np.median(s)),
                 "vs_before": None, "value": None} for (label, *_), s in zip(variants, seconds, strict=True)]
        for row in rows:
            row["vs_before"] = row["patches_per_core_s"] / rows[0]["patches_per_core_s"]
        mib = {name: sum(p.stat().st_size for p in (root / name).glob("*.parquet")) / 2**20
               for name in ("whole", "sub480")}
        rows += [
            {"part": "pack (s)", "variant": f"{count} images -> {whole.images} rows", "patches_per_core_s": None,
             "vs_before": None, "value": pack_whole},
            {"part": "pack (s)", "variant": f"{count} images -> {subs.images} sub-images of 480 px, step 240",
             "patches_per_core_s": None, "vs_before": pack_subs / pack_whole, "value": pack_subs},
            {"part": "shards (MiB)", "variant": "whole images", "patches_per_core_s": None, "vs_before": None,
             "value": mib["whole"]},
            {"part": "shards (MiB)", "variant": "sub-images", "patches_per_core_s": None,
             "vs_before": mib["sub480"] / mib["whole"], "value": mib["sub480"]},
        ]
        return rows
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], "bench/results/bench_data.json")
    torch.manual_seed(0)
    rows = bench_degrader(args.device, batch=16, size=192, repeat=2 if args.quick else 10)
    print_table(rows, "degradations: batched Degrader vs per-image loop (images per second)")
    shard_rows = bench_shards(count=2 if args.quick else 8, batch=64, steps=1 if args.quick else 2,
                              repeat=1 if args.quick else 3)
    print_table(shard_rows, "training patches (128 px) per CPU-second from shards of 2040x1356 PNGs; "
                            "vs_before: ratio to the first row")
    write_json(args.json, "bench_data", rows + shard_rows, quick=args.quick, device=args.device)


if __name__ == "__main__":
    main()
