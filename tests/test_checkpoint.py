"""Weights and checkpoints: our safetensors and official ``.pth`` layouts, the architecture read from a state dict
and the one-line errors of a file that does not fit; training checkpoints: the manifest, recognising each way a
checkpoint folder gets damaged (on a local folder and through a non-local pyarrow filesystem, the code path of
s3:// and gs://), and restoring one, with the streamed data's position (which checkpoint of a run folder a run
resumes from: tests/test_runs.py)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch
from safetensors.torch import save_file

from xswinir.checkpoint import (
    EMA_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    STATE_FILE,
    STREAM_FILE,
    CheckpointError,
    CheckpointMismatchError,
    checkpoint_problem,
    infer_model_config,
    load_checkpoint,
    load_model,
    load_state_dict_strict,
    load_stream_position,
    save_checkpoint,
    save_weights,
)
from xswinir.config import load_config
from xswinir.errors import UserError
from xswinir.model import build_swinir
from xswinir.model_spec import MODEL_PRESETS, ModelConfig

TINY = ["model.depths=[1]", "model.num_heads=[2]", "model.embed_dim=12", "model.window_size=4", "data.gt_size=16"]


def tiny(**overrides) -> ModelConfig:
    base = dict(upscale=2, in_chans=3, img_size=16, window_size=4, depths=(2,), embed_dim=12, num_heads=(2,),
                upsampler="pixelshuffledirect")
    return ModelConfig(**{**base, **overrides})


def test_save_and_load_round_trip(tmp_path: Path, generator) -> None:
    cfg = tiny(upsampler="pixelshuffle", upscale=3, in_chans=1, resi_connection="3conv")
    model = build_swinir(cfg).eval()
    save_weights(model, cfg, tmp_path / "w.safetensors")
    loaded, loaded_cfg = load_model(tmp_path / "w.safetensors")
    assert loaded_cfg == cfg
    lq = torch.rand(1, 1, 11, 9, generator=generator)
    with torch.no_grad():
        assert torch.equal(model(lq), loaded(lq))


def test_training_directory_prefers_ema(tmp_path: Path) -> None:
    cfg = tiny()
    plain, ema = build_swinir(cfg), build_swinir(cfg)
    save_weights(plain, cfg, tmp_path / "ckpt" / "model.safetensors")
    save_weights(ema, cfg, tmp_path / "ckpt" / "model_ema.safetensors")
    got, _ = load_model(tmp_path / "ckpt")
    assert torch.equal(got.conv_first.weight, ema.conv_first.weight)
    got, _ = load_model(tmp_path / "ckpt", prefer_ema=False)
    assert torch.equal(got.conv_first.weight, plain.conv_first.weight)


def test_pth_with_params_ema_and_wrapper_prefixes(tmp_path: Path) -> None:
    cfg = tiny()
    plain, ema = build_swinir(cfg), build_swinir(cfg)
    torch.save({"params": plain.state_dict(),
                "params_ema": {f"module.{k}": v for k, v in ema.state_dict().items()}}, tmp_path / "m.pth")
    got, _ = load_model(tmp_path / "m.pth", model_cfg=cfg)
    assert torch.equal(got.conv_first.weight, ema.conv_first.weight)
    got, _ = load_model(tmp_path / "m.pth", model_cfg=cfg, prefer_ema=False)
    assert torch.equal(got.conv_first.weight, plain.conv_first.weight)


def test_wrong_preset_gives_helpful_error(tmp_path: Path) -> None:
    cfg = dataclasses.replace(MODEL_PRESETS["tiny-x2"], upscale=4)
    with torch.device("meta"):
        model = build_swinir(cfg)
    torch.save({"params": {k: torch.zeros(v.shape) for k, v in model.state_dict().items()}}, tmp_path / "x4.pth")
    with pytest.raises(CheckpointMismatchError) as info:
        load_model(tmp_path / "x4.pth", preset="tiny-x2")
    message = str(info.value)
    assert "shape mismatches" in message and "upsample.0.weight" in message
    assert "scale mismatch: the checkpoint upscales x4, the model x2" in message


def test_wrong_architecture_names_the_preset() -> None:
    with torch.device("meta"):
        big = build_swinir(MODEL_PRESETS["swinir-m-x2"])
        small = build_swinir(MODEL_PRESETS["swinir-s-x2"])
    with pytest.raises(CheckpointMismatchError) as info:
        load_state_dict_strict(small, big.state_dict())
    message = str(info.value)
    assert "missing keys" not in message and "unexpected keys: " in message  # 6 stages vs 4
    assert "6 stages" in message and "embed_dim 180" in message and "swinir-m-x2" in message


def test_missing_and_garbled_files_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope.pth", preset="tiny-x2")
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable"):
        load_model(tmp_path / "bad.pth", preset="tiny-x2")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(UserError, match="not a readable"):
        load_model(tmp_path / "bad.safetensors")
    torch.save({"params": build_swinir(tiny()).state_dict()}, tmp_path / "noconfig.pth")
    with pytest.raises(CheckpointError, match="carries no model config"):
        load_model(tmp_path / "noconfig.pth")


def test_infer_model_config_reads_architecture() -> None:
    with torch.device("meta"):
        for name in ("swinir-s-x3", "swinir-m-x8", "swinir-real-l-x4", "swinir-jpeg-gray"):
            cfg = MODEL_PRESETS[name]
            found = infer_model_config(build_swinir(cfg).state_dict())
            for field in ("upscale", "in_chans", "window_size", "depths", "embed_dim", "num_heads", "upsampler",
                          "resi_connection"):
                assert found[field] == getattr(cfg, field), (name, field)


def test_crafted_state_dict_gives_a_one_line_mismatch_not_a_crash(tmp_path) -> None:
    """Shapes no SwinIR has (a 1-D first conv, an empty MLP) must still end in the mismatch error."""
    odd = {"conv_first.weight": torch.zeros(7), "layers.0.residual_group.blocks.0.mlp.fc1.weight": torch.zeros(0, 3)}
    assert "embed_dim" not in infer_model_config(odd)  # the hint stays partial instead of raising
    save_file(odd, str(tmp_path / "odd.safetensors"))
    with pytest.raises(CheckpointMismatchError, match="does not fit the model"):
        load_model(tmp_path / "odd.safetensors", preset="tiny-x2")


# Training checkpoints.


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


def test_the_stream_position_is_kept_and_guarded_by_the_manifest(tmp_path):
    cfg = load_config("demo", TINY)
    model, ema = build_swinir(cfg.model), build_swinir(cfg.model)
    optimizer = torch.optim.Adam(model.parameters())
    # As xswinir.stream.StreamRecorder.for_checkpoint gives it: JSON turns the (epoch, row) pairs into lists.
    position = {"world_size": 1, "seed": 3, "rows": 30,
                "positions": [{"step": 4, "epoch": 0, "pending": [[0, 7], [0, 2]], "buffer": [[0, 5]]}]}
    save_checkpoint(tmp_path / "streamed", cfg, model, ema, optimizer, 4, None, stream_position=position)
    save_checkpoint(tmp_path / "in_memory", cfg, model, ema, optimizer, 4, None)
    assert load_stream_position(tmp_path / "streamed") == position
    assert load_stream_position(tmp_path / "in_memory") is None  # and so for checkpoints older than positions
    assert checkpoint_problem(tmp_path / "streamed") is None
    (tmp_path / "streamed" / STREAM_FILE).write_text(json.dumps({"format": 1, **position, "seed": 4}))
    assert f"{STREAM_FILE} does not match its sha256" in checkpoint_problem(tmp_path / "streamed")
