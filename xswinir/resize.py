"""MATLAB-exact bicubic resizing, batched in torch, and ``modcrop``.

The SR benchmarks' LR images were made by MATLAB's ``imresize(modcrop(HR, s), 1/s, 'bicubic')`` on uint8
images. :func:`imresize` reproduces it: cubic kernel with ``a = -0.5``, the kernel widened by ``1/s`` when
down-scaling (antialiasing), source coordinate ``u = x/s + 0.5 (1 - 1/s)``, mirror-symmetric padding,
height resized before width. Each pass is a matrix product with a weight matrix that depends only on the
lengths and the scale, so the matrices are built once and cached. With ``round_intermediate=True`` both
passes end by rounding half up onto the 0-255 grid, as MATLAB does for uint8 inputs; that reproduces the
official Set5 LR images bit for bit.
"""

from __future__ import annotations

import functools
import math

import torch


def _cubic(x: torch.Tensor) -> torch.Tensor:
    """Keys' cubic convolution kernel with a = -0.5, as MATLAB's ``cubic``."""
    ax = x.abs()
    ax2, ax3 = ax**2, ax**3
    return (1.5 * ax3 - 2.5 * ax2 + 1) * (ax <= 1) + (-0.5 * ax3 + 2.5 * ax2 - 4 * ax + 2) * ((ax > 1) & (ax <= 2))


def output_size(in_len: int, scale: float) -> int:
    """MATLAB's output length ``ceil(in_len * scale)``, tolerant of float error (``255 * (1/3)``)."""
    return max(1, math.ceil(in_len * scale - 1e-9))


@functools.lru_cache(maxsize=64)
def _weights_cpu(in_len: int, out_len: int, scale: float, antialias: bool) -> torch.Tensor:
    """The ``(out_len, in_len)`` float64 matrix of one resize pass (MATLAB ``contributions``)."""
    kernel_width = 4.0
    if scale < 1 and antialias:
        kernel_width /= scale  # the kernel is stretched by 1/s, so it low-passes before sub-sampling
    x = torch.arange(1, out_len + 1, dtype=torch.float64)  # MATLAB's 1-based output coordinates
    u = x / scale + 0.5 * (1 - 1 / scale)  # (out_len,) source coordinates, 1-based
    left = torch.floor(u - kernel_width / 2)
    taps = math.ceil(kernel_width) + 2
    indices = left[:, None] + torch.arange(taps, dtype=torch.float64)[None, :]  # (out_len, taps)
    distance = u[:, None] - indices
    if scale < 1 and antialias:
        weights = scale * _cubic(scale * distance)
    else:
        weights = _cubic(distance)
    weights = weights / weights.sum(dim=1, keepdim=True)
    # Mirror-symmetric padding: index sequence 1..n, n..1, repeated.
    mirror = torch.cat([torch.arange(in_len), torch.arange(in_len - 1, -1, -1)])
    columns = mirror[(indices.long() - 1) % (2 * in_len)]
    matrix = torch.zeros(out_len, in_len, dtype=torch.float64)
    matrix.scatter_add_(1, columns, weights)
    return matrix


@functools.lru_cache(maxsize=64)
def _weights(in_len: int, out_len: int, scale: float, antialias: bool, device: torch.device,
             dtype: torch.dtype) -> torch.Tensor:
    return _weights_cpu(in_len, out_len, scale, antialias).to(device=device, dtype=dtype)


def _round_255(x: torch.Tensor) -> torch.Tensor:
    """Round half up and clip onto the uint8 grid, values kept on the 0-255 scale."""
    return torch.floor(x + 0.5).clamp_(0, 255)


def imresize(x: torch.Tensor, scale: float | None = None, round_intermediate: bool = False, antialias: bool = True,
             size: tuple[int, int] | None = None) -> torch.Tensor:
    """MATLAB ``imresize(x, scale, 'bicubic')``, or ``imresize(x, [h w], 'bicubic')`` with ``size``.

    Args:
        x: ``(B, C, H, W)`` or ``(C, H, W)`` float in [0, 1], on any device.
        scale: output size over input size: ``0.5`` halves, ``2`` doubles. The output is
            ``ceil(H * scale) x ceil(W * scale)``.
        round_intermediate: round half up onto the 8-bit grid after each pass, as MATLAB does on uint8
            images; the input should then already lie on that grid. Without it nothing is rounded or
            clipped (bicubic overshoots slightly outside [0, 1]).
        antialias: widen the kernel when down-scaling (MATLAB's default).
        size: output ``(height, width)`` instead of ``scale``; each axis then has its own scale, as MATLAB.

    Returns:
        The resized tensor, same layout, dtype and device as ``x``.
    """
    if (scale is None) == (size is None):
        raise ValueError("give exactly one of scale and size")
    if scale is not None and scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    if size is not None and min(size) < 1:
        raise ValueError(f"size must be positive, got {size}")
    squeeze = x.dim() == 3
    if squeeze:
        x = x.unsqueeze(0)
    if x.dim() != 4:
        raise ValueError(f"expected (B, C, H, W) or (C, H, W), got shape {tuple(x.shape)}")
    in_dtype = x.dtype
    # float64 when rounding: a float32 product can land on the wrong side of a .5 and flip one level.
    dtype = torch.float64 if round_intermediate or in_dtype == torch.float64 else torch.float32
    if x.device.type == "mps":
        dtype = torch.float32
    h, w = x.shape[-2:]
    if size is not None:
        (out_h, out_w), scale_h, scale_w = size, size[0] / h, size[1] / w
    else:
        out_h, out_w, scale_h, scale_w = output_size(h, scale), output_size(w, scale), scale, scale
    weight_h = _weights(h, out_h, float(scale_h), antialias, x.device, dtype)  # (out_h, h)
    weight_w = _weights(w, out_w, float(scale_w), antialias, x.device, dtype)  # (out_w, w)
    y = x.to(dtype)
    if round_intermediate:
        y = _round_255(y * 255)
    y = torch.matmul(weight_h, y)  # rows first: (B, C, out_h, W)
    if round_intermediate:
        y = _round_255(y)
    y = torch.matmul(y, weight_w.T)  # then columns: (B, C, out_h, out_w)
    if round_intermediate:
        y = _round_255(y) / 255
    y = y.to(in_dtype)
    return y.squeeze(0) if squeeze else y


def modcrop(img: torch.Tensor, scale: int) -> torch.Tensor:
    """Crops the bottom and right edges so that height and width are multiples of ``scale``.

    Args:
        img: ``(..., H, W)``.

    Returns:
        ``(..., H - H % scale, W - W % scale)``, a view of ``img``.
    """
    h, w = img.shape[-2:]
    return img[..., : h - h % scale, : w - w % scale]
