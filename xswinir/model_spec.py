"""SwinIR's arguments, without torch: the typed :class:`ModelConfig`, its rules, the parameter count and the presets.

Everything here can be checked before a tensor is allocated: :class:`xswinir.config.Config` uses it to
validate the ``model`` section (of a YAML file, ``--set`` overrides or a checkpoint's metadata) and
:class:`xswinir.model.SwinIR` runs the same :func:`check_model_args` in its constructor. The presets are the
published SwinIR variants, kept with the model's arguments as timm keeps a model's variants with the model.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Literal

from xswinir.errors import ConfigError, show

Upsampler = Literal["pixelshuffle", "pixelshuffledirect", "nearest+conv", ""]
ResiConnection = Literal["1conv", "3conv"]

# Bounds that keep a config (or a checkpoint's metadata, which goes through the same loader) from asking for
# more than a machine has before anything is allocated. The largest published SwinIR (real-world L x4) has
# 28 M parameters in 54 blocks with 8 px windows.
MAX_MODEL_PARAMETERS = 100_000_000  # 400 MB of float32 weights
MAX_MODEL_BLOCKS = 256  # transformer blocks in all residual groups together
MAX_WINDOW_SIZE = 64  # the position index and shift mask of a window grow as window_size**4
MAX_UPSCALE = 16
NUM_FEAT = 64  # channels of the reconstruction convs of the classical and real-world upsamplers


@dataclass
class ModelConfig:
    """SwinIR architecture, with the argument names of the original implementation."""

    preset: str | None = None
    upscale: int = 2  # 1 for denoising and JPEG artifact removal
    in_chans: int = 3
    img_size: int = 64  # the training patch size; only recorded, any input size works
    window_size: int = 8
    img_range: float = 1.0
    depths: tuple[int, ...] = (6, 6, 6, 6)
    embed_dim: int = 60
    num_heads: tuple[int, ...] = (6, 6, 6, 6)
    mlp_ratio: float = 2.0
    upsampler: Upsampler = "pixelshuffledirect"
    resi_connection: ResiConnection = "1conv"
    drop_path_rate: float = 0.1  # stochastic depth while training, as the official SwinIR; no effect at inference
    # Fine-tuning: start from these weights (official .pth, our checkpoint folder or .safetensors) instead of a
    # random init. Weights only: optimizer state and step come from --resume, never from here.
    init_from: str | None = None
    # True: every tensor must fit, so a wrong architecture fails at once. False: load what fits by name and shape
    # and initialise the rest afresh (KAIR starts x4 models from x2 ones this way), listing both in the log.
    init_strict: bool = True

    def __post_init__(self) -> None:
        check_model_args(
            upscale=self.upscale, in_chans=self.in_chans, img_size=self.img_size, window_size=self.window_size,
            img_range=self.img_range, depths=self.depths, embed_dim=self.embed_dim, num_heads=self.num_heads,
            mlp_ratio=self.mlp_ratio, upsampler=self.upsampler, resi_connection=self.resi_connection,
            drop_path_rate=self.drop_path_rate,
        )


def check_model_args(*, upscale: int, in_chans: int, img_size: int, window_size: int, img_range: float,
                     depths: tuple[int, ...], embed_dim: int, num_heads: tuple[int, ...], mlp_ratio: float,
                     upsampler: str, resi_connection: str, drop_path_rate: float) -> None:
    """The rules for SwinIR's arguments, shared by :class:`ModelConfig` and ``SwinIR.__init__``.

    Sizes are bounded (:data:`MAX_MODEL_PARAMETERS` and the other ``MAX_*``) before anything is allocated, so
    that a config or a checkpoint's metadata cannot ask for hundreds of GB. Raises :class:`ConfigError`.
    """
    if upsampler not in typing.get_args(Upsampler):
        raise ConfigError(f"model.upsampler must be one of {list(typing.get_args(Upsampler))}, got {show(upsampler)}")
    if resi_connection not in typing.get_args(ResiConnection):
        raise ConfigError(f"model.resi_connection must be one of {list(typing.get_args(ResiConnection))}, got "
                          f"{show(resi_connection)}")
    if in_chans not in (1, 3):
        raise ConfigError(f"model.in_chans must be 1 or 3, got {show(in_chans)}")
    if not 1 <= upscale <= MAX_UPSCALE:
        raise ConfigError(f"model.upscale must lie in [1, {MAX_UPSCALE}], got {show(upscale)}")
    if not 1 <= window_size <= MAX_WINDOW_SIZE:
        raise ConfigError(f"model.window_size must lie in [1, {MAX_WINDOW_SIZE}], got {show(window_size)}")
    if img_size < 1 or embed_dim < 1:
        raise ConfigError(f"model.img_size and model.embed_dim must be >= 1, got {show(img_size)} and "
                          f"{show(embed_dim)}")
    if not (math.isfinite(img_range) and img_range > 0):
        raise ConfigError(f"model.img_range must be a finite number > 0, got {show(img_range)}")
    if not (math.isfinite(mlp_ratio) and embed_dim * mlp_ratio >= 1):
        raise ConfigError(f"model.mlp_ratio must be finite and give an MLP of >= 1 channel, got {show(mlp_ratio)}")
    if not (math.isfinite(drop_path_rate) and 0.0 <= drop_path_rate < 1.0):
        raise ConfigError(f"model.drop_path_rate must lie in [0, 1), got {show(drop_path_rate)}")
    if not depths or len(depths) != len(num_heads):
        raise ConfigError(f"model.depths {show(depths)} and model.num_heads {show(num_heads)} must be non-empty "
                          "lists of the same length")
    if any(d < 1 for d in depths) or sum(depths) > MAX_MODEL_BLOCKS:
        raise ConfigError(f"model.depths must be >= 1 each and at most {MAX_MODEL_BLOCKS} in all, got {show(depths)}")
    if any(h < 1 or embed_dim % h for h in num_heads):
        raise ConfigError(f"model.num_heads must be >= 1 and divide model.embed_dim={embed_dim}, got "
                          f"{show(num_heads)}")
    if resi_connection == "3conv" and embed_dim < 4:
        raise ConfigError(f"model.resi_connection '3conv' needs model.embed_dim >= 4, got {embed_dim}")
    if upsampler == "" and upscale != 1:
        raise ConfigError(f"model.upscale={upscale} needs an upsampler; '' is only for upscale=1")
    if upsampler == "pixelshuffle" and not (upscale == 3 or (upscale >= 2 and upscale & (upscale - 1) == 0)):
        raise ConfigError(f"upsampler 'pixelshuffle' supports upscale 3 or a power of 2, got {upscale}")
    if upsampler == "nearest+conv" and upscale not in (2, 4):
        raise ConfigError(f"upsampler 'nearest+conv' supports upscale 2 or 4, got {upscale}")
    params = estimate_parameters(upscale=upscale, in_chans=in_chans, img_size=img_size, window_size=window_size,
                                 depths=depths, embed_dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio,
                                 upsampler=upsampler, resi_connection=resi_connection)
    if params > MAX_MODEL_PARAMETERS:
        raise ConfigError(f"the model would have {params:,} parameters, more than the {MAX_MODEL_PARAMETERS:,} "
                          "allowed (xswinir.model_spec.MAX_MODEL_PARAMETERS)")


def estimate_parameters(*, upscale: int, in_chans: int, img_size: int, window_size: int, depths: tuple[int, ...],
                        embed_dim: int, num_heads: tuple[int, ...], mlp_ratio: float, upsampler: str,
                        resi_connection: str) -> int:
    """SwinIR's parameter count, from its arguments alone (equal to ``count_parameters``; tested)."""
    d, c, f = embed_dim, in_chans, NUM_FEAT
    w = min(window_size, img_size)
    hidden = int(d * mlp_ratio)

    def conv(cin: int, cout: int, k: int = 3) -> int:
        return cin * cout * k * k + cout

    closing = conv(d, d) if resi_connection == "1conv" else conv(d, d // 4) + conv(d // 4, d // 4, 1) + conv(d // 4, d)
    # A block: two LayerNorms, the position bias table, qkv, proj and the two MLP layers.
    block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * hidden + hidden) + (hidden * d + d)
    total = conv(c, d) + 2 * d + 2 * d + closing  # conv_first, patch norm, final norm, conv_after_body
    total += sum(depth * (block + (2 * w - 1) ** 2 * heads) + closing
                 for depth, heads in zip(depths, num_heads, strict=True))
    if upsampler == "pixelshuffle":
        steps = [conv(f, 9 * f)] if upscale == 3 else [conv(f, 4 * f)] * int(math.log2(upscale))
        total += conv(d, f) + sum(steps) + conv(f, c)
    elif upsampler == "pixelshuffledirect":
        total += conv(d, upscale * upscale * c)
    elif upsampler == "nearest+conv":
        total += conv(d, f) + conv(f, f) * (3 if upscale == 4 else 2) + conv(f, c)
    else:
        total += conv(d, c)
    return total


def _classical(scale: int) -> ModelConfig:
    return ModelConfig(
        preset=f"swinir-m-x{scale}", upscale=scale, img_size=48, depths=(6,) * 6, embed_dim=180,
        num_heads=(6,) * 6, upsampler="pixelshuffle",
    )


def _lightweight(scale: int) -> ModelConfig:
    return ModelConfig(preset=f"swinir-s-x{scale}", upscale=scale)


def _restoration(name: str, in_chans: int, window_size: int, img_size: int, img_range: float) -> ModelConfig:
    return ModelConfig(
        preset=name, upscale=1, in_chans=in_chans, img_size=img_size, window_size=window_size,
        img_range=img_range, depths=(6,) * 6, embed_dim=180, num_heads=(6,) * 6, upsampler="",
    )


# The published SwinIR configurations (main_test_swinir.py of the official repository), plus a tiny one
# for demos and tests.
MODEL_PRESETS: dict[str, ModelConfig] = {
    **{f"swinir-s-x{s}": _lightweight(s) for s in (2, 3, 4)},
    **{f"swinir-m-x{s}": _classical(s) for s in (2, 3, 4, 8)},
    "swinir-real-m-x4": dataclasses.replace(_classical(4), preset="swinir-real-m-x4", img_size=64,
                                            upsampler="nearest+conv"),
    "swinir-real-l-x4": ModelConfig(preset="swinir-real-l-x4", upscale=4, img_size=64, depths=(6,) * 9,
                                    embed_dim=240, num_heads=(8,) * 9, upsampler="nearest+conv",
                                    resi_connection="3conv"),
    "swinir-dn-gray": _restoration("swinir-dn-gray", 1, 8, 128, 1.0),
    "swinir-dn-color": _restoration("swinir-dn-color", 3, 8, 128, 1.0),
    "swinir-jpeg-gray": _restoration("swinir-jpeg-gray", 1, 7, 126, 255.0),
    "swinir-jpeg-color": _restoration("swinir-jpeg-color", 3, 7, 126, 255.0),
    "tiny-x2": ModelConfig(preset="tiny-x2", upscale=2, img_size=32, window_size=4, depths=(2, 2), embed_dim=24,
                           num_heads=(2, 2)),
}
