"""The trainer on real Ray Train: two workers with the texture term, recovery from a worker failure,
resume after a killed driver, and the CLI's refusal of bad configs."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from xswinir.cli import main
from xswinir.config import load_config
from xswinir.metrics import VAL_PSNR_BICUBIC_Y, VAL_PSNR_Y
from xswinir.training_log import METRICS_FILE, read_metrics

pytestmark = pytest.mark.integration

TINY = [
    "model.depths=[1]", "model.num_heads=[2]", "model.embed_dim=12", "model.window_size=4",
    "data.gt_size=32", "data.loader_workers=0", "data.val=skimage:coins", "texture.patch_size=16",
    "texture.region_size=64", "texture.classifier.num_pairs=512", "texture.classifier.steps=50",
    "train.batch_size=4", "train.log_every=2", "run.progress=false", "run.cpus_per_worker=1",
]


def tiny_config(tmp_path: Path, *extra: str):
    return load_config("demo", [*TINY, f"run.storage={tmp_path / 'runs'}", f"run.log_dir={tmp_path / 'logs'}",
                                *extra])


def test_two_workers_train_with_texture_term(ray_local, tmp_path):
    from xswinir.checkpoint import EMA_FILE
    from xswinir.trainer import fit

    cfg = tiny_config(tmp_path, "run.num_workers=2", "train.total_steps=4", "train.val_every=2",
                      "loss.texture_weight=0.1")
    handler = signal.getsignal(signal.SIGINT)
    result = fit(cfg)
    # Ray Train's own Ctrl-C handler is gone with the run: the next Ctrl-C (in the demo's evaluation) is ours.
    assert signal.getsignal(signal.SIGINT) is handler
    assert result.metrics["step"] == 4
    assert result.metrics[VAL_PSNR_Y] > 10 and result.metrics[VAL_PSNR_BICUBIC_Y] > 10
    with result.checkpoint.as_directory() as directory:
        files = {p.name for p in Path(directory).iterdir()}
    assert {EMA_FILE, "model.safetensors", "train_state.pt", "config.yaml", "classifier"} <= files
    rows = read_metrics(tmp_path / "logs" / METRICS_FILE)
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == [2, 4]
    assert all(r["train/loss_texture"] > 0 for r in train_rows)
    assert (tmp_path / "logs" / "training_curves.png").stat().st_size > 0


def test_worker_failure_is_survived_and_resumes_from_checkpoint(ray_local, tmp_path, monkeypatch):
    from xswinir.trainer import FAILURE_ENV, fit

    monkeypatch.setenv(FAILURE_ENV, "5")
    # The default run.max_failures of a local Ray (2), as in the README's failure drill.
    cfg = tiny_config(tmp_path, "run.num_workers=2", "train.total_steps=6", "train.val_every=2",
                      "loss.texture_weight=0")
    result = fit(cfg)
    assert result.error is None
    assert result.metrics["step"] == 6
    assert (tmp_path / "logs" / ".failure_injected").exists()
    rows = [r for r in read_metrics(tmp_path / "logs" / METRICS_FILE) if "train/loss" in r]
    # Steps 5 was lost with the failure and redone from the step-4 checkpoint: no gap, no duplicate.
    assert [r["step"] for r in rows] == [2, 4, 6]


def _checkpoints(run: Path) -> list[Path]:
    return sorted(p for p in run.iterdir() if p.is_dir() and p.name.startswith("checkpoint_"))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_resume_skips_a_deleted_and_a_truncated_checkpoint(ray_local, tmp_path, caplog):
    """An existing run is refused without --resume; with it, the run continues from its newest good
    checkpoint and ends with the weights of the run that was never interrupted."""
    from safetensors.torch import load_file

    from xswinir.checkpoint import MODEL_FILE
    from xswinir.errors import UserError
    from xswinir.runs import RAY_SNAPSHOT_FILE
    from xswinir.trainer import fit

    cfg = tiny_config(tmp_path, "train.total_steps=6", "train.val_every=2", "run.keep_checkpoints=3",
                      "loss.texture_weight=0")
    fit(cfg)
    with pytest.raises(UserError, match="--resume"):
        fit(cfg)  # an existing run is never overwritten
    run = tmp_path / "runs" / cfg.run.name
    first, second, third = _checkpoints(run)
    # A copy: safetensors maps the file, which is damaged below.
    final = {k: v.clone() for k, v in load_file(third / MODEL_FILE).items()}
    # A node that died while saving: the newest checkpoint gone (Ray's snapshot still names it), the one
    # before it half written.
    shutil.rmtree(third)
    _truncate(second / MODEL_FILE)
    with caplog.at_level(logging.WARNING, logger="xswinir.runs"):
        result = fit(cfg, resume=True)
    assert result.error is None and result.metrics["step"] == 6
    skipped = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(skipped) == 1 and second.name in skipped[0] and "model.safetensors has" in skipped[0]
    with result.checkpoint.as_directory() as directory:
        resumed = load_file(Path(directory) / MODEL_FILE)
    # Resumed from step 2, it ends where the uninterrupted run ended, bit for bit.
    assert resumed.keys() == final.keys() and all(torch.equal(resumed[k], final[k]) for k in final)
    assert first.is_dir() and second.is_dir()  # nothing deleted
    assert len(list(run.glob("checkpoint_manager_snapshot.set-aside-*.json"))) == 1
    assert (run / RAY_SNAPSHOT_FILE).is_file()  # Ray's new one
    rows = [r["step"] for r in read_metrics(tmp_path / "logs" / METRICS_FILE) if "train/loss" in r]
    assert rows == [2, 4, 6]


# Seven Ray runs, 2-5 minutes on 2 cores: in -m slow. The default run keeps the deleted + truncated case above
# and tests/test_trainer.py checks every damage without Ray.
@pytest.mark.slow
def test_every_damage_in_turn_and_a_failed_first_attempt(ray_local, tmp_path, caplog, monkeypatch):
    import ray.train
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME
    from safetensors.torch import load_file

    from xswinir.checkpoint import MANIFEST_FILE, MODEL_FILE
    from xswinir.runs import RAY_SNAPSHOT_FILE
    from xswinir.trainer import FAILURE_ENV, fit

    assert RAY_SNAPSHOT_FILE == CHECKPOINT_MANAGER_SNAPSHOT_FILENAME
    cfg = tiny_config(tmp_path, "train.total_steps=4", "train.val_every=2", "run.keep_checkpoints=20",
                      "loss.texture_weight=0", "run.max_failures=0")
    run = tmp_path / "runs" / cfg.run.name
    monkeypatch.setenv(FAILURE_ENV, "1")
    with pytest.raises(ray.train.TrainingFailedError):
        fit(cfg)  # fails at step 1, before its first checkpoint
    monkeypatch.delenv(FAILURE_ENV)
    assert run.is_dir() and not _checkpoints(run)
    fit(cfg)  # the same name again, without --resume
    good, newest = _checkpoints(run)
    # A copy: safetensors maps the file, which is damaged below.
    final = {k: v.clone() for k, v in load_file(newest / MODEL_FILE).items()}

    def flip_a_byte(folder: Path) -> None:
        data = bytearray((folder / MODEL_FILE).read_bytes())
        data[-1] ^= 0x01
        (folder / MODEL_FILE).write_bytes(bytes(data))

    damages = [
        ("truncate", lambda folder: _truncate(folder / MODEL_FILE)),
        ("delete a file", lambda folder: (folder / "train_state.pt").unlink()),
        ("delete the folder", shutil.rmtree),
        ("corrupt the manifest", lambda folder: (folder / MANIFEST_FILE).write_text("{")),
        ("flip a byte", flip_a_byte),  # same size: only the workers' sha256 check sees it
    ]
    damaged = []
    for what, damage in damages:
        newest = _checkpoints(run)[-1]
        damage(newest)
        if newest.exists():
            damaged.append(newest.name)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="xswinir.runs"):
            result = fit(cfg, resume=True)
        assert result.error is None and result.metrics["step"] == 4, what
        with result.checkpoint.as_directory() as directory:
            resumed = load_file(Path(directory) / MODEL_FILE)
        assert max((resumed[k] - final[k]).abs().max().item() for k in final) == 0, what
        skipped = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        # The driver checks names and sizes and warns about each newer one it skips; a flipped byte passes
        # that, and the workers (sha256) skip it and every damaged one before it, in their own log.
        expected = damaged if what != "flip a byte" else []
        assert sorted(m.split()[2].rsplit("/", 1)[-1].rstrip(":") for m in skipped) == sorted(expected), what
    assert good.is_dir() and all((run / name).is_dir() for name in damaged)  # nothing deleted


TOTAL_STEPS = 16


def _train_cmd(tmp_path: Path, *extra: str) -> list[str]:
    args = [sys.executable, "-m", "xswinir", "train", "--config", "demo"]
    for item in (*TINY, f"run.storage={tmp_path / 'runs'}", f"run.log_dir={tmp_path / 'logs'}",
                 f"train.total_steps={TOTAL_STEPS}", "train.val_every=2", "loss.texture_weight=0", *extra):
        args += ["--set", item]
    return args


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc): the local Ray a driver started lives there."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


# 50-90 s on 2 cores: in -m slow, so the default run stays under 8 minutes; recovery from a failure stays in
# the default run through test_worker_failure_is_survived_and_resumes_from_checkpoint.
@pytest.mark.slow
def test_killed_driver_resumes_with_resume_flag(tmp_path):
    env = {**os.environ, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}
    proc = subprocess.Popen(_train_cmd(tmp_path), env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "logs" / METRICS_FILE
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if any("val/psnr_y" in r and r["step"] >= 4 for r in read_metrics(metrics)):
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be killed"
    # A crash: the driver and the local Ray it started die at once, mid-run.
    for pid in [proc.pid, *_descendants(proc.pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    time.sleep(1)
    killed_at = max(r["step"] for r in read_metrics(metrics))
    assert 4 <= killed_at < TOTAL_STEPS

    done = subprocess.run(_train_cmd(tmp_path) + ["--resume"], env=env, capture_output=True, text=True,
                          timeout=300, start_new_session=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"step: {TOTAL_STEPS}" in done.stdout
    steps = [r["step"] for r in read_metrics(metrics) if "train/loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == TOTAL_STEPS  # continuous, no duplicates


def test_cli_refuses_bad_configs_before_starting(tmp_path, capsys):
    assert main(["train", "--config", "demo", "--set", "train.lrr=1"]) == 2
    assert "did you mean 'lr'" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  upsampler: magic\n")
    assert main(["train", "--config", str(bad)]) == 2
    assert "model.upsampler must be one of" in capsys.readouterr().err
    assert main(["train", "--config", "demo", "--num-workers", "3"]) == 2  # batch 8 does not split over 3
    assert "split evenly" in capsys.readouterr().err


# About a minute on 2 cores; tests/test_shards.py covers the shard reader in the default run.
@pytest.mark.slow
def test_trains_from_parquet_shards(ray_local, tmp_path):
    from xswinir.images import read_image, write_image
    from xswinir.shards import pack_images
    from xswinir.sources import resolve_image_files
    from xswinir.trainer import fit

    folder = tmp_path / "hr"
    for path in resolve_image_files("skimage:astronaut,coffee,brick"):
        write_image(folder / f"{path.stem}.png", read_image(path)[:, :96, :96])
    pack_images(folder, tmp_path / "shards", progress=False)
    cfg = tiny_config(tmp_path, f"data.train={tmp_path / 'shards'}", "train.total_steps=2", "train.val_every=2",
                      "loss.texture_weight=0.1", "run.cpus_per_worker=0.5")
    result = fit(cfg)
    assert result.metrics["step"] == 2
    assert result.metrics[VAL_PSNR_Y] > 10
