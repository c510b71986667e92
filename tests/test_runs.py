"""Run folders without Ray: listing checkpoints, when a run exists, what --resume starts from, Ray's snapshot set
aside, and a worker's fallback past damaged checkpoints (on a local folder and through a non-local filesystem)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch

from xswinir.checkpoint import EMA_FILE, MANIFEST_FILE, MODEL_FILE, STATE_FILE, CheckpointError, save_checkpoint
from xswinir.config import load_config
from xswinir.errors import UserError
from xswinir.model import build_swinir
from xswinir.paths import filesystem_and_path
from xswinir.runs import (
    RAY_SNAPSHOT_FILE,
    list_checkpoints,
    newest_good_checkpoint,
    prepare_ray_snapshot,
    prepare_run,
    run_exists,
    verified_checkpoint,
)

TINY = ["model.depths=[1]", "model.num_heads=[2]", "model.embed_dim=12", "model.window_size=4", "data.gt_size=16"]
CHECKPOINT_NAMES = ["checkpoint_2026-01-01_00-00-02.000000", "checkpoint_2026-01-01_00-00-04.000000"]


def _write(directory: Path, step: int) -> Path:
    cfg = load_config("demo", TINY)
    torch.manual_seed(step)
    model, ema = build_swinir(cfg.model), build_swinir(cfg.model)
    directory.mkdir(parents=True)
    save_checkpoint(directory, cfg, model, ema, torch.optim.Adam(model.parameters()), step, None)
    return directory


def _step(folder: Path) -> int:
    return torch.load(folder / STATE_FILE, weights_only=True)["step"]


# Damages of the newest checkpoint of a run (step 4); the step-2 checkpoint stays intact.
def _truncate(folder: Path) -> None:
    path = folder / MODEL_FILE
    path.write_bytes(path.read_bytes()[:1000])


def _delete_file(folder: Path) -> None:
    (folder / EMA_FILE).unlink()


def _delete_folder(folder: Path) -> None:
    shutil.rmtree(folder)


def _corrupt_manifest(folder: Path) -> None:
    (folder / MANIFEST_FILE).write_text("{not json")


def _flip_a_byte(folder: Path) -> None:
    path = folder / STATE_FILE
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> Path:
    """A run folder with checkpoints at steps 2 and 4."""
    folder = tmp_path_factory.mktemp("runs") / "run"
    for i, name in enumerate(CHECKPOINT_NAMES):
        _write(folder / name, step=2 * (i + 1))
    return folder


def test_file_uri_and_listing_pick_the_newest_good_checkpoint(tmp_path):
    run = tmp_path / "run"
    names = [f"checkpoint_2026-01-01_00-00-0{i}.000000" for i in (2, 4, 6)]
    for i, name in enumerate(names):
        _write(run / name, step=2 * (i + 1))
    (run / "logs").mkdir()  # not a checkpoint
    _truncate(run / names[2])
    fs, path = filesystem_and_path(f"file://{run}")
    found = list_checkpoints(path, fs)
    assert [p.rsplit("/", 1)[-1] for p in found] == names
    good, skipped = newest_good_checkpoint(found, fs)
    assert good.endswith(names[1])
    assert [(p.rsplit("/", 1)[-1], "model.safetensors has" in why) for p, why in skipped] == [(names[2], True)]
    assert list_checkpoints(f"{path}/missing", fs) == []
    for name in names[:2]:
        _corrupt_manifest(run / name)
    assert newest_good_checkpoint(found, fs)[0] is None


@pytest.mark.parametrize("damage", [_truncate, _delete_file, _delete_folder, _corrupt_manifest, _flip_a_byte],
                         ids=lambda f: f.__name__[1:])
def test_a_worker_falls_back_to_the_newest_good_checkpoint(run_folder, tmp_path, caplog, damage):
    run = tmp_path / "run"
    shutil.copytree(run_folder, run)
    damage(run / CHECKPOINT_NAMES[1])
    with caplog.at_level(logging.WARNING, logger="xswinir.runs"), \
            verified_checkpoint(str(run / CHECKPOINT_NAMES[1])) as folder:
        assert folder == run / CHECKPOINT_NAMES[0] and _step(folder) == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and CHECKPOINT_NAMES[1] in warnings[0]
    assert all((run / name).exists() for name in CHECKPOINT_NAMES if damage is not _delete_folder)


def test_fallback_through_a_non_local_filesystem_downloads_the_checkpoint(run_folder, tmp_path, caplog):
    # SubTreeFileSystem is not a LocalFileSystem: checkpoints are downloaded before loading, as from S3.
    shutil.copytree(run_folder, tmp_path / "run")
    _truncate(tmp_path / "run" / CHECKPOINT_NAMES[1])
    fs = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    with caplog.at_level(logging.WARNING, logger="xswinir.runs"), \
            verified_checkpoint(f"run/{CHECKPOINT_NAMES[1]}", fs) as folder:
        assert not folder.is_relative_to(tmp_path) and _step(folder) == 2
        assert (folder / MANIFEST_FILE).read_bytes() == (run_folder / CHECKPOINT_NAMES[0] / MANIFEST_FILE).read_bytes()
    assert not folder.exists()  # the download is gone after the block
    assert [r.levelno for r in caplog.records] == [logging.WARNING]


def test_only_rank_0_warns(run_folder, tmp_path, caplog):
    shutil.copytree(run_folder, tmp_path / "run")
    _truncate(tmp_path / "run" / CHECKPOINT_NAMES[1])
    with caplog.at_level(logging.WARNING, logger="xswinir.runs"), \
            verified_checkpoint(str(tmp_path / "run" / CHECKPOINT_NAMES[1]), rank=1) as folder:
        assert _step(folder) == 2
    assert not caplog.records


def test_no_good_checkpoint_is_a_one_line_error_naming_the_run_folder(run_folder, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_folder, run)
    _corrupt_manifest(run / CHECKPOINT_NAMES[0])
    _truncate(run / CHECKPOINT_NAMES[1])
    with pytest.raises(CheckpointError, match="none of the 2 checkpoint") as err, \
            verified_checkpoint(str(run / CHECKPOINT_NAMES[1])):
        pass
    assert str(run) in str(err.value) and "\n" not in str(err.value)
    assert sorted(p.name for p in run.iterdir()) == CHECKPOINT_NAMES  # nothing deleted


def test_only_a_finished_checkpoint_makes_a_run_exist(run_folder, tmp_path, caplog):
    cfg = load_config("demo", [*TINY, f"run.storage={tmp_path}", "run.name=run"])
    run = tmp_path / "run"
    (run / "logs").mkdir(parents=True)  # what a run that failed at step 1 leaves
    (run / CHECKPOINT_NAMES[1]).mkdir()
    (run / CHECKPOINT_NAMES[1] / MODEL_FILE).write_bytes(b"half")  # and one that died while saving
    assert not run_exists(cfg.run)
    assert prepare_run(cfg.run, resume=False) is None  # the same name again, no --resume needed
    with caplog.at_level(logging.WARNING, logger="xswinir.runs"):
        assert prepare_run(cfg.run, resume=True) is None
    assert "no finished checkpoint: it starts from step 0" in caplog.text

    shutil.rmtree(run / CHECKPOINT_NAMES[1])
    shutil.copytree(run_folder / CHECKPOINT_NAMES[0], run / CHECKPOINT_NAMES[0])
    assert run_exists(cfg.run)
    with pytest.raises(UserError, match="already exists.*--resume"):
        prepare_run(cfg.run, resume=False)
    assert prepare_run(cfg.run, resume=True) == f"{run}/{CHECKPOINT_NAMES[0]}"  # absolute: workers read it
    _truncate(run / CHECKPOINT_NAMES[0])
    with pytest.raises(CheckpointError, match=f"none of the 1 checkpoint.*in run folder {run}"):
        prepare_run(cfg.run, resume=True)
    with pytest.raises(UserError, match="nothing to resume"):
        prepare_run(load_config("demo", [f"run.storage={tmp_path}", "run.name=other"]).run, resume=True)


def test_resume_starts_from_the_newest_good_checkpoint(run_folder, tmp_path, caplog):
    shutil.copytree(run_folder, tmp_path / "run")
    _truncate(tmp_path / "run" / CHECKPOINT_NAMES[1])
    cfg = load_config("demo", [f"run.storage={tmp_path}", "run.name=run"])
    with caplog.at_level(logging.WARNING, logger="xswinir.runs"):
        assert prepare_run(cfg.run, resume=True) == f"{tmp_path}/run/{CHECKPOINT_NAMES[0]}"
    assert len(caplog.records) == 1 and CHECKPOINT_NAMES[1] in caplog.records[0].getMessage()


def _ray_snapshot(run: Path, latest: str | None, names: list[str]) -> None:
    # The fields of Ray 2.60's run snapshot that prepare_ray_snapshot reads (the integration test runs against
    # the real one).
    entry = lambda name: {"version": 0, "checkpoint_dir_name": name, "metrics": {}}  # noqa: E731
    (run / RAY_SNAPSHOT_FILE).write_text(json.dumps({
        "checkpoint_results": [entry(n) for n in names], "checkpoint_report_indices": list(range(len(names))),
        "latest_checkpoint_result": entry(latest) if latest else None, "pending_training_results": [],
        "pending_validation_specs": [], "current_report_index": len(names),
    }))


@pytest.mark.parametrize("case", ["consistent", "older-good", "missing", "unreadable"])
def test_ray_snapshot_is_set_aside_unless_it_agrees(run_folder, tmp_path, case):
    run = tmp_path / "run"
    shutil.copytree(run_folder, run)
    old, new = CHECKPOINT_NAMES
    resume_from = old if case == "older-good" else new
    names = [old, new] + (["checkpoint_2026-01-01_00-00-06.000000"] if case == "missing" else [])
    _ray_snapshot(run, names[-1], names)
    if case == "unreadable":
        (run / RAY_SNAPSHOT_FILE).write_text('{"checkpoint_results": [')
    before = (run / RAY_SNAPSHOT_FILE).read_text()
    prepare_ray_snapshot(pafs.LocalFileSystem(), str(run), resume_from)
    aside = list(run.glob("checkpoint_manager_snapshot.set-aside-*.json"))
    if case == "consistent":
        assert not aside and (run / RAY_SNAPSHOT_FILE).read_text() == before
    else:
        assert not (run / RAY_SNAPSHOT_FILE).exists()
        assert len(aside) == 1 and aside[0].read_text() == before  # moved, not deleted
    assert all((run / name).is_dir() for name in CHECKPOINT_NAMES)
