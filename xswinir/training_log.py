"""What a training run leaves for people to read: metrics.jsonl, TensorBoard events, progress, curves.

One JSON line per log or validation step, in the driver's log folder. Rank 0 may run on another machine
than the driver (a cluster shares no disk), so it does not write the folder itself: it sends its rows to a
:class:`MetricsSink`, which the driver starts on its own node (a Ray actor, see ``xswinir.trainer``). The driver
of a local run follows that file to show its progress, and plots it as PNG curves at the end. A resumed or
restarted run first drops the lines beyond its checkpoint, so the curve continues without a jump or a
duplicate.
"""

from __future__ import annotations

import json
import math
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

from xswinir.metrics import VAL_PSNR_BICUBIC_Y, VAL_PSNR_Y

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "training_curves.png"
# In the log folder once fault injection (xswinir.trainer.FAILURE_ENV) has failed a run: it fails it only once.
FAILURE_MARKER = ".failure_injected"


class MetricsWriter:
    """Appends metrics to ``log_dir/metrics.jsonl`` and to TensorBoard, from ``start_step`` on.

    Args:
        start_step: the step the run (re)starts from: rows and TensorBoard events past it are dropped.
        node: where rank 0 trains (a Ray node id), written into every row: which machine ran which steps.
    """

    def __init__(self, log_dir: str | Path, start_step: int = 0, tensorboard: bool = True,
                 node: str | None = None) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.node = node
        self.path = self.log_dir / METRICS_FILE
        kept = [row for row in read_metrics(self.path) if row.get("step", 0) <= start_step]
        self.path.write_text("".join(json.dumps(row) + "\n" for row in kept))
        self._tensorboard = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops TensorBoard events past the checkpoint, the same rule as for metrics.jsonl
            self._tensorboard = SummaryWriter(str(self.log_dir / "tensorboard"), purge_step=start_step + 1)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, "time": time.time(), **({"node": self.node} if self.node else {}), **metrics}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tensorboard is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._tensorboard.add_scalar(key, value, step)
            self._tensorboard.flush()

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()


class MetricsSink:
    """The run's log folder as rank 0 sees it: the driver runs this on its own node, rank 0 sends it rows.

    Each start of the worker loop (the first, a restart after a failure, a ``--resume``) calls :meth:`start`,
    which truncates the folder's metrics to the step it starts from and numbers the attempt; a row of an
    earlier attempt that arrives late (its worker died with the row in flight) is dropped, so the steps stay
    continuous. Plain Python: ``xswinir.trainer`` makes it a Ray actor, the tests call it directly.

    Args:
        log_dir: the run's log folder on the driver's machine.
    """

    def __init__(self, log_dir: str | Path) -> None:
        self.log_dir = Path(log_dir)
        self.attempt = 0
        self._writer: MetricsWriter | None = None

    def start(self, start_step: int, node: str | None = None) -> int:
        """Opens the metrics for a worker loop starting at ``start_step``; returns its attempt number."""
        self.close()
        self.attempt += 1
        self._writer = MetricsWriter(self.log_dir, start_step, node=node)
        return self.attempt

    def write(self, attempt: int, step: int, metrics: dict[str, float]) -> bool:
        """Appends one row of attempt ``attempt``; False (and nothing written) for an earlier attempt's row."""
        if attempt != self.attempt or self._writer is None:
            return False
        self._writer.write(step, metrics)
        return True

    def claim_failure(self) -> bool:
        """True the first time it is asked for this log folder (then it leaves :data:`FAILURE_MARKER` there)."""
        marker = self.log_dir / FAILURE_MARKER
        if marker.exists():
            return False
        self.log_dir.mkdir(parents=True, exist_ok=True)
        marker.touch()
        return True

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl; a half-written last line (a killed run) is ignored."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def plot_training_curves(metrics_path: str | Path, out_path: str | Path) -> Path | None:
    """Loss, learning rate, validation PSNR and (with the texture term) its diagnostics against the step, as
    one PNG; None if nothing was logged."""
    rows = read_metrics(metrics_path)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key: str) -> tuple[list[int], list[float]]:
        pairs = [(r["step"], r[key]) for r in rows if key in r]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    texture = any(r.get("train/texture_tiles_used", 0) > 0 for r in rows)
    fig, axes = plt.subplots(1, 4 if texture else 3, figsize=(20 if texture else 15, 4))
    for key, style in (("train/loss", "-"), ("train/loss_pixel", "--"), ("train/loss_texture", ":")):
        steps, values = series(key)
        if steps:
            axes[0].plot(steps, values, style, label=key)
    axes[0].set_title("training loss")
    axes[0].set_yscale("log")
    axes[0].legend()
    steps, values = series("lr")
    axes[1].plot(steps, values)
    axes[1].set_title("learning rate")
    for key, label in ((VAL_PSNR_Y, "model (EMA)"), (VAL_PSNR_BICUBIC_Y, "bicubic")):
        steps, values = series(key)
        if steps:
            axes[2].plot(steps, values, "o-" if label != "bicubic" else "--", label=label)
    axes[2].set_title("validation Y-PSNR (dB)")
    axes[2].legend()
    if texture:
        # Is the term doing anything: how well X c* rebuilds gt against the bicubic input, and how much of it.
        for key, label in (("train/texture_fit_error", "|X c* - gt|"), ("train/texture_bicubic_error",
                                                                       "|bicubic(lq) - gt|")):
            steps, values = series(key)
            if steps:
                axes[3].plot(steps, values, label=label)
        share = axes[3].twinx()
        for key, label, style in (("train/texture_tiles_used", "tiles used", ":"), ("train/texture_r2",
                                                                                   "structure explained (r2)", "-.")):
            steps, values = series(key)
            if steps:
                share.plot(steps, values, style, color="gray", label=label)
        share.set_ylim(0, 1)
        share.legend(loc="lower right", fontsize=7)
        axes[3].set_title("texture term: fit of X c* (mean abs error)")
        axes[3].legend(loc="upper right", fontsize=7)
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


class ProgressFollower:
    """Training progress on the driver, read from rank 0's metrics.jsonl while ``trainer.fit()`` blocks.

    On a terminal it is one tqdm line updated in place. Anywhere else (a log file, CI, a pipe) the bar's
    carriage-return redraws would pile up as dozens of copies, so it prints one plain line every ``every``
    steps and at each validation result instead.

    Args:
        metrics_path: the run's metrics.jsonl (it need not exist yet).
        total_steps: the step the run ends at.
        every: steps between two plain lines; default a tenth of the run.
        interval_s: how often the file is read.
        stream: where to write; default stderr, like tqdm.
    """

    def __init__(self, metrics_path: str | Path, total_steps: int, every: int | None = None,
                 interval_s: float = 1.0, stream: TextIO | None = None) -> None:
        self.path = Path(metrics_path)
        self.total_steps = total_steps
        self.every = every or max(1, total_steps // 10)
        self.interval_s = interval_s
        self.stream = stream
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ProgressFollower:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        stream = self.stream or sys.stderr
        if stream.isatty():
            self._run_bar(stream)
        else:
            self._run_lines(stream)

    def _run_bar(self, stream: TextIO) -> None:
        from tqdm import tqdm

        bar = tqdm(total=self.total_steps, desc="train", unit="step", dynamic_ncols=True, file=stream)
        while True:
            stopping = self._stop.wait(self.interval_s)
            rows = read_metrics(self.path)
            if rows:
                bar.n = min(rows[-1]["step"], self.total_steps)
                bar.set_postfix(_latest(rows), refresh=False)
                bar.refresh()
            if stopping:
                break
        bar.close()

    def _run_lines(self, stream: TextIO) -> None:
        start = time.monotonic()
        printed_step, printed_rows = 0, 0
        while True:
            stopping = self._stop.wait(self.interval_s)
            rows = read_metrics(self.path)
            step = min(rows[-1]["step"], self.total_steps) if rows else 0
            new_val = any(VAL_PSNR_Y in row for row in rows[printed_rows:])
            due = step >= printed_step + self.every or new_val or (stopping and step > printed_step)
            if due and step > 0:  # step > 0 implies rows
                print(progress_line(rows, self.total_steps, time.monotonic() - start), file=stream, flush=True)
                printed_step, printed_rows = step, len(rows)
            if stopping:
                break


def _latest(rows: list[dict[str, Any]]) -> dict[str, str]:
    """The latest loss, validation PSNR and speed in ``rows``, formatted to 4 significant digits."""
    shown: dict[str, str] = {}
    for row in rows:
        for key, name in (("train/loss", "loss"), (VAL_PSNR_Y, "psnr_y"), ("steps_per_s", "it/s")):
            if key in row:
                shown[name] = f"{row[key]:.4g}"
    return shown


def progress_line(rows: list[dict[str, Any]], total_steps: int, elapsed_s: float) -> str:
    """One line of progress for logs: ``train: step 60/600 (10%), loss 0.04, psnr_y 27.3, 3.5 it/s, 0:17 in, ...``."""
    step = min(rows[-1]["step"], total_steps)
    parts = [f"train: step {step}/{total_steps} ({100 * step // max(total_steps, 1)}%)"]
    parts += [f"{name} {value}" for name, value in _latest(rows).items()]
    parts.append(f"{_clock(elapsed_s)} elapsed")
    rate = next((row["steps_per_s"] for row in reversed(rows) if row.get("steps_per_s")), None)
    if rate and step < total_steps:
        parts.append(f"{_clock((total_steps - step) / rate)} left")
    return ", ".join(parts)


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}" if minutes >= 60 else f"{minutes}:{seconds:02d}"
