"""The trainer without Ray: the learning-rate schedule, one step with the texture term, exact resume (from
image files and from Parquet shards), and resuming past damaged checkpoints."""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest
import torch
from PIL import Image

from xswinir.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from xswinir.config import Config, TrainConfig, load_config
from xswinir.data import build_train_batches
from xswinir.model import DropPath
from xswinir.trainer import TrainingParts, build_training_parts, learning_rate, resume_training, run_step

CPU = torch.device("cpu")
STEPS = 6


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hr")
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    return folder


def tiny_config(train: str | Path, *extra: str) -> Config:
    # Two blocks, so that the second has a stochastic-depth rate above 0 (rates rise from 0 over the blocks).
    return load_config("demo", [
        "model.depths=[2]", "model.num_heads=[2]", "model.embed_dim=12", "model.window_size=4",
        "model.drop_path_rate=0.5", "data.gt_size=16", "data.loader_workers=0", f"data.train={train}",
        "loss.texture_weight=0", "train.batch_size=2", f"train.total_steps={STEPS}", "train.warmup_steps=2",
        "train.ema_decay=0.5", *extra,
    ])


def file_batches(cfg: Config, start_step: int) -> Iterator[dict[str, torch.Tensor]]:
    # Image folders and Parquet shards (read by ShardImages) take the same DataLoader path.
    return build_train_batches(cfg, rank=0, world_size=1, start_step=start_step)


def train(cfg: Config, parts: TrainingParts, batches: Iterator, steps: range) -> list[torch.Tensor]:
    return [run_step(parts, parts.model, cfg.train, step, 0, next(batches))["loss"] for step in steps]


def weights(parts: TrainingParts) -> dict[str, torch.Tensor]:
    return {**parts.model.state_dict(), **{f"ema.{k}": v for k, v in parts.ema.module.state_dict().items()}}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0, msg=key)


def straight_run(cfg: Config) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    parts = build_training_parts(cfg, CPU, None)
    losses = train(cfg, parts, file_batches(cfg, 0), range(STEPS))
    return losses, weights(parts)


@pytest.mark.parametrize("source", ["files", "shards"])
def test_resumed_run_equals_the_straight_run(images, tmp_path, source):
    if source == "shards":
        from xswinir.shards import pack_images

        pack_images(images, tmp_path / "shards", progress=False)
        cfg = tiny_config(tmp_path / "shards")
    else:
        cfg = tiny_config(images)
    straight_losses, straight_weights = straight_run(cfg)
    parts = build_training_parts(cfg, CPU, None)
    assert any(isinstance(m, DropPath) for m in parts.model.modules())  # stochastic depth is in play

    for k in (1, 3):
        parts = build_training_parts(cfg, CPU, None)
        first = train(cfg, parts, file_batches(cfg, 0), range(k))
        save_checkpoint(tmp_path / f"step{k}", cfg, parts.model, parts.ema.module, parts.optimizer, k, None)
        torch.manual_seed(1234)  # whatever a new process's global RNG holds
        parts = build_training_parts(cfg, CPU, None)
        start = load_checkpoint(tmp_path / f"step{k}", parts.model, parts.ema.module, parts.optimizer)
        rest = train(cfg, parts, file_batches(cfg, start), range(start, STEPS))
        assert start == k
        torch.testing.assert_close(torch.stack(first + rest), torch.stack(straight_losses), atol=0, rtol=0)
        assert_same_weights(weights(parts), straight_weights)


def test_another_seed_gives_another_run(images):
    # The control: the comparison above can tell runs apart.
    losses, _ = straight_run(tiny_config(images))
    other, _ = straight_run(tiny_config(images, "train.seed=1"))
    assert not torch.equal(torch.stack(losses), torch.stack(other))


def test_learning_rate_schedule_by_hand():
    warm = TrainConfig(lr=1e-3, warmup_steps=4, scheduler="multistep", milestones=(10, 20), gamma=0.5)
    assert [learning_rate(s, warm) for s in (0, 1, 3)] == pytest.approx([2.5e-4, 5e-4, 1e-3])
    assert [learning_rate(s, warm) for s in (9, 10, 19, 20, 10**6)] == pytest.approx(
        [1e-3, 5e-4, 5e-4, 2.5e-4, 2.5e-4])
    cosine = TrainConfig(lr=1e-3, warmup_steps=4, scheduler="cosine", total_steps=14, min_lr=1e-5)
    # After warm-up: min_lr + (lr - min_lr) * (1 + cos(pi * (step - 4) / 10)) / 2
    assert learning_rate(3, cosine) == pytest.approx(1e-3)
    assert learning_rate(4, cosine) == pytest.approx(1e-3)
    assert learning_rate(9, cosine) == pytest.approx(1e-5 + 0.99e-3 * 0.5)
    assert learning_rate(6, cosine) == pytest.approx(1e-5 + 0.99e-3 * (1 + math.cos(math.pi * 0.2)) / 2)
    assert learning_rate(14, cosine) == pytest.approx(1e-5)
    assert learning_rate(30, cosine) == pytest.approx(1e-5)  # held at the floor past total_steps


def test_one_step_with_the_texture_term(images):
    from xswinir.texture import TextureClassifier

    cfg = tiny_config(images, "loss.texture_weight=0.1", "texture.patch_size=8", "texture.region_size=32",
                      "texture.classifier.scales=[1,2]", "model.drop_path_rate=0")
    classifier = TextureClassifier(patch_size=8, scales=(1, 2))
    before = {k: v.clone() for k, v in classifier.state_dict().items()}
    parts = build_training_parts(cfg, CPU, classifier)
    batch = next(file_batches(cfg, 0))
    assert "region" in batch
    out = run_step(parts, parts.model, cfg.train, 0, 0, batch)
    assert torch.isfinite(out["loss"]) and torch.isfinite(out["loss_texture"])
    assert out["loss_texture"] > 0
    assert all(p.grad is not None for p in parts.model.parameters() if p.requires_grad)
    assert all(p.grad is None for p in classifier.parameters())
    for key, value in classifier.state_dict().items():
        assert torch.equal(value, before[key]), key


# Damages of the newest checkpoint of a run (step 4); the step-2 checkpoint stays intact.
def _truncate(folder: Path) -> None:
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])


def _delete_file(folder: Path) -> None:
    (folder / "model_ema.safetensors").unlink()


def _delete_folder(folder: Path) -> None:
    shutil.rmtree(folder)


def _corrupt_manifest(folder: Path) -> None:
    (folder / "manifest.json").write_text("{not json")


def _flip_a_byte(folder: Path) -> None:
    path = folder / "train_state.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


CHECKPOINT_NAMES = ["checkpoint_2026-01-01_00-00-02.000000", "checkpoint_2026-01-01_00-00-04.000000"]


@pytest.fixture(scope="module")
def run_folder(images, tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A run folder with checkpoints at steps 2 and 4, and the weights of the straight run's step 6."""
    cfg = tiny_config(images)
    folder = tmp_path_factory.mktemp("runs") / "run"
    parts = build_training_parts(cfg, CPU, None)
    batches = file_batches(cfg, 0)
    for step in range(STEPS):
        run_step(parts, parts.model, cfg.train, step, 0, next(batches))
        if step + 1 in (2, 4):
            directory = folder / CHECKPOINT_NAMES[(step + 1) // 2 - 1]
            directory.mkdir(parents=True)
            save_checkpoint(directory, cfg, parts.model, parts.ema.module, parts.optimizer, step + 1, None)
    return folder, weights(parts)


def finish_from(cfg: Config, checkpoint: Path | str, fs: pafs.FileSystem | None = None):
    parts = build_training_parts(cfg, CPU, None)
    start = resume_training(parts, str(checkpoint), fs)
    train(cfg, parts, file_batches(cfg, start), range(start, STEPS))
    return start, weights(parts)


@pytest.mark.parametrize("damage", [_truncate, _delete_file, _delete_folder, _corrupt_manifest, _flip_a_byte],
                         ids=lambda f: f.__name__[1:])
def test_resume_falls_back_to_the_newest_good_checkpoint(images, run_folder, tmp_path, caplog, damage):
    folder, final = run_folder
    run = tmp_path / "run"
    shutil.copytree(folder, run)
    cfg = tiny_config(images)
    damage(run / CHECKPOINT_NAMES[1])
    with caplog.at_level(logging.WARNING, logger="xswinir.trainer"):
        start, fell_back = finish_from(cfg, run / CHECKPOINT_NAMES[1])
    assert start == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and CHECKPOINT_NAMES[1] in warnings[0]
    assert_same_weights(fell_back, finish_from(cfg, run / CHECKPOINT_NAMES[0])[1])  # resumed there directly
    assert_same_weights(fell_back, final)  # and the run that was never interrupted
    assert all((run / name).exists() for name in CHECKPOINT_NAMES if damage is not _delete_folder)


def test_fallback_through_a_non_local_filesystem(images, run_folder, tmp_path):
    # SubTreeFileSystem is not a LocalFileSystem: checkpoints are downloaded before loading, as from S3.
    folder, final = run_folder
    shutil.copytree(folder, tmp_path / "run")
    _truncate(tmp_path / "run" / CHECKPOINT_NAMES[1])
    fs = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    start, fell_back = finish_from(tiny_config(images), f"run/{CHECKPOINT_NAMES[1]}", fs)
    assert start == 2
    assert_same_weights(fell_back, final)


def test_no_good_checkpoint_is_a_one_line_error_naming_the_run_folder(images, run_folder, tmp_path):
    folder, _ = run_folder
    run = tmp_path / "run"
    shutil.copytree(folder, run)
    _corrupt_manifest(run / CHECKPOINT_NAMES[0])
    _truncate(run / CHECKPOINT_NAMES[1])
    with pytest.raises(CheckpointError, match="none of the 2 checkpoint") as err:
        resume_training(build_training_parts(tiny_config(images), CPU, None), str(run / CHECKPOINT_NAMES[1]))
    assert str(run) in str(err.value) and "\n" not in str(err.value)
    assert sorted(p.name for p in run.iterdir()) == CHECKPOINT_NAMES  # nothing deleted


class RayStarted(Exception):
    """Raised by a stand-in for init_ray: fit got past its checks."""


def test_only_a_finished_checkpoint_makes_a_run_exist(images, run_folder, tmp_path, monkeypatch, caplog):
    import xswinir.trainer as trainer
    from xswinir.errors import UserError

    def init_ray(*args, **kwargs):
        raise RayStarted

    monkeypatch.setattr(trainer, "init_ray", init_ray)
    cfg = tiny_config(images, f"run.storage={tmp_path}", "run.name=run", f"run.log_dir={tmp_path / 'logs'}")
    run = tmp_path / "run"
    (run / "logs").mkdir(parents=True)  # what a run that failed at step 1 leaves
    (run / CHECKPOINT_NAMES[1]).mkdir()
    (run / CHECKPOINT_NAMES[1] / "model.safetensors").write_bytes(b"half")  # and one that died while saving
    assert not trainer.run_exists(cfg.run)
    with pytest.raises(RayStarted):
        trainer.fit(cfg)  # the same name again, no --resume needed
    with caplog.at_level(logging.WARNING, logger="xswinir.trainer"), pytest.raises(RayStarted):
        trainer.fit(cfg, resume=True)
    assert "no finished checkpoint: it starts from step 0" in caplog.text

    shutil.rmtree(run / CHECKPOINT_NAMES[1])
    shutil.copytree(run_folder[0] / CHECKPOINT_NAMES[0], run / CHECKPOINT_NAMES[0])
    assert trainer.run_exists(cfg.run)
    with pytest.raises(UserError, match="already exists.*--resume"):
        trainer.fit(cfg)
    with pytest.raises(RayStarted):
        trainer.fit(cfg, resume=True)
    _truncate(run / CHECKPOINT_NAMES[0])
    with pytest.raises(CheckpointError, match=f"none of the 1 checkpoint.*in run folder {run}"):
        trainer.fit(cfg, resume=True)
    with pytest.raises(UserError, match="nothing to resume"):
        trainer.fit(tiny_config(images, f"run.storage={tmp_path}", "run.name=other"), resume=True)


def _ray_snapshot(run: Path, latest: str | None, names: list[str]) -> None:
    # The fields of Ray 2.60's run snapshot that fit() reads (the integration test runs against the real one).
    entry = lambda name: {"version": 0, "checkpoint_dir_name": name, "metrics": {}}  # noqa: E731
    (run / "checkpoint_manager_snapshot.json").write_text(json.dumps({
        "checkpoint_results": [entry(n) for n in names], "checkpoint_report_indices": list(range(len(names))),
        "latest_checkpoint_result": entry(latest) if latest else None, "pending_training_results": [],
        "pending_validation_specs": [], "current_report_index": len(names),
    }))


@pytest.mark.parametrize("case", ["consistent", "older-good", "missing", "unreadable"])
def test_ray_snapshot_is_set_aside_unless_it_agrees(run_folder, tmp_path, case):
    from xswinir.trainer import _prepare_ray_snapshot

    run = tmp_path / "run"
    shutil.copytree(run_folder[0], run)
    old, new = CHECKPOINT_NAMES
    resume_from = old if case == "older-good" else new
    names = [old, new] + (["checkpoint_2026-01-01_00-00-06.000000"] if case == "missing" else [])
    _ray_snapshot(run, names[-1], names)
    if case == "unreadable":
        (run / "checkpoint_manager_snapshot.json").write_text('{"checkpoint_results": [')
    before = (run / "checkpoint_manager_snapshot.json").read_text()
    _prepare_ray_snapshot(pafs.LocalFileSystem(), str(run), resume_from)
    aside = list(run.glob("checkpoint_manager_snapshot.set-aside-*.json"))
    if case == "consistent":
        assert not aside and (run / "checkpoint_manager_snapshot.json").read_text() == before
    else:
        assert not (run / "checkpoint_manager_snapshot.json").exists()
        assert len(aside) == 1 and aside[0].read_text() == before  # moved, not deleted
    assert all((run / name).is_dir() for name in CHECKPOINT_NAMES)
