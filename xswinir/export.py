"""Export a trained model for use elsewhere: the official SwinIR ``.pth`` layout, safetensors, ONNX.

Our checkpoints leave out the buffers that the official code stores (``relative_position_index`` in every
attention block, ``attn_mask`` in every shifted block) because our model rebuilds them per input size. The
official scripts load strictly, and spandrel (the loader behind chaiNNer and ComfyUI) recognises a SwinIR by
``relative_position_index`` and reads the window size and training size from these buffers, so an export
computes them exactly as the official ``network_swinir.py`` does for the model's ``img_size``:

* ``relative_position_index``: ``(w*w, w*w)`` int64, in every block;
* ``attn_mask``: ``(nW, w*w, w*w)`` float32 with ``nW = (img_size / w)^2``, only in the shifted (odd) blocks
  and only when the model shifts at all (the official code keeps ``None``, not a buffer, otherwise).

Keys come in the official order (a module's own buffers before its children's, a parameter before a buffer),
so the file matches one the official code writes key for key.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from xswinir.atomic import atomic_path
from xswinir.checkpoint import EMA_FILE, MODEL_FILE, load_model, model_config_from_metadata
from xswinir.config import ModelConfig
from xswinir.errors import UserError
from xswinir.model import SwinIR, pad_to_multiple, relative_position_index, shifted_window_mask

log = logging.getLogger(__name__)

ExportFormat = Literal["official", "safetensors", "onnx"]
FORMATS: tuple[str, ...] = typing.get_args(ExportFormat)
ONNX_INPUT, ONNX_OUTPUT = "lq", "sr"
ONNX_OPSET = 18

_BLOCK = re.compile(r"(layers\.\d+\.residual_group\.blocks\.\d+)\.norm1\.weight")
_BIAS_TABLE = re.compile(r"(layers\.\d+\.residual_group\.blocks\.\d+)\.attn\.relative_position_bias_table")


class ExportError(UserError):
    """A model that cannot be written in the asked format."""


def official_state_dict(model: SwinIR, img_size: int) -> dict[str, Tensor]:
    """Our weights plus the buffers of the official code, in its key order.

    Args:
        model: a SwinIR (not wrapped).
        img_size: the ``img_size`` of the official model that will load the weights (our config's); the masks
            of the shifted blocks are laid out for an ``img_size x img_size`` input.

    Raises:
        ExportError: ``img_size`` not a multiple of the window, which the official code cannot build.
    """
    window, shift = model.window_size, model.shift
    if shift and img_size % window:
        raise ExportError(f"model.img_size={img_size} is not a multiple of the window {window}: the official "
                          f"SwinIR cannot build its shifted-window masks for it")
    index = relative_position_index(window)
    mask = shifted_window_mask(img_size, img_size, window, shift, torch.device("cpu")).squeeze(1) if shift else None
    shifted = {name for name, module in model.named_modules() if getattr(module, "shifted", False) and shift}
    out: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        block = _BLOCK.fullmatch(key)
        if block and block[1] in shifted:
            out[f"{block[1]}.attn_mask"] = mask.clone()  # a block's own buffer precedes its children's
        out[key] = value.detach().cpu().contiguous()
        if _BIAS_TABLE.fullmatch(key):
            out[key.replace("relative_position_bias_table", "relative_position_index")] = index.clone()
    return out


def read_weight_sets(path: str | Path, preset: str | None = None) -> tuple[ModelConfig, dict[str, SwinIR]]:
    """The models a checkpoint holds: ``{"params": ..., "params_ema": ...}`` (EMA only where there is one).

    Args:
        path: a training checkpoint folder, our ``.safetensors`` or an official ``.pth`` (with ``preset``).
    """
    path = Path(path)
    if path.is_dir():
        files = {"params": path / MODEL_FILE, "params_ema": path / EMA_FILE}
        loaded = {name: load_model(file, preset=preset) for name, file in files.items() if file.is_file()}
        if not loaded:
            raise ExportError(f"{path} is a directory without {MODEL_FILE} or {EMA_FILE}")
        if "params" not in loaded:  # an EMA-only folder: the EMA weights are the model
            loaded["params"] = loaded.pop("params_ema")
        return loaded["params"][1], {name: model for name, (model, _) in loaded.items()}
    model, cfg = load_model(path, preset=preset, prefer_ema=False)
    models = {"params": model}
    if path.suffix == ".pth":  # an official file may hold both; load_model picks one per call
        data = torch.load(path, map_location="cpu", weights_only=True)
        if all(isinstance(data.get(key), dict) for key in ("params", "params_ema")):
            models["params_ema"] = load_model(path, preset=preset, prefer_ema=True)[0]
    return cfg, models


def _shared_config(cfg: ModelConfig) -> str:
    """The config an exported file carries: the architecture, without where this run started from."""
    return json.dumps(dataclasses.asdict(dataclasses.replace(cfg, init_from=None, init_strict=True)))


def export_official(models: Mapping[str, SwinIR], cfg: ModelConfig, out: str | Path) -> dict[str, Tensor]:
    """Writes ``{"params": ..., "params_ema": ...}`` as the official training code saves it; returns ``params``."""
    payload = {name: official_state_dict(model, cfg.img_size) for name, model in models.items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, out)
    return payload["params"]


def export_safetensors(model: SwinIR, cfg: ModelConfig, out: str | Path) -> dict[str, Tensor]:
    """Writes the official keys (buffers included) as safetensors, our config in the metadata."""
    from safetensors.torch import save_file

    state_dict = official_state_dict(model, cfg.img_size)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state_dict, str(out), metadata={"model_config": _shared_config(cfg), "format": "swinir-official"})
    return state_dict


def export_onnx(model: SwinIR, cfg: ModelConfig, out: str | Path, tile: int = 64) -> dict[str, str]:
    """Writes the model as ONNX for one image of dynamic height and width (multiples of the window).

    The legacy TorchScript exporter is used: it records the window layout (index tensors and shifted-window
    masks) as graph operations on the input's size, so one graph serves every size. torch.export, behind
    ``dynamo=True``, specialises that Python-side layout to the example size instead. What the graph cannot
    do is our reflect padding, a loop over the pad size: a caller pads to a multiple of the window first
    (:class:`OnnxModel` does, exactly as the model would). The batch is fixed at 1: traced with a dynamic
    batch, the graph fails for B > 1 where the per-window mask is added (ONNX Runtime: "Attempting to
    broadcast an axis by a dimension other than 1"); :class:`OnnxModel` runs a batch image by image.

    Args:
        tile: the side of the example input that traces the graph; rounded to a multiple of the window and at
            least two windows, so that shifted windows straddle a seam.

    Returns:
        The metadata written into the file (``model_config``, ``window_size``, ``upscale``, ``input``).
    """
    import copy
    import warnings

    try:
        import onnx
    except ImportError as err:
        raise ExportError("ONNX export needs the onnx extra: pip install 'xswinir[onnx]'") from err
    window = model.window_size
    tile = max(2 * window, tile // window * window)
    model = copy.deepcopy(model).eval().cpu()
    model._contexts.clear()  # a cached window layout would enter the graph as constants of its size
    example = torch.rand(1, model.in_chans, tile, tile)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on Python-side shape arithmetic, all expected
        torch.onnx.export(
            model, (example,), str(out), dynamo=False, opset_version=ONNX_OPSET,
            input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT],
            dynamic_axes={ONNX_INPUT: {2: "height", 3: "width"}, ONNX_OUTPUT: {2: "out_height", 3: "out_width"}},
        )
    metadata = {
        "model_config": _shared_config(cfg),
        "window_size": str(window),
        "upscale": str(model.upscale),
        "input": f"(1, {model.in_chans}, H, W) float32 in [0, 1]; H and W multiples of {window} (reflect-pad the "
                 f"bottom and right, crop the output); output (1, {model.in_chans}, H*{model.upscale}, "
                 f"W*{model.upscale})",
    }
    proto = onnx.load(str(out))
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(out))
    return metadata


class OnnxModel(nn.Module):
    """An ONNX Runtime session behind the interface of our model, so that :func:`xswinir.inference.restore`
    tiles it as it tiles the PyTorch model.

    Args:
        path: a file written by :func:`export_onnx`.
        providers: ONNX Runtime execution providers; CPU by default.

    Attributes:
        cfg: the model config stored in the file; ``window_size``, ``upscale``, ``in_chans`` as on SwinIR.
    """

    def __init__(self, path: str | Path, providers: list[str] | None = None) -> None:
        super().__init__()
        try:
            import onnxruntime
        except ImportError as err:
            raise ExportError("running an ONNX model needs onnxruntime: pip install 'xswinir[onnx]'") from err
        path = Path(path)
        if not path.is_file():
            raise ExportError(f"ONNX file {path} does not exist")
        try:
            self.session = onnxruntime.InferenceSession(str(path), providers=providers or ["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own exception types for a bad file
            raise ExportError(f"{path} is not a usable ONNX model ({type(err).__name__}: {err})") from err
        metadata = self.session.get_modelmeta().custom_metadata_map
        if "model_config" not in metadata:
            raise ExportError(f"{path} was not written by `xswinir export` (no model_config in its metadata)")
        self.cfg = model_config_from_metadata(metadata["model_config"], str(path))
        self.window_size = int(metadata["window_size"])
        self.upscale = int(metadata["upscale"])
        self.in_chans = self.cfg.in_chans

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, H, W)`` in [0, 1], any H and W -> ``(B, C, H * s, W * s)`` on ``x``'s device."""
        height, width = x.shape[-2:]
        padded = pad_to_multiple(x.detach().float().cpu(), self.window_size).contiguous()
        outputs = [self.session.run([ONNX_OUTPUT], {ONNX_INPUT: image[None].numpy()})[0] for image in padded]
        sr = torch.from_numpy(np.concatenate(outputs))[:, :, : height * self.upscale, : width * self.upscale]
        return sr.to(device=x.device, dtype=x.dtype)


def export_checkpoint(checkpoint: str | Path, fmt: ExportFormat, out: str | Path, preset: str | None = None,
                      tile: int = 64) -> Path:
    """Reads any checkpoint we load and writes it in ``fmt``; safetensors and ONNX get the EMA weights if any."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    cfg, models = read_weight_sets(checkpoint, preset)
    preferred = models.get("params_ema", models["params"])
    # An export that fails half-way (or is killed) must leave an earlier file of the same name as it was.
    with atomic_path(out) as tmp:
        if fmt == "official":
            export_official(models, cfg, tmp)
        elif fmt == "safetensors":
            export_safetensors(preferred, cfg, tmp)
        else:
            export_onnx(preferred, cfg, tmp, tile=tile)
    return Path(out)
