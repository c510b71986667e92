"""SwinIR's arguments without torch: the shared rules, the parameter estimate, the bounds and the presets."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest
import torch

from xswinir.config import load_config
from xswinir.errors import ConfigError
from xswinir.model import SwinIR, build_swinir, count_parameters, swinir_kwargs
from xswinir.model_spec import MODEL_PRESETS, ModelConfig, estimate_parameters


def test_model_spec_imports_without_torch():
    # The config (and with it the CLI's argument checks) validates a model section without loading torch.
    code = "import sys, xswinir.model_spec; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_model_rules_are_shared_with_swinir():
    # One rule for both: nearest+conv at x2 (the official real-world x2 models) is accepted by both, and
    # pixelshuffle at x32 refused by both.
    assert ModelConfig(upscale=2, upsampler="nearest+conv").upscale == 2
    SwinIR(upscale=2, upsampler="nearest+conv", depths=(1,), num_heads=(1,), embed_dim=4, img_size=8)
    for kwargs in (dict(upscale=32, upsampler="pixelshuffle"), dict(upscale=6, upsampler="pixelshuffle"),
                   dict(num_heads=(0, 0, 0, 0)), dict(embed_dim=60_000)):
        with pytest.raises(ConfigError) as from_config:
            ModelConfig(**kwargs)
        with pytest.raises(ValueError) as from_model:
            SwinIR(**kwargs)
        assert str(from_model.value) == str(from_config.value)


@pytest.mark.parametrize("variant", [
    MODEL_PRESETS["tiny-x2"],
    MODEL_PRESETS["swinir-s-x3"],
    ModelConfig(depths=(2, 1), num_heads=(3, 2), embed_dim=12, upsampler="pixelshuffle", upscale=8,
                resi_connection="3conv", img_size=4, mlp_ratio=1.5),
    ModelConfig(depths=(1,), num_heads=(2,), embed_dim=8, upsampler="nearest+conv", upscale=4, in_chans=1),
    ModelConfig(depths=(1, 1), num_heads=(1, 1), embed_dim=8, upsampler="", upscale=1, window_size=7),
    ModelConfig(depths=(1,), num_heads=(1,), embed_dim=8, upsampler="pixelshuffle", upscale=3),
])
def test_parameter_estimate_is_exact(variant):
    kwargs = swinir_kwargs(variant)
    del kwargs["img_range"], kwargs["drop_path_rate"]
    assert estimate_parameters(**kwargs) == count_parameters(build_swinir(variant))


def test_model_size_is_bounded_before_anything_is_allocated():
    with pytest.raises(ConfigError, match="parameters, more than"):
        load_config(None, ["model.embed_dim=6000"])  # 4 B parameters: refused in microseconds
    with pytest.raises(ConfigError, match="at most 256 in all"):
        load_config(None, ["model.depths=[1000]", "model.num_heads=[6]"])
    with pytest.raises(ConfigError, match=r"model.window_size must lie in \[1, 64\]"):
        load_config(None, ["model.window_size=1000"])


def test_swinir_defaults_are_the_model_configs():
    defaults = {n: p.default for n, p in inspect.signature(SwinIR.__init__).parameters.items() if n != "self"}
    assert defaults == {n: getattr(ModelConfig(), n) for n in defaults}


@pytest.mark.parametrize("name", sorted(MODEL_PRESETS))
def test_presets_are_named_by_their_key_and_estimated_exactly(name):
    cfg = MODEL_PRESETS[name]
    assert cfg.preset == name
    kwargs = swinir_kwargs(cfg)
    del kwargs["img_range"], kwargs["drop_path_rate"]
    with torch.device("meta"):  # shapes only: the large presets allocate nothing
        assert estimate_parameters(**kwargs) == count_parameters(build_swinir(cfg))
