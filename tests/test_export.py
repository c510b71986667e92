"""``xswinir export``: the official layout against files the original code wrote, a strict load into the original
class, spandrel as a real third-party consumer, ONNX Runtime, and our own loader reading every export back.

The original ``network_swinir.py`` is never committed: put it at ``third_party/swinir/network_swinir.py`` (see
the README, "Export and fine-tune") to run the strict-load test.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from xswinir.checkpoint import EMA_FILE, MODEL_FILE, load_model, save_weights
from xswinir.cli import main
from xswinir.config import ModelConfig
from xswinir.export import ExportError, OnnxModel, export_checkpoint, official_state_dict
from xswinir.inference import restore
from xswinir.model import build_swinir, swinir_kwargs

ORIGINAL = Path(__file__).resolve().parents[1] / "third_party" / "swinir" / "network_swinir.py"
REFERENCE_VARIANTS = ["swinir_s_x2", "swinir_s_x4", "classical_small_x3", "real_small_x4", "denoise_gray_small",
                      "jpeg_small"]

# Tiny versions of the two families spandrel must recognise: window 4 on a 16x16 training size (16 windows).
LIGHTWEIGHT = ModelConfig(upscale=2, img_size=16, window_size=4, depths=(2, 2), embed_dim=24, num_heads=(2, 2))
CLASSICAL = ModelConfig(upscale=3, img_size=16, window_size=4, depths=(2,), embed_dim=16, num_heads=(2,),
                        upsampler="pixelshuffle")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model(cfg: ModelConfig, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_swinir(cfg).eval()
    with torch.no_grad():  # non-zero biases and LayerNorm affines, so a key loaded into the wrong slot shows
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def _ours(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def _train_folder(tmp_path: Path, cfg: ModelConfig) -> tuple[Path, torch.nn.Module, torch.nn.Module]:
    """A training checkpoint folder's weight files: different plain and EMA weights."""
    folder = tmp_path / "checkpoint_000001"
    model, ema = _model(cfg, seed=0), _model(cfg, seed=1)
    save_weights(model, cfg, folder / MODEL_FILE)
    save_weights(ema, cfg, folder / EMA_FILE)
    return folder, model, ema


@pytest.mark.parametrize("name", REFERENCE_VARIANTS)
def test_official_export_equals_the_file_the_original_code_wrote(shared_data: Path, tmp_path: Path,
                                                                  name: str) -> None:
    folder = shared_data / "swinir_reference"
    kwargs = json.loads((folder / "variants.json").read_text())[name]["kwargs"]
    cfg = ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()})
    reference = torch.load(folder / f"{name}.pth", map_location="cpu", weights_only=True)
    model, _ = load_model(folder / f"{name}.pth", model_cfg=cfg)  # our layout: the buffers are dropped

    out = export_checkpoint(*_saved(model, cfg, tmp_path), "official", tmp_path / "export.pth")
    exported = torch.load(out, map_location="cpu", weights_only=True)

    assert list(exported) == ["params"]
    assert list(exported["params"]) == list(reference["params"])  # same keys in the same order
    for key, value in reference["params"].items():
        got = exported["params"][key]
        assert (got.shape, got.dtype) == (value.shape, value.dtype), key
        assert torch.equal(got, value), key  # buffers recomputed exactly, weights carried exactly


def _saved(model: torch.nn.Module, cfg: ModelConfig, tmp_path: Path) -> tuple[Path]:
    path = tmp_path / "ours.safetensors"
    save_weights(model, cfg, path)
    return (path,)


@pytest.mark.skipif(not ORIGINAL.is_file(), reason=f"the original SwinIR code is not at {ORIGINAL} (never "
                                                    "committed; see README, 'Export and fine-tune')")
@pytest.mark.filterwarnings("ignore:Importing from timm.models.layers", "ignore:torch.meshgrid")  # its imports
@pytest.mark.parametrize("cfg", [LIGHTWEIGHT, CLASSICAL], ids=["lightweight", "classical"])
def test_official_export_loads_strictly_into_the_original_code(tmp_path: Path, cfg: ModelConfig) -> None:
    spec = importlib.util.spec_from_file_location("original_network_swinir", ORIGINAL)
    original = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(original)
    folder, model, ema = _train_folder(tmp_path, cfg)
    out = tmp_path / "official.pth"
    assert main(["export", str(folder), "--format", "official", "--out", str(out)]) == 0

    exported = torch.load(out, map_location="cpu", weights_only=True)
    assert set(exported) == {"params", "params_ema"}
    x = torch.rand(1, 3, 13, 18)  # not multiples of the window: both pad and crop
    for key, ours in (("params", model), ("params_ema", ema)):
        theirs = original.SwinIR(**swinir_kwargs(cfg)).eval()
        theirs.load_state_dict(exported[key], strict=True)
        torch.testing.assert_close(_ours(theirs, x), _ours(ours, x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("cfg", [LIGHTWEIGHT, CLASSICAL], ids=["lightweight", "classical"])
@pytest.mark.parametrize("fmt", ["official", "safetensors"])
def test_spandrel_detects_the_export_and_matches_our_output(tmp_path: Path, cfg: ModelConfig, fmt: str) -> None:
    from spandrel import ModelLoader

    folder, _, ema = _train_folder(tmp_path, cfg)
    out = tmp_path / ("model.pth" if fmt == "official" else "model.safetensors")
    export_checkpoint(folder, fmt, out)

    descriptor = ModelLoader().load_from_file(out)
    assert descriptor.architecture.id == "SwinIR"
    assert descriptor.scale == cfg.upscale
    assert descriptor.model.window_size == cfg.window_size
    assert f"s{cfg.img_size}w{cfg.window_size}" in descriptor.tags  # training size read off the masks
    x = torch.rand(2, 3, 13, 18)
    sr = _ours(ema, x)  # spandrel takes params_ema from an official .pth; safetensors hold the EMA weights
    torch.testing.assert_close(_ours(descriptor.model.eval(), x), sr, rtol=0, atol=1e-5)

    # Our own loader reads the export back: config from the metadata, or given for the .pth.
    model, loaded_cfg = load_model(out, model_cfg=None if fmt == "safetensors" else cfg)
    assert loaded_cfg == cfg
    torch.testing.assert_close(_ours(model, x), sr, rtol=0, atol=1e-6)


def test_safetensors_export_keeps_the_official_keys_and_our_config(tmp_path: Path) -> None:
    model = _model(LIGHTWEIGHT)
    out = export_checkpoint(*_saved(model, LIGHTWEIGHT, tmp_path), "safetensors", tmp_path / "x.safetensors")
    tensors = load_file(str(out))
    assert set(tensors) == set(official_state_dict(model, LIGHTWEIGHT.img_size))  # stored sorted by name
    assert tensors["layers.0.residual_group.blocks.1.attn_mask"].shape == (16, 16, 16)  # (16/4)^2 windows
    assert "layers.0.residual_group.blocks.0.attn_mask" not in tensors  # unshifted: None in the original


def test_export_refuses_a_training_size_the_original_cannot_build(tmp_path: Path) -> None:
    cfg = ModelConfig(upscale=2, img_size=18, window_size=4, depths=(2,), embed_dim=8, num_heads=(2,))
    source = _saved(_model(cfg), cfg, tmp_path)
    with pytest.raises(ExportError, match="img_size=18 is not a multiple of the window 4"):
        export_checkpoint(*source, "official", tmp_path / "x.pth")
    assert main(["export", str(source[0]), "--format", "official", "--out", str(tmp_path / "x.pth")]) == 2


def test_unknown_format_is_a_one_line_error_and_help_needs_no_torch(tmp_path: Path, capsys) -> None:
    assert main(["export", str(tmp_path / "any.safetensors"), "--format", "tflite", "--out", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown export format 'tflite'; choose one of official, safetensors, onnx" in err
    # Every command's parser (the formats of this one included) is built for `xswinir --help`: no torch there.
    code = "import sys; from xswinir.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


@pytest.fixture(scope="module")
def onnx_export(tmp_path_factory) -> tuple[torch.nn.Module, Path, Path]:
    """A lightweight model, its weights, and its ONNX export through the CLI, traced at 16x16 (done once)."""
    folder = tmp_path_factory.mktemp("onnx")
    model = _model(LIGHTWEIGHT)
    (source,) = _saved(model, LIGHTWEIGHT, folder)
    onnx_file = folder / "m.onnx"
    assert main(["export", str(source), "--format", "onnx", "--out", str(onnx_file), "--tile", "16"]) == 0
    return model, source, onnx_file


def test_onnx_export_runs_in_onnxruntime_at_other_sizes_and_through_the_tiler(onnx_export) -> None:
    model, _, onnx_file = onnx_export
    session = OnnxModel(onnx_file)
    assert (session.window_size, session.upscale, session.cfg) == (4, 2, LIGHTWEIGHT)

    for shape in [(1, 3, 24, 40), (2, 3, 13, 18), (1, 3, 3, 5)]:  # other sizes than traced; padded; batch 2
        x = torch.rand(shape)
        torch.testing.assert_close(session(x), _ours(model, x), rtol=0, atol=1e-4)
    lq = torch.rand(1, 3, 30, 37)
    torch.testing.assert_close(restore(session, lq, tile=16, overlap=8), restore(model, lq, tile=16, overlap=8),
                               rtol=0, atol=1e-4)


def test_upscale_onnx_writes_what_the_checkpoint_writes(onnx_export, tmp_path: Path) -> None:
    _, source, onnx_file = onnx_export
    image = tmp_path / "in" / "photo.png"
    image.parent.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 41, 3), dtype=np.uint8)).save(image)

    common = [str(image), "--tile", "16", "--overlap", "8", "--device", "cpu"]
    assert main(["upscale", *common, "--checkpoint", str(source), "--out", str(tmp_path / "pt")]) == 0
    assert main(["upscale", *common, "--onnx", str(onnx_file), "--out", str(tmp_path / "ort")]) == 0
    pt = np.asarray(Image.open(tmp_path / "pt" / "photo_x2.png"), dtype=np.int16)
    ort = np.asarray(Image.open(tmp_path / "ort" / "photo_x2.png"), dtype=np.int16)
    assert pt.shape == (60, 82, 3)
    assert np.abs(pt - ort).max() <= 1  # 1e-4 apart before rounding to 8 bits


def test_onnx_model_rejects_a_foreign_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(ExportError, match="not a usable ONNX model"):
        OnnxModel(bad)


@pytest.mark.slow
def test_onnx_export_of_a_classical_model(tmp_path: Path) -> None:
    cfg = ModelConfig(upscale=4, img_size=32, window_size=8, depths=(2, 2), embed_dim=48, num_heads=(4, 4),
                      upsampler="pixelshuffle")
    model = _model(cfg)
    out = export_checkpoint(*_saved(model, cfg, tmp_path), "onnx", tmp_path / "m.onnx")
    session = OnnxModel(out)
    for shape in [(1, 3, 64, 64), (1, 3, 40, 56), (2, 3, 21, 30)]:
        x = torch.rand(shape)
        torch.testing.assert_close(session(x), _ours(model, x), rtol=0, atol=1e-4)
