"""Fine-tuning (``model.init_from``): strict by default, partial with ``model.init_strict: false``, from every
weight layout we read, into the model and its EMA but never the optimizer."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from xswinir.checkpoint import EMA_FILE, MODEL_FILE, CheckpointMismatchError, load_pretrained, save_weights
from xswinir.config import ModelConfig, load_config
from xswinir.export import export_checkpoint
from xswinir.model import build_swinir
from xswinir.trainer import build_training_parts

X2 = ModelConfig(upscale=2, img_size=16, window_size=4, depths=(2,), embed_dim=16, num_heads=(2,))
X4 = ModelConfig(upscale=4, img_size=16, window_size=4, depths=(2,), embed_dim=16, num_heads=(2,))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _trained(cfg: ModelConfig, seed: int) -> torch.nn.Module:
    """A model whose weights differ from any fresh initialisation."""
    torch.manual_seed(seed)
    model = build_swinir(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    return model


def _fresh(cfg: ModelConfig) -> torch.nn.Module:
    torch.manual_seed(123)
    return build_swinir(cfg)


def test_strict_load_of_another_architecture_is_one_line_naming_the_keys(tmp_path: Path) -> None:
    source = tmp_path / "x2.safetensors"
    save_weights(_trained(X2, 0), X2, source)
    with pytest.raises(CheckpointMismatchError) as info:
        load_pretrained(_fresh(X4), source)
    message = str(info.value)
    assert "\n" not in message
    assert "shape mismatches" in message and "upsample.0.weight (12, 16, 3, 3) vs (48, 16, 3, 3)" in message
    assert "model.init_strict=false" in message


def test_non_strict_loads_what_fits_and_initialises_the_rest(tmp_path: Path, caplog) -> None:
    trained = _trained(X2, 0)
    source = tmp_path / "x2.safetensors"
    save_weights(trained, X2, source)
    model = _fresh(X4)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    with caplog.at_level(logging.INFO, logger="xswinir.checkpoint"):
        fresh, ignored = load_pretrained(model, source, strict=False)

    assert fresh == ["upsample.0.weight", "upsample.0.bias"]
    assert sorted(ignored) == ["upsample.0.bias (12,) vs (48,)", "upsample.0.weight (12, 16, 3, 3) vs (48, 16, 3, 3)"]
    for key, value in model.state_dict().items():
        expected = before[key] if key in fresh else trained.state_dict()[key]
        assert torch.equal(value, expected), key
    assert "freshly initialised (not in the checkpoint or another shape): upsample.0.weight, upsample.0.bias" in (
        caplog.text)


@pytest.mark.parametrize("layout", ["official", "folder", "safetensors"])
def test_init_from_every_layout_takes_the_ema_weights(tmp_path: Path, layout: str) -> None:
    model, ema = _trained(X2, 0), _trained(X2, 1)
    folder = tmp_path / "checkpoint_000002"
    save_weights(model, X2, folder / MODEL_FILE)
    save_weights(ema, X2, folder / EMA_FILE)
    source = {"folder": folder, "official": tmp_path / "x2.pth", "safetensors": tmp_path / "x2.safetensors"}[layout]
    if layout != "folder":  # the official .pth holds params and params_ema; our safetensors the EMA weights
        export_checkpoint(folder, layout, source)

    target = _fresh(X2)
    assert load_pretrained(target, source) == ([], [])
    for key, value in target.state_dict().items():
        assert torch.equal(value, ema.state_dict()[key]), key


def test_training_parts_start_from_init_from(tmp_path: Path) -> None:
    trained = _trained(X2, 0)
    source = tmp_path / "x2.safetensors"
    save_weights(trained, X2, source)
    cfg = load_config(None, ["model.upscale=4", "model.img_size=16", "model.window_size=4", "model.depths=[2]",
                             "model.embed_dim=16", "model.num_heads=[2]", "data.gt_size=64", "loss.texture_weight=0",
                             f"model.init_from={source}", "model.init_strict=false"])

    parts = build_training_parts(cfg, torch.device("cpu"), classifier=None)

    for name, module in (("model", parts.model), ("ema", parts.ema.module)):
        state = module.state_dict()
        assert torch.equal(state["conv_first.weight"], trained.state_dict()["conv_first.weight"]), name
        assert state["upsample.0.weight"].shape == (48, 16, 3, 3), name
    assert parts.optimizer.state_dict()["state"] == {}  # the optimizer starts afresh


def test_shipped_finetune_config_starts_x4_from_an_official_x2_model(shared_data: Path, tmp_path: Path) -> None:
    x2 = shared_data / "swinir_reference" / "swinir_s_x2.pth"  # written by the original code
    cfg = load_config("finetune", [f"model.init_from={x2}"])
    assert (cfg.model.preset, cfg.model.init_strict) == ("swinir-s-x4", False)
    model = build_swinir(cfg.model)
    fresh, ignored = load_pretrained(model, cfg.model.init_from, strict=cfg.model.init_strict)
    assert fresh == ["upsample.0.weight", "upsample.0.bias"]
    assert sorted(key.split()[0] for key in ignored) == ["upsample.0.bias", "upsample.0.weight"]


def test_train_refuses_a_wrong_init_from_in_one_line_before_ray_starts(tmp_path: Path, capsys) -> None:
    from xswinir.cli import main

    source = tmp_path / "x2.safetensors"
    save_weights(_trained(X2, 0), X2, source)
    code = main(["train", "--storage", str(tmp_path / "runs"), "--set", "model.preset=tiny-x2",
                 "--set", f"model.init_from={source}", "--set", "loss.texture_weight=0"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "does not fit the model" in err and "conv_first.weight" in err
    assert not (tmp_path / "runs").exists()  # refused before Ray made the run folder
