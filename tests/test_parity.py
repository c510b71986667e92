"""Parity with the official SwinIR code: same weights, same input, same output.

The reference vectors in ``shared/data/swinir_reference`` were made with the official
``network_swinir.py`` (see ``SOURCES.md`` there); input sizes are deliberately not multiples of the
window, so the padding and cropping are checked too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from xswinir.checkpoint import load_model, load_state_dict_strict
from xswinir.config import ModelConfig
from xswinir.model import REBUILT_BUFFERS, build_swinir, count_parameters

VARIANTS = ["swinir_s_x2", "swinir_s_x4", "classical_small_x3", "real_small_x4", "denoise_gray_small", "jpeg_small"]


def _variant(shared_data: Path, name: str) -> dict:
    return json.loads((shared_data / "swinir_reference" / "variants.json").read_text())[name]


def _config(kwargs: dict) -> ModelConfig:
    return ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()})


@pytest.mark.parametrize("name", VARIANTS)
def test_official_checkpoint_gives_official_output(shared_data: Path, name: str) -> None:
    folder = shared_data / "swinir_reference"
    variant = _variant(shared_data, name)
    model = build_swinir(_config(variant["kwargs"])).eval()
    state_dict = torch.load(folder / f"{name}.pth", map_location="cpu", weights_only=True)["params"]

    ours = set(model.state_dict())
    theirs = {k for k in state_dict if k.rsplit(".", 1)[-1] not in REBUILT_BUFFERS}
    assert ours == theirs, f"missing {sorted(theirs - ours)[:5]}, unexpected {sorted(ours - theirs)[:5]}"
    assert len(state_dict) == variant["state_dict_keys"]
    load_state_dict_strict(model, state_dict)
    assert count_parameters(model) == variant["num_parameters"]

    io = load_file(str(folder / f"{name}.io.safetensors"))
    assert list(io["input"].shape) == variant["input_shape"]
    with torch.no_grad():
        sr = model(io["input"])
    assert list(sr.shape) == variant["output_shape"]
    torch.testing.assert_close(sr, io["output"], rtol=0, atol=1e-5)


def test_load_model_reads_official_pth(shared_data: Path) -> None:
    model, cfg = load_model(shared_data / "swinir_reference" / "swinir_s_x2.pth", preset="swinir-s-x2")
    assert cfg.preset == "swinir-s-x2" and not model.training
    io = load_file(str(shared_data / "swinir_reference" / "swinir_s_x2.io.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(model(io["input"]), io["output"], rtol=0, atol=1e-5)
