"""The metrics sink rank 0 sends its rows to (restarts keep the steps continuous), training curves (the texture
term's diagnostics get their own panel when the term is on) and the driver's progress: a bar on a terminal, plain
lines in a log. The sink as a Ray actor on the driver's node: tests/integration/test_train_ray.py and
test_two_nodes_ray.py."""

from __future__ import annotations

import io
import json
import time

from PIL import Image

from xswinir.training_log import (
    FAILURE_MARKER,
    METRICS_FILE,
    MetricsSink,
    ProgressFollower,
    plot_training_curves,
    progress_line,
    read_metrics,
)


def _write(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_a_restart_continues_the_metrics_and_drops_the_lost_attempts_rows(tmp_path):
    sink = MetricsSink(tmp_path / "logs")
    first = sink.start(0, node="node-a")
    for step in (2, 4, 6):
        assert sink.write(first, step, {"train/loss": 1.0 / step})
    # Rank 0's node is lost after step 6; the run restarts from the step-4 checkpoint on another node. A row the
    # lost worker had in flight arrives after the restart: it is dropped.
    second = sink.start(4, node="node-b")
    assert not sink.write(first, 8, {"train/loss": 0.5})
    for step in (6, 8):
        assert sink.write(second, step, {"train/loss": 0.1 / step})
    sink.close()
    rows = read_metrics(tmp_path / "logs" / METRICS_FILE)
    assert [(r["step"], r["node"]) for r in rows] == [(2, "node-a"), (4, "node-a"), (6, "node-b"), (8, "node-b")]
    assert rows[2]["train/loss"] == 0.1 / 6  # the restart's step 6, not the lost attempt's
    assert len(list((tmp_path / "logs" / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one per start


def test_fault_injection_fails_a_log_folder_once(tmp_path):
    sink = MetricsSink(tmp_path / "logs")
    assert sink.claim_failure() and (tmp_path / "logs" / FAILURE_MARKER).is_file()
    assert not sink.claim_failure()
    assert not MetricsSink(tmp_path / "logs").claim_failure()  # a --resume of the run: still once


def test_texture_diagnostics_panel_only_with_the_term(tmp_path):
    base = [{"step": s, "train/loss": 0.1 / s, "train/loss_pixel": 0.1 / s, "lr": 1e-3} for s in range(1, 6)]
    base.append({"step": 5, "val/psnr_y": 28.0, "val/psnr_y_bicubic": 27.0})
    plain = plot_training_curves(_write(tmp_path / "plain.jsonl", [
        {**r, "train/texture_tiles_used": 0.0} if "lr" in r else r for r in base]), tmp_path / "plain.png")
    texture = plot_training_curves(_write(tmp_path / "texture.jsonl", [
        {**r, "train/texture_tiles_used": 1.0, "train/texture_r2": 0.4, "train/texture_fit_error": 0.03,
         "train/texture_bicubic_error": 0.04} if "lr" in r else r for r in base]), tmp_path / "texture.png")
    assert Image.open(texture).size[0] > Image.open(plain).size[0]  # four panels instead of three
    assert len(read_metrics(tmp_path / "texture.jsonl")) == 6
    assert plot_training_curves(_write(tmp_path / "empty.jsonl", []), tmp_path / "none.png") is None


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _follow(tmp_path, stream, steps):
    """Feeds ``steps`` log rows (a validation at 10 and 20) to a follower as a run would, one every 50 ms."""
    path = tmp_path / "metrics.jsonl"
    with ProgressFollower(path, total_steps=20, every=5, interval_s=0.01, stream=stream):
        for step in steps:
            row = {"step": step, "train/loss": 1.0 / step, "steps_per_s": 2.0}
            with path.open("a") as f:
                f.write(json.dumps(row) + "\n")
                if step % 10 == 0:
                    f.write(json.dumps({"step": step, "val/psnr_y": 20.0 + step}) + "\n")
            time.sleep(0.05)
    return stream.getvalue()


def test_progress_in_a_log_is_a_line_every_n_steps(tmp_path):
    out = _follow(tmp_path, io.StringIO(), range(1, 21))
    assert "\r" not in out
    lines = out.splitlines()
    steps = [int(line.split()[2].split("/")[0]) for line in lines]
    # Every 5 steps at most once, and the validations at 10 and 20 each show up.
    assert steps == sorted(set(steps)) and steps[-1] == 20 and len(lines) <= 5
    assert all(b - a >= 5 or b in (10, 20) for a, b in zip([0, *steps], steps, strict=False))
    assert any("psnr_y 30" in line for line in lines)
    assert lines[-1].startswith("train: step 20/20 (100%), loss 0.05, it/s 2, psnr_y 40, ")


def test_progress_on_a_terminal_is_one_bar_redrawn_in_place(tmp_path):
    out = _follow(tmp_path, _Terminal(), range(1, 21))
    assert "\r" in out and "\n" not in out.rstrip("\n")
    assert "20/20" in out and "psnr_y=40" in out


def test_progress_line_estimates_the_time_left():
    rows = [{"step": 60, "train/loss": 0.0412, "steps_per_s": 3.0}, {"step": 60, "val/psnr_y": 27.31}]
    assert progress_line(rows, 600, 75.0) == ("train: step 60/600 (10%), loss 0.0412, it/s 3, psnr_y 27.31, "
                                              "1:15 elapsed, 3:00 left")
