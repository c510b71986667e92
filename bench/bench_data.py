"""Data pipeline throughput, side by side in one run.

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
    cell in a fresh process with the real dataset, sampler and collate, one torch thread and the decoded-image
    cache off, in two set-ups (``--loader-workers``, default both):

    * 0 loader processes: the keys decoded, cut and collated in the measuring process;
    * 2 loader processes (training's default ``data.loader_workers``): the DataLoader training builds
      (:func:`xswinir.data.loader_batches`), its processes decoding while the measuring process samples (the
      stream: reads the row groups, holds the buffer, hands the encoded rows over).

    The rate is patches per CPU-second of *all* the processes (the measuring one and its loader processes,
    from ``/proc``), so it holds on a busy machine and charges each path for the work it moves between
    processes; ``main_cpu_share`` is the measuring process's part. Peak RSS (``VmHWM``) is the measuring
    process's (the training worker's) and the largest of its loader processes'. Each cell runs ``--repeat``
    times, the two paths alternated so that the machine's load hits both alike: the median rate (and the
    lowest / highest as ``rate_spread``), the highest peaks. ``--ray-data`` adds Ray Data's
    ``streaming_split`` on the 1x set, decoding in its driver (its reads run in Ray's processes, which neither
    figure counts).

    python -m bench.bench_data [--quick] [--device cuda] [--growth-only] [--ray-data]
                               [--loader-workers N ...] [--steps N] [--repeat N]
"""

from __future__ import annotations

import gc
import hashlib
import io
import multiprocessing
import os
import resource
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from queue import Empty

import numpy as np
import torch
from PIL import Image

from bench.common import measure, parse_args, print_table, write_json
from xswinir.config import DEGRADATION_PRESETS
from xswinir.data import PatchCutter, PatchDataset, StepBatchSampler, collate, loader_batches, open_images
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
# 0: decoding in the measuring process; 2: training's default data.loader_workers, decoding in loader processes
LOADER_WORKERS = (0, 2)


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


def _growth_steps(path: str, folder: str, batch: int, crops: int, workers: int
                  ) -> tuple[Callable[[int], None], Callable[[], None]]:
    """The step of one growth cell (step ``t``'s batch, collated) and what closes it.

    ``workers`` 0: the sampler's keys decoded, cut and collated in this process, as the DataLoader does without
    workers; otherwise the DataLoader training builds (:func:`xswinir.data.loader_batches`) with ``workers``
    processes that decode. Ray Data: ``streaming_split(1)``, its rows decoded and cut here as the stream's are.
    """
    cutter = PatchCutter(gt_size=128)
    if path == "ray-data":
        import ray

        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
        rows = iter(ray.data.read_parquet(folder).streaming_split(1)[0].iter_rows())
        images = -(-batch // crops)

        def close() -> None:  # the iterator first: closed after the shutdown, it would start Ray again
            rows.close()
            ray.shutdown()

        def step(t: int) -> None:
            keys = [({**next(rows), "shard": folder, "index": 0}, t * images + i, crops) for i in range(images)]
            collate(StreamDataset(cutter, paired=False).__getitems__(keys))
        return step, close
    if path == "in-memory":
        dataset = PatchDataset(ShardImages(folder), cutter, cache_mb=0)
        sampler = StepBatchSampler(len(dataset), batch, seed=0, rank=0, crops_per_image=crops)
    else:
        sampler = ShardStream(ShardIndex(folder), batch, seed=0, rank=0, world_size=1, crops_per_image=crops)
        dataset = StreamDataset(cutter, paired=False)
    if workers == 0:
        keys = iter(sampler)

        def step(t: int) -> None:
            collate([dataset[key] for key in next(keys)] if path == "in-memory" else dataset.__getitems__(next(keys)))
        return step, lambda: None
    loader = [loader_batches(dataset, sampler, workers, seed=0, rank=0)]

    def close() -> None:  # the iterator's last reference: its processes are shut down now, not at exit
        loader.clear()
        gc.collect()
    return lambda t: next(loader[0]), close


def _growth_child(path: str, folder: str, batch: int, steps: int, crops: int, workers: int, queue) -> None:
    """One measurement in a fresh process: patches per CPU-second of this process and its loader processes
    (Ray Data: of this process only), and the peak RSS of each."""
    # The loader processes fork, as in a training worker (Linux's default); a spawned process would spawn them,
    # and the in-memory path's dataset would be pickled into each of them.
    multiprocessing.set_start_method("fork", force=True)
    torch.set_num_threads(1)
    step, close = _growth_steps(path, folder, batch, crops, workers)
    for t in range(2):  # warm-up: first reads, first decodes, the loader processes started and ahead
        step(t)
    loaders = _children() if workers and path != "ray-data" else []
    main, loader, wall = time.process_time(), _cpu_seconds_of(loaders), time.perf_counter()
    for t in range(2, steps + 2):
        step(t)
    main, loader = time.process_time() - main, _cpu_seconds_of(loaders) - loader
    wall = time.perf_counter() - wall
    loader_rss = max((_peak_rss_mib(pid) for pid in loaders), default=None)
    close()
    queue.put({"patches_per_core_s": batch * steps / (main + loader), "patches_per_s_wall": batch * steps / wall,
               "main_cpu_share": main / (main + loader), "peak_rss_mib": _peak_rss_mib(),
               "loader_rss_mib": loader_rss})


def _children() -> list[int]:
    """The process ids of this process's children (the DataLoader's workers), from ``/proc``."""
    me, out = os.getpid(), []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "(comm)", which may hold spaces
        except OSError:  # gone meanwhile
            continue
        if int(fields[1]) == me:
            out.append(int(stat.parent.name))
    return out


def _cpu_seconds_of(pids: list[int]) -> float:
    """User + system CPU seconds the processes ``pids`` have used so far (``/proc/PID/stat``)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of stat
    return total / ticks


def _peak_rss_mib(pid: int | str = "self") -> float:
    """A process's peak RSS: VmHWM, which starts afresh at exec (``ru_maxrss`` keeps the forking parent's)."""
    status = Path(f"/proc/{pid}/status")
    if status.exists():
        return next(int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith("VmHWM")) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _measure_child(path: str, folder: Path, batch: int, steps: int, crops: int, workers: int) -> dict:
    context = multiprocessing.get_context("spawn")  # a fresh process: its peak RSS is this path's alone
    queue = context.Queue()
    child = context.Process(target=_growth_child, args=(path, str(folder), batch, steps, crops, workers, queue))
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


def bench_growth(base_mb: float, batch: int, steps: int, crops: int = 4, repeat: int = 3,
                 loader_workers: tuple[int, ...] = LOADER_WORKERS, ray_data: bool = False) -> list[dict]:
    root = Path(tempfile.mkdtemp(prefix="bench_growth_"))
    try:
        pool = _textured_pngs(32)
        rows = []
        for times in GROWTH:
            folder = root / f"x{times}"
            count = _synthetic_shards(folder, base_mb * times, pool)
            mib = sum(p.stat().st_size for p in folder.glob("*.parquet")) / 2**20
            label = f"{times}x ({count} rows, {mib:.0f} MiB)"
            runs = {(workers, path): [] for workers in loader_workers for path in ("in-memory", "stream")}
            for _ in range(repeat):  # alternated, so that the load of the machine hits both paths alike
                for (workers, path), results in runs.items():
                    results.append(_measure_child(path, folder, batch, steps, crops, workers))
                    print(f"  {label}, {path}, {workers} loader processes: "
                          f"{results[-1]['patches_per_core_s']:.0f} patches / CPU-s", flush=True)
            for (workers, path), results in runs.items():
                rows.append(_growth_row(label, path, workers, results))
            if times == GROWTH[0] and ray_data:
                result = _measure_child("ray-data", folder, batch, max(2, steps // 4), crops, 0)
                rows.append(_growth_row(label, "Ray Data streaming_split", 0, [result]))
            if times != GROWTH[0]:
                shutil.rmtree(folder)  # the larger sets only while they are measured
        for row in rows:
            same = [r for r in rows if r["loaders"] == row["loaders"]]
            path = row["path"] if row["path"] in ("in-memory", "stream") else "stream"  # Ray Data: vs the stream
            base = next(r for r in same if r["path"] == path)  # the 1x row: the sets come in order
            row["rss_vs_1x"] = row["peak_rss_mib"] / base["peak_rss_mib"]
            row["rate_vs_in_memory"] = row["patches_per_core_s"] / next(
                r["patches_per_core_s"] for r in same if r["set"] == row["set"] and r["path"] == "in-memory")
        return rows
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _growth_row(label: str, path: str, workers: int, results: list[dict]) -> dict:
    """One row of the growth table from the repeats of one cell: the median rate, the highest peaks; the rates'
    spread (lowest / highest) says how much the machine's load moved them."""
    rates = sorted(r["patches_per_core_s"] for r in results)
    loader = [r["loader_rss_mib"] for r in results if r["loader_rss_mib"] is not None]
    return {"set": label, "path": path, "loaders": workers, "patches_per_core_s": float(np.median(rates)),
            "rate_spread": rates[0] / rates[-1],
            "patches_per_s_wall": float(np.median([r["patches_per_s_wall"] for r in results])),
            "main_cpu_share": float(np.median([r["main_cpu_share"] for r in results])),
            "peak_rss_mib": max(r["peak_rss_mib"] for r in results), "loader_rss_mib": max(loader, default=None),
            "runs": results}


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], "bench/results/bench_data.json", _growth_options)
    torch.manual_seed(0)
    growth_rows = bench_growth(GROWTH_MB / 8 if args.quick else GROWTH_MB, batch=64,
                               steps=4 if args.quick else args.steps, repeat=1 if args.quick else args.repeat,
                               loader_workers=tuple(args.loader_workers), ray_data=args.ray_data)
    print_table([{k: v for k, v in row.items() if k != "runs"} for row in growth_rows],
                "growth: 128 px patches per CPU-second (of the training process and its loader processes) and peak "
                "RSS of each (shared machine: compare ratios, not absolute figures)")
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
    parser.add_argument("--loader-workers", type=int, nargs="+", default=list(LOADER_WORKERS),
                        help="the growth table's loader processes, one set of cells for each (default: %(default)s; "
                             "0 decodes in the training process)")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per growth cell (default: %(default)s)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs of each growth cell, alternated between the paths (default: %(default)s)")


if __name__ == "__main__":
    main()
