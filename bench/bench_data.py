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

(c) The growth table: patches per CPU-second and peak RSS of one training worker for 1x, 10x and 30x a
    DIV2K-like synthetic set (shards of random-textured 480 px PNG sub-images, 64 MiB at 1x; the 30x set,
    ~2 GB, lives under the temporary folder and is deleted after), today's in-memory path
    (:class:`~xswinir.shards.ShardImages`) against the rank-partitioned stream (:mod:`xswinir.stream`), each
    measured in a fresh process (its peak RSS, ``VmHWM``) with the real dataset, sampler and collate and one
    torch thread, each twice, alternated (the best rate, the highest peak); ``--ray-data`` adds Ray Data's
    ``streaming_split`` on the 1x set (its reads run in Ray's processes, which neither figure counts).

    python -m bench.bench_data [--quick] [--device cuda] [--growth-only] [--ray-data]
"""

from __future__ import annotations

import hashlib
import io
import multiprocessing
import resource
import shutil
import tempfile
import time
from pathlib import Path
from queue import Empty

import numpy as np
import torch
from PIL import Image

from bench.common import measure, parse_args, print_table, write_json
from xswinir.config import DEGRADATION_PRESETS
from xswinir.data import PatchCutter, PatchDataset, StepBatchSampler, collate, open_images
from xswinir.degradations import build_degrader
from xswinir.seeds import make_generator
from xswinir.shards import ROW_GROUP_ROWS, SCHEMA, ShardImages, pack_images
from xswinir.stream import ShardIndex, ShardStream, StreamDataset

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


GROWTH_MB = 64  # the 1x set; DIV2K's 480 px sub-images are ~3.4 GiB, so 1x is DIV2K / 54 to keep 30x on disk
GROWTH = (1, 10, 30)


def _textured_pngs(count: int, size: int = 480) -> list[bytes]:
    """``count`` random-textured PNGs: coarse random structure plus fine noise, so that they compress (and
    decode) about as photographs do, ~0.4 MB each."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8))
        image = np.asarray(coarse.resize((size, size), Image.BICUBIC), dtype=np.int16)
        image = np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG", compress_level=3)
        out.append(buffer.getvalue())
    return out


def _synthetic_shards(folder: Path, megabytes: float, pool: list[bytes], shard_mb: float = 256.0) -> int:
    """Shards as ``xswinir pack --sub-image 480`` writes them, of ``megabytes`` of rows cycling through ``pool``
    (each row its own name); returns the rows written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True)
    digests = [hashlib.sha256(data).hexdigest() for data in pool]
    rows, size, total, shard, written = [], 0, 0, 0, 0
    while total < megabytes * 2**20:
        k = written % len(pool)
        rows.append({"image": pool[k], "width": 480, "height": 480, "name": f"{written:07d}_s001.png",
                     "sha256": digests[k]})
        size += len(pool[k])
        total += len(pool[k])
        written += 1
        if size >= shard_mb * 2**20 or total >= megabytes * 2**20:
            pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), folder / f"shard-{shard:05d}.parquet",
                           row_group_size=ROW_GROUP_ROWS, compression="none", write_statistics=False)
            rows, size, shard = [], 0, shard + 1
    return written


def _growth_child(path: str, folder: str, batch: int, steps: int, crops: int, queue) -> None:
    """One measurement in a fresh process: patches per CPU-second and this process's peak RSS."""
    torch.set_num_threads(1)
    cutter = PatchCutter(gt_size=128)
    if path == "in-memory":
        dataset = PatchDataset(ShardImages(folder), cutter, cache_mb=0)
        sampler = StepBatchSampler(len(dataset), batch, seed=0, rank=0, crops_per_image=crops)

        def step(t: int) -> None:
            collate([dataset[key] for key in sampler.batch(t)])
    elif path == "stream":
        stream = ShardStream(ShardIndex(folder), batch, seed=0, rank=0, world_size=1, crops_per_image=crops)
        decoder = StreamDataset(cutter, paired=False)

        def step(t: int) -> None:
            collate(decoder.__getitems__(stream.batch()))
    else:  # Ray Data: streaming_split(1), rows decoded and cut here as the stream's are
        import ray

        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
        split = ray.data.read_parquet(folder).streaming_split(1)[0]
        rows = iter(split.iter_rows())
        images = -(-batch // crops)

        def step(t: int) -> None:
            keys = [({**next(rows), "shard": folder, "index": 0}, t * images + i, crops) for i in range(images)]
            collate(StreamDataset(cutter, paired=False).__getitems__(keys))
    step(0)  # warm-up: first reads, first decodes
    start, wall = time.process_time(), time.perf_counter()
    for t in range(1, steps + 1):
        step(t)
    seconds, wall = time.process_time() - start, time.perf_counter() - wall
    if path == "ray-data":  # the iterator first: closed after the shutdown, it would start Ray again
        import ray

        rows.close()
        ray.shutdown()
    queue.put({"patches_per_core_s": batch * steps / seconds, "patches_per_s_wall": batch * steps / wall,
               "peak_rss_mib": _peak_rss_mib()})


def _peak_rss_mib() -> float:
    """This process's peak RSS: VmHWM, which starts afresh at exec (``ru_maxrss`` keeps the forking parent's)."""
    status = Path("/proc/self/status")
    if status.exists():
        return next(int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith("VmHWM")) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _measure_child(path: str, folder: Path, batch: int, steps: int, crops: int) -> dict:
    context = multiprocessing.get_context("spawn")  # a fresh process: its peak RSS is this path's alone
    queue = context.Queue()
    child = context.Process(target=_growth_child, args=(path, str(folder), batch, steps, crops, queue))
    child.start()
    while True:  # a child that died (an error, out of memory) says nothing: look after it every few seconds
        try:
            result = queue.get(timeout=5)
            break
        except Empty:
            if not child.is_alive():
                raise RuntimeError(f"the {path} run on {folder.name} died (exit code {child.exitcode})") from None
    child.join()
    return result


def bench_growth(base_mb: float, batch: int, steps: int, crops: int = 4, repeat: int = 2,
                 ray_data: bool = False) -> list[dict]:
    root = Path(tempfile.mkdtemp(prefix="bench_growth_"))
    try:
        pool = _textured_pngs(32)
        rows = []
        for times in GROWTH:
            folder = root / f"x{times}"
            count = _synthetic_shards(folder, base_mb * times, pool)
            mib = sum(p.stat().st_size for p in folder.glob("*.parquet")) / 2**20
            runs: dict[str, list[dict]] = {"in-memory": [], "stream": []}
            for _ in range(repeat):  # alternated, so that the load of the machine hits both paths alike
                for path, results in runs.items():
                    results.append(_measure_child(path, folder, batch, steps, crops))
            for path, results in runs.items():  # the best rate (the least disturbed run), the highest peak
                rows.append({"set": f"{times}x ({count} rows, {mib:.0f} MiB)", "path": path,
                             **max(results, key=lambda r: r["patches_per_core_s"]),
                             "peak_rss_mib": max(r["peak_rss_mib"] for r in results)})
            if times == GROWTH[0] and ray_data:
                result = _measure_child("ray-data", folder, batch, max(2, steps // 4), crops)
                rows.append({"set": f"{times}x ({count} rows, {mib:.0f} MiB)", "path": "Ray Data streaming_split",
                             **result})
            if times != GROWTH[0]:
                shutil.rmtree(folder)  # the larger sets only while they are measured
        base = {row["path"]: row for row in rows[:2]}
        for row in rows:
            ref = base.get(row["path"], base["stream"])
            row["rss_vs_1x"] = row["peak_rss_mib"] / ref["peak_rss_mib"]
            row["rate_vs_in_memory"] = row["patches_per_core_s"] / next(
                r["patches_per_core_s"] for r in rows if r["set"] == row["set"] and r["path"] == "in-memory")
        return rows
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], "bench/results/bench_data.json", _growth_options)
    torch.manual_seed(0)
    growth_rows = bench_growth(GROWTH_MB / 8 if args.quick else GROWTH_MB, batch=64, steps=4 if args.quick else 20,
                               repeat=1 if args.quick else 2, ray_data=args.ray_data)
    print_table(growth_rows, "growth: 128 px patches per CPU-second and peak RSS of one worker (shared machine: "
                             "compare ratios, not absolute figures)")
    if args.growth_only:
        write_json(args.json, "bench_data", growth_rows, quick=args.quick, device=args.device)
        return
    rows = bench_degrader(args.device, batch=16, size=192, repeat=2 if args.quick else 10)
    print_table(rows, "degradations: batched Degrader vs per-image loop (images per second)")
    shard_rows = bench_shards(count=2 if args.quick else 8, batch=64, steps=1 if args.quick else 2,
                              repeat=1 if args.quick else 3)
    print_table(shard_rows, "training patches (128 px) per CPU-second from shards of 2040x1356 PNGs; "
                            "vs_before: ratio to the first row")
    write_json(args.json, "bench_data", rows + shard_rows + growth_rows, quick=args.quick, device=args.device)


def _growth_options(parser) -> None:
    parser.add_argument("--growth-only", action="store_true", help="only the growth table (c)")
    parser.add_argument("--ray-data", action="store_true", help="add Ray Data's streaming_split to the growth table")


if __name__ == "__main__":
    main()
