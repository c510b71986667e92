"""Training checkpoints: the manifest, recognising each way a checkpoint folder gets damaged (on a local folder
and through a non-local pyarrow filesystem, the code path of s3:// and gs://), and restoring one (which checkpoint
of a run folder a run resumes from: tests/test_runs.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch

from xswinir.checkpoint import (
    EMA_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    STATE_FILE,
    checkpoint_problem,
    load_checkpoint,
    save_checkpoint,
)
from xswinir.config import load_config
from xswinir.model import build_swinir

TINY = ["model.depths=[1]", "model.num_heads=[2]", "model.embed_dim=12", "model.window_size=4", "data.gt_size=16"]


def _write(directory: Path, step: int = 3) -> Path:
    cfg = load_config("demo", TINY)
    torch.manual_seed(step)
    model, ema = build_swinir(cfg.model), build_swinir(cfg.model)
    optimizer = torch.optim.Adam(model.parameters())
    directory.mkdir(parents=True)
    save_checkpoint(directory, cfg, model, ema, optimizer, step, None)
    return directory


def truncate(folder: Path) -> None:
    path = folder / MODEL_FILE
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def delete_file(folder: Path) -> None:
    (folder / STATE_FILE).unlink()


def delete_folder(folder: Path) -> None:
    shutil.rmtree(folder)


def corrupt_manifest(folder: Path) -> None:
    path = folder / MANIFEST_FILE
    path.write_bytes(path.read_bytes()[:40])  # cut mid-write: not JSON any more


def unfinished(folder: Path) -> None:
    (folder / MANIFEST_FILE).unlink()  # what a save interrupted before its last file leaves


def flip_a_byte(folder: Path) -> None:
    path = folder / EMA_FILE
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


# damage -> what the reason must say, checking names and sizes only / also sha256 (None: passes)
DAMAGES = {
    truncate: ("model.safetensors has", "model.safetensors has"),
    delete_file: ("train_state.pt is missing", "train_state.pt is missing"),
    delete_folder: ("does not exist", "does not exist"),
    corrupt_manifest: ("manifest.json is damaged", "manifest.json is damaged"),
    unfinished: ("never finished", "never finished"),
    flip_a_byte: (None, "model_ema.safetensors does not match its sha256"),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    return _write(tmp_path_factory.mktemp("ckpt") / "checkpoint_2026-01-01_00-00-03.000000")


def test_manifest_lists_every_file_and_an_intact_checkpoint_passes(saved):
    manifest = json.loads((saved / MANIFEST_FILE).read_text())
    on_disk = {p.relative_to(saved).as_posix() for p in saved.rglob("*") if p.is_file()} - {MANIFEST_FILE}
    assert set(manifest["files"]) == on_disk >= {MODEL_FILE, EMA_FILE, STATE_FILE, "config.yaml"}
    assert manifest["files"][MODEL_FILE]["size"] == (saved / MODEL_FILE).stat().st_size
    assert checkpoint_problem(saved) is None
    assert checkpoint_problem(saved, hashes=False) is None


@pytest.mark.parametrize("remote", [False, True], ids=["local", "non-local-fs"])
@pytest.mark.parametrize("damage", list(DAMAGES), ids=lambda f: f.__name__)
def test_each_damage_is_recognised(saved, tmp_path, damage, remote):
    folder = tmp_path / saved.name
    shutil.copytree(saved, folder)
    damage(folder)
    if remote:
        # A SubTreeFileSystem is not a LocalFileSystem: the same calls S3 and GCS get, on a local folder.
        fs, path = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem()), folder.name
    else:
        fs, path = None, folder
    sizes_only, with_hashes = DAMAGES[damage]
    for hashes, expected in ((False, sizes_only), (True, with_hashes)):
        problem = checkpoint_problem(path, fs, hashes=hashes)
        if expected is None:
            assert problem is None
        else:
            assert problem is not None and expected in problem


def test_load_restores_this_ranks_rng_state(tmp_path):
    cfg = load_config("demo", TINY)
    model, ema = build_swinir(cfg.model), build_swinir(cfg.model)
    optimizer = torch.optim.Adam(model.parameters())
    states = []
    for seed in (10, 11):  # the RNG states of ranks 0 and 1
        torch.manual_seed(seed)
        states.append({"torch": torch.get_rng_state(), "cuda": None})
    save_checkpoint(tmp_path, cfg, model, ema, optimizer, 7, None, states)
    expected = [torch.Generator().manual_seed(s).get_state() for s in (10, 11)]
    for rank in (1, 0):
        torch.manual_seed(99)
        assert load_checkpoint(tmp_path, model, ema, optimizer, rank) == 7
        assert torch.equal(torch.get_rng_state(), expected[rank])
