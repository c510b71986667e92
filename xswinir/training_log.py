"""What a training run leaves for people to read: metrics.jsonl, TensorBoard events, a progress bar, curves.

Rank 0 writes one JSON line per log or validation step. The driver of a local run follows that file to
draw its progress bar, and plots it as PNG curves at the end. A resumed run first drops the lines beyond
its checkpoint, so the curve continues without a jump or a duplicate.
"""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "training_curves.png"


class MetricsWriter:
    """Appends metrics to ``log_dir/metrics.jsonl`` and to TensorBoard; used on rank 0 only."""

    def __init__(self, log_dir: str | Path, start_step: int = 0, tensorboard: bool = True) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.log_dir / METRICS_FILE
        kept = [row for row in read_metrics(self.path) if row.get("step", 0) <= start_step]
        self.path.write_text("".join(json.dumps(row) + "\n" for row in kept))
        self._tensorboard = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops TensorBoard events past the checkpoint, the same rule as for metrics.jsonl
            self._tensorboard = SummaryWriter(str(self.log_dir / "tensorboard"), purge_step=start_step + 1)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, "time": time.time(), **metrics}
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
    for key, label in (("val/psnr_y", "model (EMA)"), ("val/psnr_y_bicubic", "bicubic")):
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
    """A tqdm bar on the driver that follows rank 0's metrics.jsonl while ``trainer.fit()`` blocks."""

    def __init__(self, metrics_path: str | Path, total_steps: int, interval_s: float = 1.0) -> None:
        self.path = Path(metrics_path)
        self.total_steps = total_steps
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ProgressFollower:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        from tqdm import tqdm

        bar = tqdm(total=self.total_steps, desc="train", unit="step", dynamic_ncols=True)
        shown: dict[str, str] = {}
        while True:
            stopping = self._stop.wait(self.interval_s)
            rows = read_metrics(self.path)
            if rows:
                for row in rows:
                    for key, name in (("train/loss", "loss"), ("val/psnr_y", "psnr_y"), ("steps_per_s", "it/s")):
                        if key in row:
                            shown[name] = f"{row[key]:.4g}"
                bar.n = min(rows[-1]["step"], self.total_steps)
                bar.set_postfix(shown, refresh=False)
                bar.refresh()
            if stopping:
                break
        bar.close()
