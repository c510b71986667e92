"""Checkpoints: model weights in every layout we read or write, and the training checkpoint folder.

* weights: our ``.safetensors`` (the model config in its metadata), the official ``.pth`` layout (``params`` /
  ``params_ema``), and training checkpoint folders; :func:`load_model` builds a SwinIR from any of them, and
  :func:`load_pretrained` fills a run's fresh model from any of them (``model.init_from``);
* a training checkpoint folder: weights, EMA weights, optimizer and RNG states, the config, the texture
  classifier the run trained with, and for streamed training data each rank's position in the stream, so that a
  checkpoint alone restores or explains a run; its manifest,
  written last, lists every file with size and sha256, so a damaged or unfinished folder is recognised
  (:func:`checkpoint_problem`) on a local disk and on remote storage alike. Which checkpoint of a run folder a
  run resumes from is :mod:`xswinir.runs`.

Every reader takes a local path or a URI (``s3://bucket/runs/.../checkpoint_...``): a checkpoint in a bucket is
downloaded to a temporary folder first (:func:`local_checkpoint`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import pickle
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from xswinir.atomic import sha256_stream
from xswinir.config import Config, build_section
from xswinir.errors import UserError
from xswinir.model import REBUILT_BUFFERS, SwinIR, build_swinir
from xswinir.model_spec import MODEL_PRESETS, ModelConfig
from xswinir.paths import filesystem_and_path, is_remote, remote_error

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    import pyarrow.fs as pafs

MODEL_FILE = "model.safetensors"
EMA_FILE = "model_ema.safetensors"
STATE_FILE = "train_state.pt"
CONFIG_FILE = "config.yaml"
CLASSIFIER_DIR = "classifier"
# Streamed training data only: where each rank's stream stands (xswinir.stream.StreamPosition.state_dict).
STREAM_FILE = "stream_position.json"
STREAM_FORMAT = 1
# Written last into a checkpoint folder: every file with its size and sha256 (see checkpoint_problem).
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1
REQUIRED_FILES = (MODEL_FILE, EMA_FILE, STATE_FILE)


class CheckpointMismatchError(UserError):
    """A state dict that does not fit the model built from the given config."""


class CheckpointError(UserError):
    """A checkpoint file that is missing, unreadable or carries no usable config."""



def infer_model_config(state_dict: Mapping[str, Tensor]) -> dict[str, Any]:
    """Architecture fields that can be read off a SwinIR state dict's shapes (best effort, for hints).

    ``img_size`` and ``img_range`` leave no trace in the weights and are not returned. A foreign or crafted
    file (a 1-D ``conv_first.weight``, a zero-sized dimension) gives the fields read before the odd tensor:
    these are hints for an error message, which must not fail in its turn.
    """
    found: dict[str, Any] = {}
    try:
        _read_architecture(state_dict, found)
    except (ValueError, IndexError, TypeError, AttributeError, ZeroDivisionError):
        pass
    return found


def _read_architecture(state_dict: Mapping[str, Tensor], found: dict[str, Any]) -> None:
    if "conv_first.weight" in state_dict:
        found["embed_dim"], found["in_chans"] = state_dict["conv_first.weight"].shape[:2]
    blocks: dict[int, set[int]] = {}
    heads: dict[int, int] = {}
    for key, value in state_dict.items():
        match = re.match(r"layers\.(\d+)\.residual_group\.blocks\.(\d+)\.", key)
        if match:
            layer, block = int(match[1]), int(match[2])
            blocks.setdefault(layer, set()).add(block)
            if key.endswith("attn.relative_position_bias_table"):
                heads[layer] = value.shape[1]
                found["window_size"] = (math.isqrt(value.shape[0]) + 1) // 2
            if key.endswith("mlp.fc1.weight") and "embed_dim" in found:
                found["mlp_ratio"] = value.shape[0] / found["embed_dim"]
    if blocks:
        found["depths"] = tuple(max(blocks[i]) + 1 for i in sorted(blocks))
        found["num_heads"] = tuple(heads.get(i, 0) for i in sorted(blocks))
    found["resi_connection"] = "3conv" if "conv_after_body.0.weight" in state_dict else "1conv"
    if "conv_up1.weight" in state_dict:
        found["upsampler"] = "nearest+conv"
        found["upscale"] = 4 if "conv_up2.weight" in state_dict else 2
    elif "conv_before_upsample.0.weight" in state_dict:
        found["upsampler"] = "pixelshuffle"
        convs = [v for k, v in state_dict.items() if re.fullmatch(r"upsample\.\d+\.weight", k)]
        if len(convs) == 1 and convs[0].shape[0] == 9 * convs[0].shape[1]:
            found["upscale"] = 3
        elif convs:
            found["upscale"] = 2 ** len(convs)
    elif "upsample.0.weight" in state_dict:
        found["upsampler"] = "pixelshuffledirect"
        out_chans = found.get("in_chans", 3)
        found["upscale"] = math.isqrt(state_dict["upsample.0.weight"].shape[0] // out_chans)
    elif "conv_last.weight" in state_dict:
        found["upsampler"], found["upscale"] = "", 1


_ARCH_FIELDS = ("upscale", "in_chans", "window_size", "depths", "embed_dim", "num_heads", "mlp_ratio", "upsampler",
                "resi_connection")


def matching_presets(found: Mapping[str, Any]) -> list[str]:
    """Presets whose architecture agrees with every field of ``found`` (from :func:`infer_model_config`)."""
    return [name for name, cfg in MODEL_PRESETS.items()
            if all(getattr(cfg, f) == found[f] for f in _ARCH_FIELDS if f in found)]


def _describe(found: Mapping[str, Any]) -> str:
    parts = []
    if "depths" in found:
        parts.append(f"{len(found['depths'])} stages of depths {list(found['depths'])}")
    if "embed_dim" in found:
        parts.append(f"embed_dim {found['embed_dim']}")
    if "upsampler" in found:
        parts.append(f"upsampler {found['upsampler']!r} x{found.get('upscale', '?')}")
    if "window_size" in found:
        parts.append(f"window {found['window_size']}")
    return ", ".join(parts)


def _strip_prefixes(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Drops the ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes and the rebuilt buffers."""
    clean = {}
    for key, value in state_dict.items():
        while key.startswith(("module.", "_orig_mod.")):
            key = key.split(".", 1)[1]
        if key.rsplit(".", 1)[-1] not in REBUILT_BUFFERS:
            clean[key] = value
    return clean


def _listing(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return f"{len(keys)} ({shown}{', ...' if len(keys) > limit else ''})"


def load_state_dict_strict(model: SwinIR, state_dict: Mapping[str, Tensor], source: str = "the checkpoint") -> None:
    """Loads weights that must fit exactly, apart from the buffers SwinIR rebuilds.

    Args:
        model: the model to fill.
        state_dict: official or our own layout; ``module.``/``_orig_mod.`` prefixes are accepted.
        source: how to name the checkpoint in the error message.

    Raises:
        CheckpointMismatchError: on missing or unexpected keys or shape mismatches; the message lists a few of
            each with counts and, where the shapes tell, which preset the checkpoint looks like.
    """
    state_dict = _strip_prefixes(state_dict)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong_shape = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                   if k in state_dict and state_dict[k].shape != v.shape]
    if not (missing or unexpected or wrong_shape):
        model.load_state_dict(state_dict, strict=True)
        return
    lines = [f"{source} does not fit the model:"]
    if missing:
        lines.append(f"  missing keys: {_listing(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys: {_listing(unexpected)}")
    if wrong_shape:
        lines.append(f"  shape mismatches (checkpoint vs model): {_listing(wrong_shape, 3)}")
    found = infer_model_config(state_dict)
    have = infer_model_config(expected)
    if found:
        lines.append(f"  the checkpoint has {_describe(found)}; the model has {_describe(have)}")
        presets = matching_presets(found)
        if presets:
            lines.append(f"  it looks like preset {' or '.join(presets)}")
        if found.get("upscale") != have.get("upscale") and "upscale" in found:
            lines.append(f"  scale mismatch: the checkpoint upscales x{found['upscale']}, the model "
                         f"x{have.get('upscale')}")
    raise CheckpointMismatchError("\n".join(lines))


def _config_to_json(cfg: ModelConfig) -> str:
    return json.dumps(dataclasses.asdict(cfg))


def model_config_from_metadata(text: str, source: str) -> ModelConfig:
    """The :class:`ModelConfig` stored as JSON in a weights file's metadata; ``source`` names the file in errors."""
    # Metadata comes with a file from anywhere: the config's typed loader checks every key, type and size
    # (the parameter bound included) before a model is built from it.
    try:
        return build_section(ModelConfig, json.loads(text), "model")
    except (ValueError, RecursionError) as err:  # ConfigError and JSONDecodeError are ValueErrors
        raise CheckpointError(f"{source}: the model config in its metadata is not usable ({err})") from err


def save_weights(model: nn.Module, cfg: ModelConfig, path: str | Path) -> None:
    """Writes the weights as safetensors with ``cfg`` as JSON in the metadata (key ``model_config``).

    Rebuilt buffers are left out, and a DDP/compile wrapper is looked through.
    """
    from safetensors.torch import save_file

    model = getattr(model, "module", model)
    model = getattr(model, "_orig_mod", model)
    tensors = {k: v.detach().contiguous().cpu() for k, v in _strip_prefixes(model.state_dict()).items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"model_config": _config_to_json(cfg), "format": "xswinir"})


def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], ModelConfig | None]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file ({err})") from err
    text = metadata.get("model_config")
    return tensors, model_config_from_metadata(text, str(path)) if text else None


def _read_pth(path: Path, prefer_ema: bool) -> dict[str, Tensor]:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" in str(err):  # it names a function or class to call: code, not tensors
            # torch's advice, to load it again with weights_only=False, would run the file's code: never passed on.
            raise CheckpointError(
                f"{path} holds Python objects besides tensors (a pickle), and loading them would run code from the "
                "file, so it is refused; if you trust its source, convert it on a machine where that is safe: load "
                "it there with PyTorch, save only its tensors (torch.save(state_dict, 'clean.pth')), then run "
                "`xswinir export clean.pth --format safetensors --out model.safetensors`") from err
        # Only the unpickler's own finding; the rest of torch's text is the weights_only=False advice.
        found = str(err).partition("WeightsUnpickler error:")[2].strip() or str(err).strip()
        detail = found.splitlines()[0] if found and "weights_only" not in found.splitlines()[0] else "garbled data"
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (UnpicklingError: {detail})") from err
    except Exception as err:  # torch.load raises many types for a garbled file
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({type(err).__name__}: {err})") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a {type(data).__name__}, not a state dict")
    keys = ("params_ema", "params") if prefer_ema else ("params", "params_ema")
    for key in (*keys, "state_dict", "model"):
        if isinstance(data.get(key), dict):
            return data[key]
    if not all(isinstance(v, Tensor) for v in data.values()):
        raise CheckpointError(f"{path} has no state dict under 'params'/'params_ema' and is not a bare one "
                              f"(top-level keys: {sorted(data)[:8]})")
    return data


def load_model(path: str | Path, preset: str | None = None, prefer_ema: bool = True,
               model_cfg: ModelConfig | None = None) -> tuple[SwinIR, ModelConfig]:
    """Builds a SwinIR from a checkpoint, in eval mode on the CPU.

    Args:
        path: a published/official ``.pth`` (state dict under ``params_ema``/``params``, or bare); a
            ``.safetensors`` written by :func:`save_weights`; or a training checkpoint directory holding
            ``model_ema.safetensors`` and/or ``model.safetensors``; a local path or a URI (:func:`local_checkpoint`).
        preset: a name in ``MODEL_PRESETS``; needed for a ``.pth``, overrides the stored config otherwise.
        prefer_ema: take the EMA weights when the checkpoint has both.
        model_cfg: an explicit architecture; wins over ``preset`` and the stored config.

    Returns:
        The model and the config it was built from.

    Raises:
        CheckpointError: a missing, unreadable or config-less file.
        CheckpointMismatchError: weights that do not fit the chosen architecture.
    """
    if preset is not None and preset not in MODEL_PRESETS:
        raise CheckpointError(f"unknown model preset {preset!r}; choose one of {sorted(MODEL_PRESETS)}")
    with local_checkpoint(path) as local:
        return _load_model(local, preset, prefer_ema, model_cfg)


def _load_model(path: Path, preset: str | None, prefer_ema: bool,
                model_cfg: ModelConfig | None) -> tuple[SwinIR, ModelConfig]:
    if path.is_dir():
        names = ("model_ema.safetensors", "model.safetensors") if prefer_ema else ("model.safetensors",
                                                                                    "model_ema.safetensors")
        files = [path / n for n in names if (path / n).is_file()]
        if not files:
            raise CheckpointError(f"{path} is a directory without model_ema.safetensors or model.safetensors")
        path = files[0]
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    stored = None
    if path.suffix == ".safetensors":
        state_dict, stored = _read_safetensors(path)
    else:
        state_dict = _read_pth(path, prefer_ema)
    cfg = model_cfg or (MODEL_PRESETS[preset] if preset else stored)
    if cfg is None:
        found = infer_model_config(_strip_prefixes(state_dict))
        presets = matching_presets(found)
        hint = f"; its shapes fit preset {' or '.join(presets)}" if presets else f" ({_describe(found)})"
        raise CheckpointError(f"{path} carries no model config: pass a preset or a model config{hint}")
    model = build_swinir(cfg)
    load_state_dict_strict(model, state_dict, source=str(path))
    return model.eval(), cfg


def load_pretrained(model: SwinIR, path: str | Path, strict: bool = True) -> tuple[list[str], list[str]]:
    """Fills ``model`` with the weights of a checkpoint, to fine-tune from them (``model.init_from``).

    Args:
        model: the freshly built (randomly initialised) model of the run.
        path: an official ``.pth``, our ``.safetensors`` (either layout) or a training checkpoint folder, local or
            a URI (:func:`local_checkpoint`); EMA weights are taken where there are any, as for inference.
        strict: every weight must fit. False: tensors that fit by name and shape load, and the model keeps
            its fresh initialisation for the rest (e.g. an x4 upsampler when starting from an x2 model).

    Returns:
        ``(fresh, ignored)``: the model's keys left at their initialisation, and the checkpoint's keys not used
        (with their shapes where only the shape differs); both empty when ``strict``.

    Raises:
        CheckpointError: a missing or unreadable file.
        CheckpointMismatchError: ``strict`` and the weights do not fit (one line naming the first mismatching
            keys), or nothing fits at all.
    """
    with local_checkpoint(path) as local:
        return _load_pretrained(model, local, strict)


def _load_pretrained(model: SwinIR, path: Path, strict: bool) -> tuple[list[str], list[str]]:
    source = f"model.init_from {path}"
    if path.is_dir():
        files = [path / name for name in (EMA_FILE, MODEL_FILE) if (path / name).is_file()]
        if not files:
            raise CheckpointError(f"{source} is a directory without {EMA_FILE} or {MODEL_FILE}")
        path = files[0]
    if not path.is_file():
        raise CheckpointError(f"{source} does not exist")
    state_dict = _read_safetensors(path)[0] if path.suffix == ".safetensors" else _read_pth(path, prefer_ema=True)
    if strict:
        try:
            load_state_dict_strict(model, state_dict, source=source)
        except CheckpointMismatchError as err:
            first, *details = (line.strip() for line in str(err).splitlines())
            reasons = f"{first} {'; '.join(details)}"
            raise CheckpointMismatchError(f"{reasons}; set model.init_strict=false to load only the tensors "
                                          f"that fit") from None
        log.info("initialised all %d tensors from %s", len(model.state_dict()), path)
        return [], []
    state_dict = _strip_prefixes(state_dict)
    expected = model.state_dict()
    fits = {k: v for k, v in state_dict.items() if k in expected and v.shape == expected[k].shape}
    if not fits:
        raise CheckpointMismatchError(f"{source}: not one tensor fits the model by name and shape")
    fresh = [k for k in expected if k not in fits]
    ignored = [k if k not in expected else f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}"
               for k, v in state_dict.items() if k not in fits]
    model.load_state_dict(fits, strict=False)
    log.info("initialised %d of %d tensors from %s (model.init_strict=false)", len(fits), len(expected), path)
    if fresh:
        log.info("freshly initialised (not in the checkpoint or another shape): %s", ", ".join(fresh))
    if ignored:
        log.info("ignored checkpoint tensors: %s", ", ".join(ignored))
    return fresh, ignored


def save_checkpoint(
    directory: Path, cfg: Config, model: nn.Module, ema_model: nn.Module, optimizer: torch.optim.Optimizer,
    step: int, classifier_dir: Path | None, rng_states: list[dict[str, Tensor | None]] | None = None,
    stream_position: dict[str, Any] | None = None,
) -> None:
    """Writes a self-contained checkpoint: weights, EMA weights, training state, config, classifier, manifest.

    Args:
        rng_states: every rank's RNG states (:func:`rng_state`), indexed by rank; None: this process's only.
        stream_position: where the streamed training data stands, as plain JSON data (the trainer's
            ``positions`` per rank and what they depend on); None when the data is not streamed.
    """
    save_weights(model, cfg.model, directory / MODEL_FILE)
    save_weights(ema_model, cfg.model, directory / EMA_FILE)
    state = {"step": step, "optimizer": optimizer.state_dict(), "rng": rng_states or [rng_state()]}
    torch.save(state, directory / STATE_FILE)
    (directory / CONFIG_FILE).write_text(cfg.to_yaml())
    if stream_position is not None:
        (directory / STREAM_FILE).write_text(json.dumps({"format": STREAM_FORMAT, **stream_position}))
    if classifier_dir is not None:
        shutil.copytree(classifier_dir, directory / CLASSIFIER_DIR)
    write_manifest(directory)  # last: a folder without a valid manifest is an unfinished checkpoint


def load_checkpoint(
    directory: Path, model: nn.Module, ema_model: nn.Module, optimizer: torch.optim.Optimizer, rank: int = 0
) -> int:
    """Restores weights, EMA, optimizer and this rank's RNG states in place; returns the completed steps.

    Check the folder with :func:`checkpoint_problem` first: this reads it as it is.
    """
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(directory / MODEL_FILE)))
    ema_model.load_state_dict(load_file(str(directory / EMA_FILE)))
    state = torch.load(directory / STATE_FILE, weights_only=True, map_location="cpu")
    optimizer.load_state_dict(state["optimizer"])
    rng = state["rng"]
    # A run resumed on more workers than it saved: the new ranks keep their own (every step reseeds anyway).
    if rank < len(rng):
        torch.set_rng_state(rng[rank]["torch"])
        if rng[rank]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng[rank]["cuda"])
    return int(state["step"])


def load_stream_position(directory: Path) -> dict[str, Any] | None:
    """What :func:`save_checkpoint` saved as ``stream_position``, or None: a checkpoint of data that was not
    streamed, or one written before positions were saved (the stream is then replayed from the step).

    Check the folder with :func:`checkpoint_problem` first: the manifest covers this file too.
    """
    path = directory / STREAM_FILE
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    if saved.pop("format", None) != STREAM_FORMAT:  # a format this version cannot read: replaying is exact too
        log.warning("%s: stream position of an unknown format; the stream is replayed instead", path)
        return None
    return saved


def rng_state() -> dict[str, Tensor | None]:
    """This process's CPU RNG state and its current CUDA device's, for :func:`save_checkpoint`."""
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def write_manifest(directory: Path) -> None:
    """Writes ``manifest.json``: every file of the checkpoint folder with its size and sha256.

    The files are read back from disk, so the manifest describes what was written, not what was meant to be;
    it appears by an atomic rename, so a half-written manifest never exists under its name.
    """
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST_FILE):
        with path.open("rb") as f:
            files[path.relative_to(directory).as_posix()] = {"size": path.stat().st_size, "sha256": sha256_stream(f)}
    tmp = directory / f".{MANIFEST_FILE}.tmp"
    tmp.write_text(json.dumps({"format": MANIFEST_FORMAT, "files": files}, indent=1))
    os.replace(tmp, directory / MANIFEST_FILE)


def checkpoint_problem(path: str | Path, filesystem: pafs.FileSystem | None = None, hashes: bool = True) -> str | None:
    """Why a checkpoint folder cannot be trusted, or None when its manifest and every file in it agree.

    Args:
        path: the folder, inside ``filesystem`` (a local path when ``filesystem`` is None).
        hashes: also compare every file's sha256 (reads the whole checkpoint); False checks names and sizes
            only, which costs one listing on remote storage.
    """
    import pyarrow as pa
    import pyarrow.fs as pafs

    fs = filesystem or pafs.LocalFileSystem()
    path = str(path).rstrip("/")
    try:
        if fs.get_file_info(path).type != pafs.FileType.Directory:
            return "the folder does not exist"
        if fs.get_file_info(f"{path}/{MANIFEST_FILE}").type != pafs.FileType.File:
            return f"it has no {MANIFEST_FILE} (the checkpoint was never finished)"
        with fs.open_input_stream(f"{path}/{MANIFEST_FILE}") as f:
            text = f.read()
        try:
            files = json.loads(text)["files"]
            expected = {name: (int(entry["size"]), str(entry["sha256"])) for name, entry in files.items()}
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            return f"its {MANIFEST_FILE} is damaged ({type(err).__name__}: {err})"
        lacking = [name for name in REQUIRED_FILES if name not in expected]
        if lacking:
            return f"its {MANIFEST_FILE} does not list {', '.join(lacking)}"
        infos = fs.get_file_info([f"{path}/{name}" for name in expected])
        for (name, (size, _)), info in zip(expected.items(), infos, strict=True):
            if info.type != pafs.FileType.File:
                return f"{name} is missing"
            if info.size != size:
                return f"{name} has {info.size} bytes, the manifest says {size}"
        if hashes:
            for name, (_, sha256) in expected.items():
                with fs.open_input_stream(f"{path}/{name}") as f:
                    if sha256_stream(f) != sha256:
                        return f"{name} does not match its sha256 in the manifest"
    except (OSError, pa.ArrowException) as err:
        return f"it cannot be read ({err})"
    return None


@contextlib.contextmanager
def local_copy(path: str, filesystem: pafs.FileSystem) -> Iterator[Path]:
    """A file or folder of ``filesystem`` as a local path: itself on a local disk, else a temporary download.

    Yields:
        The local path, named as the original (``.../checkpoint_<timestamp>``), valid inside the ``with`` block.

    Raises:
        OSError, pyarrow.ArrowException: the download failed (on entering the block).
    """
    import pyarrow.fs as pafs

    if isinstance(filesystem, pafs.LocalFileSystem):
        yield Path(path)
        return
    with tempfile.TemporaryDirectory(prefix="xswinir_checkpoint_") as tmp:
        info = filesystem.get_file_info(path)
        local = Path(tmp, info.base_name)
        if info.type == pafs.FileType.Directory:
            local.mkdir()  # copy_files fills a folder; it does not create it
        pafs.copy_files(path, str(local), source_filesystem=filesystem, destination_filesystem=pafs.LocalFileSystem())
        yield local


@contextlib.contextmanager
def local_checkpoint(location: str | Path) -> Iterator[Path]:
    """A checkpoint as a local path: a local one as it is, one in a bucket (``s3://``, ``gs://``) downloaded.

    A file (``.safetensors``, ``.pth``) is downloaded alone, a training checkpoint folder whole and, when it has a
    manifest, checked against it (sizes and sha256) once local, so what is loaded is what was saved. Inside
    the block, our errors name the URI instead of the temporary copy.

    Yields:
        The local path, valid inside the ``with`` block (a download is removed after it).

    Raises:
        CheckpointError: the URI names nothing, cannot be read (one line naming the bucket and key and what to
            check), or its folder fails its manifest.
    """
    import pyarrow as pa
    import pyarrow.fs as pafs

    if not is_remote(location):
        yield Path(location)
        return
    uri = str(location).rstrip("/")
    with contextlib.ExitStack() as stack:
        try:
            fs, path = filesystem_and_path(uri)
            if fs.get_file_info(path).type == pafs.FileType.NotFound:
                raise FileNotFoundError(uri)
            local = stack.enter_context(local_copy(path, fs))
        except (OSError, pa.ArrowException) as err:
            raise CheckpointError(remote_error("cannot read the checkpoint", uri, err)) from err
        problem = checkpoint_problem(local) if (local / MANIFEST_FILE).is_file() else None
        if problem is not None:
            raise CheckpointError(f"checkpoint {uri} does not match its {MANIFEST_FILE}: {problem}")
        try:
            yield local
        except (CheckpointError, CheckpointMismatchError) as err:
            raise type(err)(str(err).replace(str(local), uri)) from err.__cause__
