"""Shared helpers of the benchmarks: timing, a printed table and a JSON record.

Timings on shared machines are noisy, so every benchmark measures the variants it compares side by side in
one process, interleaved, and reports their ratio.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def parse_args(description: str, default_json: str,
               add_arguments: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """The options every benchmark has, plus those ``add_arguments`` adds, so that ``--help`` lists them all."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--json", default=default_json, help="where to write the results (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and smaller sizes, for a smoke run")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: %(default)s)")
    if add_arguments is not None:
        add_arguments(parser)
    return parser.parse_args()


def sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure(fns: dict[str, Callable[[], Any]], repeat: int, warmup: int = 1,
            device: str | torch.device = "cpu") -> dict[str, float]:
    """Median seconds per call of each function, calls interleaved so that machine noise hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def print_table(rows: list[dict[str, Any]], title: str) -> None:
    if not rows:
        return
    columns = list(rows[0])
    cells = [[_fmt(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print(f"\n{title}")
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def write_json(path: str | Path, name: str, rows: list[dict[str, Any]], **extra: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": name,
        "machine": {
            "platform": platform.platform(), "processor": platform.processor(), "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        },
        "rows": rows,
        **extra,
    }
    path.write_text(json.dumps(record, indent=2))
    print(f"\nwrote {path}")
