"""The trainer without Ray: the learning-rate schedule, one step with the texture term, exact resume (from
image files, from Parquet shards held in memory or streamed from their saved position, and past a damaged
checkpoint), what fit checks before Ray starts, and the workers' loop config (no local path where storage and data
are URIs). Which checkpoint a run resumes from: tests/test_runs.py."""

from __future__ import annotations

import dataclasses
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

import xswinir.trainer as trainer
from xswinir.checkpoint import STREAM_FILE, load_checkpoint, save_checkpoint
from xswinir.config import Config, TrainConfig, load_config
from xswinir.data import build_train_batches
from xswinir.errors import ConfigError, UserError
from xswinir.model import DropPath
from xswinir.stream import ShardIndex, ShardStream, StreamPosition
from xswinir.texture import TextureClassifier, save_texture_classifier
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


def _flip_a_byte(folder: Path) -> None:
    # A damage only the sha256 check of the worker sees: names and sizes still match the manifest.
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
    start, stream_position = resume_training(parts, str(checkpoint), fs)
    assert stream_position is None  # image files: nothing streamed
    train(cfg, parts, file_batches(cfg, start), range(start, STEPS))
    return start, weights(parts)


def test_resume_past_a_damaged_checkpoint_equals_the_straight_run(images, run_folder, tmp_path):
    folder, final = run_folder
    run = tmp_path / "run"
    shutil.copytree(folder, run)
    cfg = tiny_config(images)
    _flip_a_byte(run / CHECKPOINT_NAMES[1])
    start, fell_back = finish_from(cfg, run / CHECKPOINT_NAMES[1])
    assert start == 2
    assert_same_weights(fell_back, finish_from(cfg, run / CHECKPOINT_NAMES[0])[1])  # resumed there directly
    assert_same_weights(fell_back, final)  # and the run that was never interrupted


def test_fallback_through_a_non_local_filesystem(images, run_folder, tmp_path):
    # SubTreeFileSystem is not a LocalFileSystem: checkpoints are downloaded before loading, as from S3.
    folder, final = run_folder
    shutil.copytree(folder, tmp_path / "run")
    _flip_a_byte(tmp_path / "run" / CHECKPOINT_NAMES[1])
    fs = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    start, fell_back = finish_from(tiny_config(images), f"run/{CHECKPOINT_NAMES[1]}", fs)
    assert start == 2
    assert_same_weights(fell_back, final)


class RayStarted(Exception):
    """Raised by a stand-in for build_trainer: fit got past its checks."""


def test_fit_checks_the_run_and_the_classifier_before_ray(images, run_folder, tmp_path, monkeypatch):
    seen = {}

    def build_trainer(cfg, loop_config, callbacks):
        seen.update(cfg=cfg, loop=loop_config)
        raise RayStarted

    monkeypatch.setattr(trainer, "init_ray", lambda *args, **kwargs: None)
    monkeypatch.setattr(trainer, "start_metrics_sink", lambda logs: f"sink for {logs}")
    monkeypatch.setattr(trainer, "stop_metrics_sink", lambda sink: seen.update(stopped=sink))
    monkeypatch.setattr(trainer, "build_trainer", build_trainer)
    clf = save_texture_classifier(TextureClassifier(patch_size=8, scales=(1, 2)), tmp_path / "clf")
    texture = ["loss.texture_weight=0.1", "texture.region_size=32", "texture.classifier.scales=[1,2]",
               f"texture.classifier.path={clf}"]
    cfg = tiny_config(images, *texture, "texture.patch_size=8", f"run.storage={tmp_path}", "run.name=run",
                      f"run.log_dir={tmp_path / 'logs'}")
    shutil.copytree(run_folder[0] / CHECKPOINT_NAMES[0], tmp_path / "run" / CHECKPOINT_NAMES[0])
    with pytest.raises(UserError, match="already exists.*--resume"):
        trainer.fit(cfg)
    with pytest.raises(RayStarted):
        trainer.fit(cfg, resume=True)
    loop = seen["loop"]
    assert loop["resume_from"] == f"{tmp_path}/run/{CHECKPOINT_NAMES[0]}"
    assert seen["cfg"].texture.classifier.path == str(clf)  # the run names the classifier the workers load
    assert loop["classifier"] == {f.name: f.read_bytes() for f in clf.iterdir()}  # its files travel to them
    # The workers' config leaves out the driver's folders: the sink writes the logs, the classifier travels.
    workers = Config.from_dict(loop["config"])
    assert workers.run.log_dir is None and workers.texture.classifier.path is None
    assert workers.texture == dataclasses.replace(seen["cfg"].texture, classifier=workers.texture.classifier)
    assert loop["metrics"] == f"sink for {tmp_path / 'logs'}" and seen["stopped"] == loop["metrics"]
    with pytest.raises(ConfigError, match="trained on 8 px patches but texture.patch_size is 16"):
        trainer.fit(tiny_config(images, *texture, "texture.patch_size=16", f"run.storage={tmp_path}",
                                "run.name=other", f"run.log_dir={tmp_path / 'logs'}"))


TEXTURE = ["loss.texture_weight=0.1", "texture.patch_size=8", "texture.region_size=32",
           "texture.classifier.scales=[1,2]", "model.drop_path_rate=0"]


@pytest.mark.parametrize("form", ["projection", "gated_pull"])
def test_the_search_in_the_loader_gives_the_steps_result(images, form):
    # texture.search_in=loader: the same loss, diagnostics and weights as the search in the step, bit for bit.
    cfg = tiny_config(images, *TEXTURE, f"loss.texture_form={form}")
    classifier = TextureClassifier(patch_size=8, scales=(1, 2))
    results = []
    for batch_fn in (None, trainer.loader_search(cfg, classifier, CPU)):
        parts = build_training_parts(cfg, CPU, classifier)
        batches = build_train_batches(cfg, rank=0, world_size=1, batch_fn=batch_fn)
        outs = [run_step(parts, parts.model, cfg.train, step, 0, next(batches)) for step in range(2)]
        results.append((outs, weights(parts)))
    (in_step, in_step_weights), (in_loader, in_loader_weights) = results
    for a, b in zip(in_step, in_loader, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], atol=0, rtol=0, msg=key)
    # On these noise images the gate stays closed (bicubic beats X c*): then the projection is the live term.
    assert in_loader[0]["loss_texture"] > 0 if form == "projection" else "texture_gate_open" in in_loader[0]
    assert_same_weights(in_loader_weights, in_step_weights)


def test_loader_workers_carry_the_match(images):
    # A real worker process searches (fork here; the batch function also pickles, see tests/test_search.py).
    cfg = tiny_config(images, *TEXTURE, "data.loader_workers=1")
    classifier = TextureClassifier(patch_size=8, scales=(1, 2))
    batch_fn = trainer.loader_search(cfg, classifier, CPU)
    in_worker = next(build_train_batches(cfg, rank=0, world_size=1, batch_fn=batch_fn))
    in_process = batch_fn(next(build_train_batches(cfg, rank=0, world_size=1)))
    assert "region" not in in_worker and in_worker.keys() == in_process.keys()
    for key in in_worker:
        torch.testing.assert_close(in_worker[key], in_process[key], atol=1e-6, rtol=0, msg=key)


def test_where_the_search_runs(images):
    classifier = TextureClassifier(patch_size=8, scales=(1, 2))
    cuda = torch.device("cuda")

    def where(*overrides: str, device: torch.device = CPU, clf: torch.nn.Module | None = classifier) -> str:
        batch_fn = trainer.loader_search(tiny_config(images, *TEXTURE, *overrides), clf, device)
        return "step" if batch_fn is None else "loader"

    assert where() == "loader"  # auto on the CPU with query gt
    assert where(device=cuda) == "step"  # auto on a GPU: the device searches
    assert where("texture.query=lq") == "step"  # the degraded input is made in the step
    assert where("texture.search_in=step") == "step"
    assert where("texture.search_in=loader", device=cuda) == "loader"
    assert where("loss.texture_weight=0", clf=None) == "step"
    # The loader's copy of the classifier is its own, on the CPU.
    batch_fn = trainer.loader_search(tiny_config(images, *TEXTURE), classifier, CPU)
    assert batch_fn.__self__.classifier is not classifier


def test_the_workers_get_no_local_path_when_storage_and_data_are_uris(tmp_path, caplog):
    # A texture run: the classifier the driver trained or read sits in a local folder, and so do its logs.
    cfg = tiny_config("s3://bucket/shards", *TEXTURE, "data.val=skimage:coins", "run.storage=s3://bucket/runs",
                      f"run.log_dir={tmp_path / 'logs'}", f"texture.classifier.path={tmp_path / 'clf'}")
    loop = trainer.build_loop_config(cfg, metrics_sink=object(), classifier={"meta.json": b"{}"},
                                     resume_from="s3://bucket/runs/xswinir/checkpoint_2026-01-01_00-00-02.000000")
    assert trainer.local_paths(loop) == []
    # What a worker would read or write on its own disk is named: the control.
    local = tiny_config(f"{tmp_path / 'hr'};skimage:grass", f"data.val={tmp_path / 'val'}", "run.storage=runs",
                        f"model.init_from={tmp_path / 'w.safetensors'}")
    local_loop = trainer.build_loop_config(local, None, resume_from=str(tmp_path / "ckpt"))
    assert trainer.local_paths(local_loop) == [
        f"model.init_from={tmp_path / 'w.safetensors'}", f"data.train={tmp_path / 'hr'}",
        f"data.val={tmp_path / 'val'}", "run.storage=runs", f"resume_from={tmp_path / 'ckpt'}"]
    # A run that joins a cluster says so in one line (a disk every node shares is fine: not an error).
    with caplog.at_level(logging.WARNING, logger="xswinir.trainer"):
        trainer.warn_local_paths(loop)
        trainer.warn_local_paths(local_loop)
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith(f"the workers get local paths (model.init_from={tmp_path / 'w.safetensors'}, ")


def test_a_streamed_run_resumes_from_its_saved_position_bit_for_bit(images, tmp_path, monkeypatch, caplog):
    from xswinir.shards import pack_images

    pack_images(images, tmp_path / "shards", progress=False)
    # A loader process draws two steps ahead of the loop: the recorder must keep the checkpoint's position.
    cfg = tiny_config(tmp_path / "shards", "data.stream_above_mb=0", "data.loader_workers=1", "train.val_every=2")
    parts = build_training_parts(cfg, CPU, None)
    batches, recorder = trainer.train_batches(cfg, 0, 1)
    assert recorder is not None  # streamed
    straight = []
    for step in range(STEPS):
        straight.append(run_step(parts, parts.model, cfg.train, step, 0, next(batches))["loss"])
        if step + 1 == 2:
            position = recorder.position(2)
            folder = tmp_path / "run" / CHECKPOINT_NAMES[0]
            folder.mkdir(parents=True)
            save_checkpoint(folder, cfg, parts.model, parts.ema.module, parts.optimizer, 2, None,
                            stream_position=recorder.for_checkpoint([position]))
    straight_weights = weights(parts)
    assert recorder.stream.position.step > STEPS  # the loader did draw ahead
    # The kept position is the one a replay to step 2 reaches.
    replayed = ShardStream(ShardIndex(tmp_path / "shards"), 2, cfg.train.seed, 0, 1, start_step=2,
                           crops_per_image=cfg.data.crops_per_image)
    assert position == replayed.position.state_dict()
    assert json.loads((folder / STREAM_FILE).read_text())["positions"][0]["step"] == 2

    def resume(saved_override=None):
        torch.manual_seed(1234)  # whatever a new process's global RNG holds
        parts = build_training_parts(cfg, CPU, None)
        start, saved = resume_training(parts, str(folder))
        batches, _ = trainer.train_batches(cfg, 0, 1, start, saved=saved if saved_override is None else saved_override)
        rest = [run_step(parts, parts.model, cfg.train, step, 0, next(batches))["loss"] for step in range(start, STEPS)]
        torch.testing.assert_close(torch.stack(straight[:start] + rest), torch.stack(straight), atol=0, rtol=0)
        assert_same_weights(weights(parts), straight_weights)

    with monkeypatch.context() as patched:  # the saved position is used: nothing is replayed
        patched.setattr(StreamPosition, "skip", lambda *args: pytest.fail("the stream was replayed"))
        resume()
    # A position of another world size does not apply: the stream is replayed, and that is exact too.
    saved = json.loads((folder / STREAM_FILE).read_text())
    with caplog.at_level(logging.INFO, logger="xswinir.trainer"):
        resume({**saved, "world_size": 2})
    assert "does not apply (world_size 2 -> 1); replaying the stream to step 2" in caplog.text
