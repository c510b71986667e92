"""Inference on whole images of any size: overlapping tiles, optional x8 self-ensemble, bicubic baseline.

Tiles keep memory bounded: the model only ever sees ``tile x tile`` LQ pixels (times the batch). Tiles
overlap by ``overlap`` LQ pixels and are blended with smooth weights: a tile's weight is 0 within
``overlap / 4`` of an edge it shares with a neighbour (where its context is cut off), rises linearly over
the next ``overlap / 2`` and is 1 beyond, and the weights are normalised per pixel. A model whose receptive
field reaches at most ``overlap / 4`` LQ pixels therefore gives exactly the untiled result (to float
rounding), and SwinIR, whose attention reaches further, gives a close result without visible seams. Image
edges are not shared edges: tiles there keep full weight, since the untiled run sees the same border.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from xswinir.errors import UserError
from xswinir.resize import imresize


def _spans(length: int, tile: int, overlap: int, window: int) -> list[tuple[int, int]]:
    """``(start, size)`` of the tiles covering ``length`` pixels along one axis.

    Starts are multiples of ``window`` so that every tile partitions the image into the same attention
    windows as the untiled run. The last tile ends at ``length``; it starts at the last multiple of
    ``window`` that leaves it at least ``tile`` long, so it may be up to ``window - 1`` longer (the model pads
    it as it pads the whole image). Consecutive tiles overlap by at least ``overlap``.
    """
    if tile >= length:
        return [(0, length)]
    stride = max(window, (tile - overlap) // window * window)
    last = (length - tile) // window * window
    starts = list(range(0, last, stride)) + [last]
    return [(start, tile) for start in starts[:-1]] + [(last, length - last)]


def _profile(size: int, scale: int, overlap: int, inner_left: bool, inner_right: bool,
             device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """1-D blend weight of one tile over its ``size * scale`` output pixels, ``(size * scale,)``."""
    # Pixel centres in LQ units, measured from the tile's start.
    pos = (torch.arange(size * scale, device=device, dtype=torch.float64) + 0.5) / scale
    margin, ramp = overlap / 4, max(overlap / 2, 1e-6)
    weight = torch.ones_like(pos)
    if inner_left:
        weight = torch.minimum(weight, ((pos - margin) / ramp).clamp(0, 1))
    if inner_right:
        weight = torch.minimum(weight, ((size - pos - margin) / ramp).clamp(0, 1))
    return weight.to(dtype)


def _restore_tiled(model: nn.Module, lq: torch.Tensor, tile: int | None, overlap: int) -> torch.Tensor:
    b, _, h, w = lq.shape
    if tile is None or tile <= 0 or (tile >= h and tile >= w):
        return model(lq)
    window = int(getattr(model, "window_size", 1))
    tile = max(window, tile // window * window)  # multiples of the window avoid the model's own padding
    overlap = max(0, min(overlap, tile // 2, tile - window))  # a tile must advance by at least a window
    spans_y, spans_x = _spans(h, tile, overlap, window), _spans(w, tile, overlap, window)
    out = weight_sum = None
    scale = 0
    for iy, (y0, size_y) in enumerate(spans_y):
        for ix, (x0, size_x) in enumerate(spans_x):
            patch = model(lq[..., y0:y0 + size_y, x0:x0 + size_x])
            if out is None:
                scale = patch.shape[-1] // size_x
                dtype = torch.promote_types(patch.dtype, torch.float32)  # bf16 tiles still sum in float32
                out = lq.new_zeros(b, patch.shape[1], h * scale, w * scale, dtype=dtype)
                weight_sum = lq.new_zeros(1, 1, h * scale, w * scale, dtype=dtype)
            wy = _profile(size_y, scale, overlap, iy > 0, iy < len(spans_y) - 1, patch.device, out.dtype)
            wx = _profile(size_x, scale, overlap, ix > 0, ix < len(spans_x) - 1, patch.device, out.dtype)
            weight = wy[:, None] * wx[None, :]  # (size_y * s, size_x * s)
            ys, xs = slice(y0 * scale, (y0 + size_y) * scale), slice(x0 * scale, (x0 + size_x) * scale)
            out[..., ys, xs] += patch * weight
            weight_sum[..., ys, xs] += weight
    return out / weight_sum


# The 8 dihedral transforms as (transpose, flip_h, flip_w); each is its own inverse once the order of
# transpose and flips is reversed.
_TRANSFORMS = [(t, fh, fw) for t in (False, True) for fh in (False, True) for fw in (False, True)]


def _forward_transform(x: torch.Tensor, transpose: bool, flip_h: bool, flip_w: bool) -> torch.Tensor:
    if transpose:
        x = x.transpose(-2, -1)
    dims = [d for d, flip in ((-2, flip_h), (-1, flip_w)) if flip]
    return x.flip(dims) if dims else x


def _inverse_transform(x: torch.Tensor, transpose: bool, flip_h: bool, flip_w: bool) -> torch.Tensor:
    dims = [d for d, flip in ((-2, flip_h), (-1, flip_w)) if flip]
    if dims:
        x = x.flip(dims)
    return x.transpose(-2, -1) if transpose else x


def restore(model: nn.Module, lq: torch.Tensor, tile: int | None = None, overlap: int = 32,
            self_ensemble: bool = False) -> torch.Tensor:
    """Runs a restoration model on whole images, tile by tile if asked.

    Args:
        model: maps ``(B, C, h, w)`` to ``(B, C', h * s, w * s)`` for any ``h, w``; its ``window_size``
            attribute, if any, rounds the tile size down to a multiple of it. Put it in eval mode and
            on ``lq``'s device first.
        lq: ``(B, C, H, W)`` or ``(C, H, W)`` inputs in [0, 1].
        tile: tile size in LQ pixels; None runs the whole image at once.
        overlap: LQ pixels shared by neighbouring tiles (at most ``tile // 2`` is used).
        self_ensemble: average the outputs over the 8 flips and transposes (x8 the compute).

    Returns:
        ``(B, C', H * s, W * s)`` (or ``(C', ...)`` for a 3-D input), not clipped to [0, 1].
    """
    squeeze = lq.dim() == 3
    if squeeze:
        lq = lq.unsqueeze(0)
    with torch.inference_mode():
        if not self_ensemble:
            sr = _restore_tiled(model, lq, tile, overlap)
        else:
            sr = None
            for transform in _TRANSFORMS:
                out = _inverse_transform(_restore_tiled(model, _forward_transform(lq, *transform), tile, overlap),
                                         *transform)
                sr = out if sr is None else sr + out
            sr = sr / len(_TRANSFORMS)
    return sr.squeeze(0) if squeeze else sr


# Images above this many pixels are resized tile by tile (RESIZE_TILE x RESIZE_TILE LQ pixels, plus a margin),
# so a bicubic pass needs a few MB beside its input and output instead of a dense weight matrix per axis
# whose size grows with the square of the side.
RESIZE_TILE = 512
_RESIZE_MARGIN = 4  # LQ pixels; the cubic kernel reaches 2 LQ pixels (2 * scale HR pixels when down-scaling)


def _resize_tiled(x: torch.Tensor, scale: int, up: bool) -> torch.Tensor:
    """MATLAB bicubic by an integer factor, rounded to 8 bits per pass, over LQ tiles with a margin.

    Each output tile comes from a crop that starts on the LQ grid, so its kernel weights are the whole
    image's; the crop's own mirror padding only touches the margin, which is dropped. At the image border
    the crop ends where the image does and pads as the whole image would. Equal to :func:`imresize` up to
    float64 summation order.
    """
    b, c, h, w = x.shape
    lq_h, lq_w = (h, w) if up else (h // scale, w // scale)  # the low-resolution side of the resize
    out = x.new_empty(b, c, *((lq_h * scale, lq_w * scale) if up else (lq_h, lq_w)))
    step, m = RESIZE_TILE, _RESIZE_MARGIN
    in_unit, out_unit = (1, scale) if up else (scale, 1)  # input / output pixels per LQ pixel
    for y0 in range(0, lq_h, step):
        y1 = min(y0 + step, lq_h)
        cy0, cy1 = max(0, y0 - m), min(lq_h, y1 + m)
        for x0 in range(0, lq_w, step):
            x1 = min(x0 + step, lq_w)
            cx0, cx1 = max(0, x0 - m), min(lq_w, x1 + m)
            crop = x[..., cy0 * in_unit:cy1 * in_unit, cx0 * in_unit:cx1 * in_unit]
            part = imresize(crop, scale if up else 1 / scale, round_intermediate=True)
            out[..., y0 * out_unit:y1 * out_unit, x0 * out_unit:x1 * out_unit] = part[
                ..., (y0 - cy0) * out_unit:(y1 - cy0) * out_unit, (x0 - cx0) * out_unit:(x1 - cx0) * out_unit]
    return out


def _batched(fn: Callable[..., torch.Tensor], x: torch.Tensor, *args: object) -> torch.Tensor:
    """``fn`` on a ``(B, C, H, W)`` batch, also for one ``(C, H, W)`` image."""
    return fn(x.unsqueeze(0), *args).squeeze(0) if x.dim() == 3 else fn(x, *args)


def bicubic_upscale(lq: torch.Tensor, scale: int) -> torch.Tensor:
    """The no-model baseline: MATLAB bicubic up-sampling, rounded to 8 bits after each pass as MATLAB does.

    Inputs over ``RESIZE_TILE**2`` pixels run in tiles (bounded memory, same result).

    Args:
        lq: ``(B, C, H, W)`` or ``(C, H, W)`` in [0, 1], on the 8-bit grid.

    Returns:
        ``(..., H * scale, W * scale)`` in [0, 1].
    """
    if lq.shape[-2] * lq.shape[-1] <= RESIZE_TILE**2:
        return imresize(lq, scale, round_intermediate=True)
    return _batched(_resize_tiled, lq, int(scale), True)


def bicubic_downscale(gt: torch.Tensor, scale: int) -> torch.Tensor:
    """MATLAB ``imresize(gt, 1/scale, 'bicubic')`` on uint8, as the official benchmark LR files were made.

    Inputs over ``(RESIZE_TILE * scale)**2`` pixels run in tiles (bounded memory, same result).

    Args:
        gt: ``(B, C, H, W)`` or ``(C, H, W)`` in [0, 1], H and W multiples of ``scale`` (modcropped).

    Returns:
        ``(..., H / scale, W / scale)`` in [0, 1], on the 8-bit grid.
    """
    h, w = gt.shape[-2:]
    if h * w <= (RESIZE_TILE * scale) ** 2 or h % scale or w % scale:
        return imresize(gt, 1 / scale, round_intermediate=True)
    return _batched(_resize_tiled, gt, int(scale), False)


def resolve_device(name: str | None = None) -> torch.device:
    """The device a user asked for: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; None or ``"auto"`` picks CUDA if any.

    Raises:
        UserError: CUDA was asked for but is not available.
    """
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UserError(f"unknown device {name!r} ({err})") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for, but CUDA is not available here; use --device cpu")
    return device
