"""PSNR and SSIM as the SR literature reports them, texture-sensitive metrics from torchmetrics, and the names.

The published numbers (SwinIR's ``main_test_swinir.py``, BasicSR's ``basicsr/metrics/psnr_ssim.py``) are
computed on images rounded to 8 bits, with ``crop_border = scale`` pixels cut from every side, on the 0-255
scale, either over the RGB channels or on the luma ``Y`` of ITU-R BT.601
(``Y = 16 + 65.481 R + 128.553 G + 24.966 B`` for R, G, B in [0, 1]; Y is not rounded). SSIM uses an
11x11 Gaussian window with sigma 1.5, 'valid' filtering (no padding) and is averaged over channels. The
functions here follow those rules on ``(B, C, H, W)`` float tensors in [0, 1] on any device, in float64
as the numpy reference does.

Beside them, four full-reference metrics that react to lost or invented texture, all from torchmetrics
and measured on the same rounded, cropped images: MS-SSIM on Y (:func:`ms_ssim`), the spatial correlation
coefficient of Laplacian high-passes on Y (:func:`scc`), the pixel-domain visual information fidelity on Y
(:func:`vif`: how much of gt's local detail survives, blind to a brightness shift), and LPIPS
(:func:`load_lpips`), which needs ImageNet AlexNet weights and is only used when they are already on disk -
nothing is ever downloaded.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

# Metric names reported to Ray and logged; the trainer and tune import these, never retype them.
VAL_PSNR_Y = "val/psnr_y"
VAL_SSIM_Y = "val/ssim_y"
VAL_PSNR_BICUBIC_Y = "val/psnr_y_bicubic"
VAL_SSIM_BICUBIC_Y = "val/ssim_y_bicubic"

# Per-image columns of `xswinir eval` and xswinir.evaluation, in table order.
PSNR = "psnr"
SSIM = "ssim"
PSNR_Y = "psnr_y"
SSIM_Y = "ssim_y"
MS_SSIM_Y = "ms_ssim_y"
SCC_Y = "scc_y"
VIF_Y = "vif_y"
LPIPS = "lpips"  # lower is better; None where the backbone weights are not on disk
EVAL_METRICS = (PSNR, SSIM, PSNR_Y, SSIM_Y, MS_SSIM_Y, SCC_Y, VIF_Y, LPIPS)

# Wang, Simoncelli, Bovik 2003, finest scale first; torchmetrics' defaults.
MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
SSIM_WINDOW = 11  # side of the Gaussian SSIM window: the smallest image any SSIM here can measure
SCC_WINDOW = 8  # local correlation window of the spatial correlation coefficient (torchmetrics' default)
# VIF-P (Sheikh & Bovik 2006) as torchmetrics computes it: four scales, each a (2^(4-s) + 1)-tap Gaussian of
# sigma side / 5 that both measures local statistics and (for s > 0) low-passes before halving the image.
VIF_WINDOWS = (17, 9, 5, 3)
VIF_MIN_SIZE = 41  # pixels per side: one 3 x 3 window at the coarsest scale reads 8 * 2 + 25 = 41 pixels
VIF_NOISE_VARIANCE = 2.0  # sigma_n^2, the visual noise, on the 0-255 scale (the paper's and torchmetrics' default)
LPIPS_MIN_SIZE = 31  # pixels per side for which AlexNet's second max-pool still gets a 3 x 3 input
LPIPS_MAX_PIXELS = 2048 * 2048  # AlexNet runs on whole images; above this `xswinir eval` reports lpips n/a

_Y_WEIGHTS = (65.481, 128.553, 24.966)  # BT.601 studio-swing luma on [0, 1] RGB, output on 0-255


def rgb_to_y(x: torch.Tensor) -> torch.Tensor:
    """ITU-R BT.601 luma ``16 + 65.481 R + 128.553 G + 24.966 B`` (MATLAB ``rgb2ycbcr``'s Y, unrounded).

    Args:
        x: ``(B, 3, H, W)`` RGB in [0, 1].

    Returns:
        ``(B, 1, H, W)`` Y on the 0-255 scale, in [16, 235] for inputs in [0, 1].
    """
    weights = torch.tensor(_Y_WEIGHTS, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * weights).sum(dim=1, keepdim=True) + 16.0


def _crop(sr: torch.Tensor, gt: torch.Tensor, crop_border: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Shape checks, then both images with ``crop_border`` pixels cut from every side (views, no copy)."""
    if sr.shape != gt.shape:
        raise ValueError(f"sr and gt differ in shape: {tuple(sr.shape)} vs {tuple(gt.shape)}")
    if sr.dim() != 4:
        raise ValueError(f"expected (B, C, H, W), got shape {tuple(sr.shape)}")
    h, w = sr.shape[-2:]
    if min(h, w) - 2 * max(crop_border, 0) < 1:
        raise ValueError(f"crop_border={crop_border} leaves no pixels of a {tuple(sr.shape[-2:])} image")
    if crop_border > 0:
        sr = sr[..., crop_border:-crop_border, crop_border:-crop_border]
        gt = gt[..., crop_border:-crop_border, crop_border:-crop_border]
    return sr, gt


def _to_255(x: torch.Tensor, y_channel: bool, quantize: bool) -> torch.Tensor:
    """One (tile of an) image as float64 on the 0-255 scale, rounded to 8 bits, optionally Y only."""
    x = x.detach().to(torch.float64).clamp(0, 1)
    if quantize:
        x = torch.round(x * 255) / 255  # as np.uint8((x * 255).round()) in the published scripts
    return rgb_to_y(x) if y_channel and x.shape[1] == 3 else x * 255


def _prepare(sr: torch.Tensor, gt: torch.Tensor, crop_border: int, y_channel: bool, quantize: bool) -> tuple:
    """Both whole images as float64 on the 0-255 scale, rounded to 8 bits, cropped, optionally Y only."""
    sr, gt = _crop(sr, gt, crop_border)
    return _to_255(sr, y_channel, quantize), _to_255(gt, y_channel, quantize)


# Metrics run over tiles of this side, so their float64 working copies stay a few MB whatever the image size;
# the results equal the whole-image ones up to float rounding (each metric is a mean of local terms).
METRIC_TILE = 512


def _tiles(h: int, w: int, halo: int = 0) -> Iterator[tuple[slice, slice]]:
    """Input windows whose 'valid' outputs (``halo`` pixels fewer per axis) cover the valid map exactly once."""
    tile = METRIC_TILE
    for y0 in range(0, h - halo, tile):
        y1 = min(y0 + tile, h - halo)
        for x0 in range(0, w - halo, tile):
            x1 = min(x0 + tile, w - halo)
            yield slice(y0, y1 + halo), slice(x0, x1 + halo)


def _span(lo: int, hi: int, before: int, after: int, n: int) -> tuple[slice, int, int]:
    """Rows ``[lo - before, hi + after)`` clipped to ``[0, n)``, and how many are missing before and after."""
    start, stop = max(0, lo - before), min(n, hi + after)
    return slice(start, stop), start - (lo - before), (hi + after) - stop


def _same_tiles(h: int, w: int) -> Iterator[tuple[int, int, int, int]]:
    """``(y0, y1, x0, x1)`` output tiles of a same-size map."""
    tile = METRIC_TILE
    for y0 in range(0, h, tile):
        for x0 in range(0, w, tile):
            yield y0, min(y0 + tile, h), x0, min(x0 + tile, w)


def psnr(sr: torch.Tensor, gt: torch.Tensor, crop_border: int = 0, y_channel: bool = False,
         quantize: bool = True) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB, per image, as BasicSR's ``calculate_psnr``.

    Args:
        sr: ``(B, C, H, W)`` restored images in [0, 1] (values outside are clipped).
        gt: ``(B, C, H, W)`` ground truth in [0, 1].
        crop_border: pixels cut from every side before measuring; the SR convention is the scale.
        y_channel: measure the BT.601 luma of RGB inputs instead of all channels.
        quantize: round both to 8 bits first, as the published evaluation does.

    Returns:
        ``(B,)`` float64 PSNR; ``inf`` where the images are equal.
    """
    sr, gt = _crop(sr, gt, crop_border)
    h, w = sr.shape[-2:]
    channels = 1 if y_channel and sr.shape[1] == 3 else sr.shape[1]
    sse = torch.zeros(sr.shape[0], dtype=torch.float64, device=sr.device)
    for ys, xs in _tiles(h, w):
        diff = _to_255(sr[..., ys, xs], y_channel, quantize) - _to_255(gt[..., ys, xs], y_channel, quantize)
        sse += diff.pow(2).sum(dim=(1, 2, 3))
    mse = sse / (channels * h * w)
    return 10.0 * torch.log10(255.0**2 / mse)  # mse == 0 gives inf, as the reference


@functools.lru_cache(maxsize=32)
def _gaussian_band(length: int, device: torch.device) -> torch.Tensor:
    """'Valid' filtering with OpenCV's ``getGaussianKernel(11, 1.5)`` as a ``(length - 10, length)`` matrix.

    The 2-D window is the outer product of this kernel, so filtering is ``band_h @ x @ band_w.T``: two
    float64 matrix products, far faster on CPU than a float64 11x11 ``conv2d``.
    """
    coords = torch.arange(11, dtype=torch.float64) - 5
    kernel = torch.exp(-(coords**2) / (2 * 1.5**2))
    kernel = kernel / kernel.sum()
    band = torch.zeros(length - 10, length, dtype=torch.float64)
    for offset in range(11):
        band.diagonal(offset).fill_(float(kernel[offset]))
    return band.to(device)


def ssim(sr: torch.Tensor, gt: torch.Tensor, crop_border: int = 0, y_channel: bool = False,
         quantize: bool = True) -> torch.Tensor:
    """Structural similarity per image, as BasicSR's ``calculate_ssim`` (Wang et al. 2004).

    Args:
        sr: ``(B, C, H, W)`` restored images in [0, 1].
        gt: ``(B, C, H, W)`` ground truth in [0, 1].
        crop_border: pixels cut from every side before measuring.
        y_channel: measure the BT.601 luma of RGB inputs instead of all channels.
        quantize: round both to 8 bits first.

    Returns:
        ``(B,)`` float64 SSIM, the mean over the 'valid' SSIM map and over channels; 1 for equal images.
    """
    sr, gt = _crop(sr, gt, crop_border)
    h, w = sr.shape[-2:]
    if h < 11 or w < 11:
        raise ValueError(f"SSIM needs at least 11x11 pixels after cropping, got {h}x{w}")
    total = None
    for ys, xs in _tiles(h, w, halo=10):
        part = _ssim_map(_to_255(sr[..., ys, xs], y_channel, quantize), _to_255(gt[..., ys, xs], y_channel, quantize))
        total = part.sum(dim=(-2, -1)) if total is None else total + part.sum(dim=(-2, -1))
    return (total / ((h - 10) * (w - 10))).mean(dim=1)  # mean over the map, then over channels


def _ssim_map(sr: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """The 'valid' SSIM map of ``(B, C, h, w)`` float64 images on 0-255: ``(B, C, h - 10, w - 10)``."""
    h, w = sr.shape[-2:]
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    band_h, band_w = _gaussian_band(h, sr.device), _gaussian_band(w, sr.device)
    # One filtering pass over all five statistics' inputs at once: (5, B, C, H, W) -> (5, B, C, H-10, W-10).
    stats = torch.stack([sr, gt, sr * sr, gt * gt, sr * gt])
    mu_x, mu_y, xx, yy, xy = torch.matmul(torch.matmul(band_h, stats), band_w.T)
    sigma_xx = xx - mu_x**2
    sigma_yy = yy - mu_y**2
    sigma_xy = xy - mu_x * mu_y
    return ((2 * mu_x * mu_y + c1) * (2 * sigma_xy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sigma_xx + sigma_yy + c2))


def psnr_y(sr: torch.Tensor, gt: torch.Tensor, crop_border: int = 0) -> torch.Tensor:
    """:func:`psnr` on the Y channel: ``(B,)`` dB."""
    return psnr(sr, gt, crop_border, y_channel=True)


def ssim_y(sr: torch.Tensor, gt: torch.Tensor, crop_border: int = 0) -> torch.Tensor:
    """:func:`ssim` on the Y channel: ``(B,)``."""
    return ssim(sr, gt, crop_border, y_channel=True)


def all_metrics(sr: torch.Tensor, gt: torch.Tensor, crop_border: int = 0) -> dict[str, torch.Tensor]:
    """PSNR and SSIM on all channels and on Y, ``{"psnr", "ssim", "psnr_y", "ssim_y"}``, each ``(B,)``."""
    return {
        PSNR: psnr(sr, gt, crop_border),
        SSIM: ssim(sr, gt, crop_border),
        PSNR_Y: psnr(sr, gt, crop_border, y_channel=True),
        SSIM_Y: ssim(sr, gt, crop_border, y_channel=True),
    }


def ms_ssim_scales(height: int, width: int) -> int:
    """How many of the five MS-SSIM scales an image of this size supports: 5 from 176 px, 0 below 11 px.

    Each scale halves the image and must still hold an 11 x 11 window; torchmetrics also asks for
    ``side // (n - 1) ** 2 > 10`` for ``n`` scales, which is what sets 176 px for all five.
    """
    side = min(height, width)
    for n in range(len(MS_SSIM_BETAS), 0, -1):
        if side >= 2**n and side // max(1, n - 1) ** 2 >= SSIM_WINDOW and side >> (n - 1) >= SSIM_WINDOW:
            return n
    return 0


def ms_ssim(sr: torch.Tensor, gt: torch.Tensor, crop_border: int = 0, y_channel: bool = False,
            quantize: bool = True, scales: int | None = None) -> torch.Tensor:
    """Multi-scale SSIM per image (torchmetrics), with as many scales as the image size allows.

    Images smaller than 176 px get the finest :func:`ms_ssim_scales` scales, their betas rescaled to sum
    to 1, so the value stays a weighted geometric mean of the per-scale terms (1 for equal images) but is
    only comparable between images measured with the same number of scales.

    Args:
        sr: ``(B, C, H, W)`` restored images in [0, 1].
        gt: ``(B, C, H, W)`` ground truth in [0, 1].
        crop_border: pixels cut from every side before measuring.
        y_channel: measure the BT.601 luma of RGB inputs instead of all channels.
        quantize: round both to 8 bits first.
        scales: number of scales, 1-5; None: :func:`ms_ssim_scales` of the cropped size.

    Returns:
        ``(B,)`` float64 in [0, 1]; NaN for images too small for one 11 x 11 window.
    """
    sr, gt = _crop(sr, gt, crop_border)
    n = ms_ssim_scales(sr.shape[-2], sr.shape[-1]) if scales is None else scales
    if n == 0:
        return torch.full((sr.shape[0],), math.nan, dtype=torch.float64, device=sr.device)
    betas = MS_SSIM_BETAS if n == len(MS_SSIM_BETAS) else tuple(b / sum(MS_SSIM_BETAS[:n]) for b in MS_SSIM_BETAS[:n])
    # float32 on [0, 1], what torchmetrics is given: float64 convolutions are 10-50x slower on CPU, and 8-bit
    # inputs lose nothing. Made tile by tile, so only this copy (4 bytes per pixel and channel) is whole.
    x, y = (_level0(v, y_channel, quantize) for v in (sr, gt))
    terms = []
    for level in range(n):
        if level == n - 1:
            terms.append(_mean_same_map(x, y, _ssim_same))
            break
        h, w = x.shape[-2:]
        total = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        for ys, xs in _tiles(h, w, halo=SSIM_WINDOW - 1):
            total += _sim_cs(x[..., ys, xs], y[..., ys, xs])[1].sum(dim=(1, 2, 3), dtype=torch.float64)
        terms.append(total / (x.shape[1] * (h - SSIM_WINDOW + 1) * (w - SSIM_WINDOW + 1)))
        x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    weights = torch.tensor(betas, dtype=torch.float64, device=sr.device).view(-1, 1)
    # torchmetrics' default normalize="relu": a negative mean term counts as 0 (a fractional power would be NaN).
    return torch.prod(torch.stack(terms).clamp(min=0) ** weights, dim=0)


def _level0(x: torch.Tensor, y_channel: bool, quantize: bool) -> torch.Tensor:
    """An image as float32 in [0, 1] after rounding and the Y conversion, built tile by tile."""
    out = x.new_empty((x.shape[0], 1 if y_channel and x.shape[1] == 3 else x.shape[1], *x.shape[-2:]),
                      dtype=torch.float32)
    for ys, xs in _tiles(*x.shape[-2:]):
        out[..., ys, xs] = (_to_255(x[..., ys, xs], y_channel, quantize) / 255).float()
    return out


@functools.lru_cache(maxsize=8)
def _gaussian_window(channels: int, device: torch.device) -> torch.Tensor:
    """torchmetrics' 11 x 11 Gaussian (sigma 1.5) as a float32 depthwise ``conv2d`` weight."""
    coords = torch.arange(-5.0, 6.0, dtype=torch.float32)
    kernel = torch.exp(-((coords / 1.5) ** 2) / 2)
    kernel = (kernel / kernel.sum())[None]
    return (kernel.T @ kernel).expand(channels, 1, 11, 11).to(device)


def _sim_cs(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torchmetrics' SSIM and contrast-sensitivity maps ('valid', 10 px smaller), data range 1, float32."""
    c1, c2 = 0.01**2, 0.03**2
    channels = x.shape[1]
    stats = F.conv2d(torch.cat([x, y, x * x, y * y, x * y]), _gaussian_window(channels, x.device), groups=channels)
    mu_x, mu_y, xx, yy, xy = stats.split(x.shape[0])
    sigma_xx = (xx - mu_x**2).clamp(min=0.0)
    sigma_yy = (yy - mu_y**2).clamp(min=0.0)
    sigma_xy = xy - mu_x * mu_y
    upper, lower = 2 * sigma_xy + c2, sigma_xx + sigma_yy + c2
    return ((2 * mu_x * mu_y + c1) * upper) / ((mu_x**2 + mu_y**2 + c1) * lower), upper / lower


def _ssim_same(x: torch.Tensor, y: torch.Tensor, pads: tuple[int, int, int, int]) -> torch.Tensor:
    """torchmetrics' full-size SSIM map of a tile: the sides at the image border are reflect-padded by 5."""
    if any(pads):
        x, y = F.pad(x, pads, mode="reflect"), F.pad(y, pads, mode="reflect")
    return _sim_cs(x, y)[0]


def _mean_same_map(x: torch.Tensor, y: torch.Tensor, map_fn, halo: tuple[int, int] = (5, 5)) -> torch.Tensor:
    """The mean over a same-size map that ``map_fn`` computes from a tile plus ``halo`` (before, after) pixels.

    Each output tile reads its halo from the image; where the halo would leave the image, ``map_fn`` is told
    to pad that side as it pads the whole image, so every output pixel equals the untiled one.
    """
    h, w = x.shape[-2:]
    before, after = halo
    total = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    for y0, y1, x0, x1 in _same_tiles(h, w):
        ys, top, bottom = _span(y0, y1, before, after, h)
        xs, left, right = _span(x0, x1, before, after, w)
        pads = (min(left, before), min(right, after), min(top, before), min(bottom, after))
        total += map_fn(x[..., ys, xs], y[..., ys, xs], pads).sum(dim=(1, 2, 3), dtype=torch.float64)
    return total / (x.shape[1] * h * w)


def scc(sr: torch.Tensor, gt: torch.Tensor, crop_border: int = 0, y_channel: bool = False,
        quantize: bool = True) -> torch.Tensor:
    """Spatial correlation coefficient (Zhou et al. 1998, torchmetrics) per image.

    The local correlation, in 8 x 8 windows, of the two images' Laplacian high-passes: 1 when every edge
    and texture of ``gt`` is there with the right sign, lower for blurred or invented detail.

    Args:
        sr: ``(B, C, H, W)`` restored images in [0, 1].
        gt: ``(B, C, H, W)`` ground truth in [0, 1].
        crop_border: pixels cut from every side before measuring.
        y_channel: measure the BT.601 luma of RGB inputs instead of all channels.
        quantize: round both to 8 bits first.

    Returns:
        ``(B,)`` float64, at most 1; NaN for images smaller than the 8 x 8 window.
    """
    sr, gt = _crop(sr, gt, crop_border)
    if min(sr.shape[-2:]) < SCC_WINDOW:
        return torch.full((sr.shape[0],), math.nan, dtype=torch.float64, device=sr.device)
    x, y = (_level0(v, y_channel, quantize) for v in (sr, gt))
    return _mean_same_map(x, y, _scc_map, halo=(5, 4))


_LAPLACIAN = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, 8.0, -1.0], [-1.0, -1.0, -1.0]])


def _scc_map(x: torch.Tensor, y: torch.Tensor, pads: tuple[int, int, int, int]) -> torch.Tensor:
    """torchmetrics' per-pixel SCC of a tile with a (5, 4)-pixel halo, for the tile's pixels only.

    As torchmetrics on the whole image: a 3 x 3 Laplacian (x2) over symmetric 1-pixel padding, then local
    variances and covariance in 8 x 8 windows over zero padding (4 before, 3 after). ``pads`` says how many
    halo pixels each side misses (left, right, top, bottom): those sides are image borders.
    """
    channels = x.shape[1]
    laplacian = _LAPLACIAN.to(x.device).expand(channels, 1, 3, 3)
    window = torch.full((channels, 1, SCC_WINDOW, SCC_WINDOW), 1.0 / SCC_WINDOW**2, device=x.device)
    left, right, top, bottom = pads
    maps = []
    for v in (x, y):
        # Symmetric padding repeats the edge row/column on the sides that are image borders.
        v = F.pad(v, (int(left > 0), int(right > 0), int(top > 0), int(bottom > 0)), mode="replicate")
        hp = F.conv2d(v, laplacian, groups=channels) * 2.0
        # The high-pass is zero beyond the image: pad what the halo misses past the first pixel.
        maps.append(F.pad(hp, (max(0, left - 1), max(0, right - 1), max(0, top - 1), max(0, bottom - 1))))
    hx, hy = maps
    mean_x = F.conv2d(hx, window, groups=channels)
    mean_y = F.conv2d(hy, window, groups=channels)
    var_x = (F.conv2d(hx * hx, window, groups=channels) - mean_x**2).clamp(min=0)
    var_y = (F.conv2d(hy * hy, window, groups=channels) - mean_y**2).clamp(min=0)
    cov = F.conv2d(hx * hy, window, groups=channels) - mean_x * mean_y
    den = var_y.sqrt() * var_x.sqrt()
    return torch.where(den == 0, torch.zeros_like(cov), cov / torch.where(den == 0, torch.ones_like(den), den))


def vif(sr: torch.Tensor, gt: torch.Tensor, crop_border: int = 0, y_channel: bool = False,
        quantize: bool = True) -> torch.Tensor:
    """Pixel-domain visual information fidelity, VIF-P (Sheikh & Bovik 2006, torchmetrics), per image.

    Per scale and window, gt's local variance is compared with what of it reaches ``sr`` through a local gain
    ``g`` and an added noise ``sigma_v^2``: ``log10(1 + g^2 sigma_gt^2 / (sigma_v^2 + sigma_n^2))`` against
    ``log10(1 + sigma_gt^2 / sigma_n^2)``, summed over four scales; VIF is the ratio of the sums. Blur and
    invented detail lower ``g`` or raise ``sigma_v^2`` where gt has texture; a constant brightness shift changes
    neither, so unlike PSNR it scores lost texture worse than a small uniform offset. Computed in float64 on
    the 0-255 scale, tile by tile with a halo (tiles start on multiples of 8, so every scale's grid lines up),
    equal to torchmetrics' ``visual_information_fidelity`` on the whole image.

    Args:
        sr: ``(B, C, H, W)`` restored images in [0, 1].
        gt: ``(B, C, H, W)`` ground truth in [0, 1].
        crop_border: pixels cut from every side before measuring.
        y_channel: measure the BT.601 luma of RGB inputs instead of all channels (the mean over channels).
        quantize: round both to 8 bits first.

    Returns:
        ``(B,)`` float64, at least 0; 1 for equal images, above 1 only where ``sr`` has more local contrast
        than gt (sharpened); NaN for images under 41 px per side after cropping or with no texture at all.
    """
    sr, gt = _crop(sr, gt, crop_border)
    h, w = sr.shape[-2:]
    if min(h, w) < VIF_MIN_SIZE:
        return torch.full((sr.shape[0],), math.nan, dtype=torch.float64, device=sr.device)
    channels = 1 if y_channel and sr.shape[1] == 3 else sr.shape[1]
    kept = torch.zeros(2, sr.shape[0], channels, dtype=torch.float64, device=sr.device)  # (sr's, gt's) sums
    for (ys, rows), (xs, cols) in itertools.product(_vif_spans(h), _vif_spans(w)):
        kept += _vif_sums(_to_255(sr[..., ys, xs], y_channel, quantize), _to_255(gt[..., ys, xs], y_channel, quantize),
                          rows, cols)
    return (kept[0] / kept[1]).mean(dim=1)


def _vif_spans(n: int) -> Iterator[tuple[slice, int | None]]:
    """Tiles of one axis for :func:`vif`: the input rows, and how many finest-scale positions the tile owns.

    Tiles start on multiples of 8 (2 ** 3, the coarsest scale's step), so a tile's scale-``s`` position ``q``
    is the image's position ``start / 2 ** s + q``. A tile owns its positions up to the next tile's start
    (``None``: all, for the last one) and reads 40 rows more: the footprint of a position at any scale.
    """
    tile = max(8, METRIC_TILE // 8 * 8)
    halo = 8 * 2 + 24  # a coarsest-scale position p reads rows [8p, 8p + 40]; finer scales read less
    for start in range(0, n, tile):
        stop = start + tile
        yield slice(start, min(n, stop + halo)), (tile if stop < n else None)


@functools.lru_cache(maxsize=64)
def _vif_band(length: int, taps: int, step: int, device: torch.device) -> torch.Tensor:
    """'Valid' filtering with torchmetrics' VIF Gaussian (``taps`` taps, sigma ``taps / 5``), every ``step``-th
    output kept, as a ``(outputs, length)`` float64 matrix: the 2-D window is separable, so filtering is
    ``band_h @ x @ band_w.T`` (two fast float64 matrix products, as :func:`_gaussian_band`)."""
    coords = torch.arange(taps, dtype=torch.float64) - (taps - 1) / 2
    kernel = torch.exp(-(coords**2) / (2 * (taps / 5) ** 2))
    kernel = kernel / kernel.sum()
    band = torch.zeros(length - taps + 1, length, dtype=torch.float64)
    for offset in range(taps):
        band.diagonal(offset).fill_(float(kernel[offset]))
    return band[::step].to(device)


def _vif_sums(x: torch.Tensor, y: torch.Tensor, rows: int | None, cols: int | None) -> torch.Tensor:
    """VIF's numerator and denominator sums over the positions one tile owns (:func:`_vif_spans`).

    Args:
        x: ``(B, C, h, w)`` float64 tile of sr on the 0-255 scale.
        y: ``(B, C, h, w)`` the same tile of gt.
        rows: finest-scale rows the tile owns, from its first (None: all it can compute).
        cols: the same for columns.

    Returns:
        ``(2, B, C)``: the sums of the information sr keeps and of the information gt holds.
    """
    eps = 1e-10  # torchmetrics' guard against dividing by a flat window's variance
    sums = torch.zeros(2, *x.shape[:2], dtype=torch.float64, device=x.device)
    for scale, taps in enumerate(VIF_WINDOWS):
        if scale > 0:  # low-pass with this scale's window, then keep every second pixel
            if min(x.shape[-2:]) < taps:
                break
            down_h, down_w = (_vif_band(n, taps, 2, x.device) for n in x.shape[-2:])
            x, y = down_h @ x @ down_w.T, down_h @ y @ down_w.T
        if min(x.shape[-2:]) < taps:  # the tile holds no position of this or any coarser scale
            break
        band_h, band_w = (_vif_band(n, taps, 1, x.device) for n in x.shape[-2:])
        mu_x, mu_y, xx, yy, xy = band_h @ torch.stack([x, y, x * x, y * y, x * y]) @ band_w.T
        h_end = None if rows is None else rows >> scale
        w_end = None if cols is None else cols >> scale
        own = (..., slice(0, h_end), slice(0, w_end))
        mu_x, mu_y, xx, yy, xy = mu_x[own], mu_y[own], xx[own], yy[own], xy[own]
        var_y = (yy - mu_y**2).clamp(min=0)  # gt: the reference signal
        var_x = (xx - mu_x**2).clamp(min=0)  # sr: the distorted one
        cov = xy - mu_x * mu_y
        # torchmetrics' order: gain and distortion noise, then flat-gt, flat-sr and negative-gain windows.
        gain = cov / (var_y + eps)
        noise = var_x - gain * cov
        flat_gt = var_y < eps
        gain, noise = gain.masked_fill(flat_gt, 0), torch.where(flat_gt, var_x, noise)
        var_y = var_y.masked_fill(flat_gt, 0)
        flat_sr = var_x < eps
        gain, noise = gain.masked_fill(flat_sr, 0), noise.masked_fill(flat_sr, 0)
        negative = gain < 0
        noise, gain = torch.where(negative, var_x, noise), gain.masked_fill(negative, 0)
        noise = noise.clamp(min=eps)
        sums[0] += torch.log10(1 + gain**2 * var_y / (noise + VIF_NOISE_VARIANCE)).sum(dim=(-2, -1))
        sums[1] += torch.log10(1 + var_y / VIF_NOISE_VARIANCE).sum(dim=(-2, -1))
    return sums


def lpips_weights_path() -> Path:
    """Where torchvision keeps the ImageNet AlexNet weights that LPIPS needs: the torch hub cache."""
    from torchvision.models import AlexNet_Weights

    return Path(torch.hub.get_dir()) / "checkpoints" / Path(AlexNet_Weights.DEFAULT.url).name


@functools.lru_cache(maxsize=1)
def load_lpips() -> nn.Module | None:
    """The LPIPS-AlexNet metric, or None (logged once) when its backbone weights are not on disk.

    The backbone is torchvision's ImageNet AlexNet; the linear heads ship inside torchmetrics. The weights
    file is checked first, so torchvision never starts a download (which would hang without a network).
    Cached: the network is built once per process.

    Returns:
        A torchmetrics ``LearnedPerceptualImagePatchSimilarity`` on CPU taking ``[0, 1]`` RGB, or None.
    """
    path = lpips_weights_path()
    if not path.is_file():
        log.warning("LPIPS n/a: no AlexNet weights at %s (nothing is downloaded); to enable it, copy "
                    "alexnet-owt-7be5be79.pth from a machine with internet into %s, or set TORCH_HOME to a torch "
                    "cache that holds hub/checkpoints/%s", path, path.parent, path.name)
        return None
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    try:
        return LearnedPerceptualImagePatchSimilarity(net_type="alex", reduction="none", normalize=True).eval()
    except (OSError, RuntimeError, ValueError) as err:  # a truncated or foreign file fails torchvision's hash check
        log.warning("LPIPS n/a: could not load the AlexNet weights at %s (%s)", path, err)
        return None


def lpips(sr: torch.Tensor, gt: torch.Tensor, metric: nn.Module, crop_border: int = 0,
          quantize: bool = True) -> torch.Tensor:
    """LPIPS per image with a metric from :func:`load_lpips`; gray images are repeated to RGB.

    Args:
        sr: ``(B, C, H, W)`` restored images in [0, 1].
        gt: ``(B, C, H, W)`` ground truth in [0, 1].
        metric: the module :func:`load_lpips` returns; moved to ``sr``'s device here.
        crop_border: pixels cut from every side before measuring.
        quantize: round both to 8 bits first.

    Returns:
        ``(B,)`` float64, 0 for equal images, higher is worse; NaN for images under 31 px per side.
    """
    sr, gt = _prepare(sr, gt, crop_border, y_channel=False, quantize=quantize)
    if min(sr.shape[-2:]) < LPIPS_MIN_SIZE:
        return torch.full((sr.shape[0],), math.nan, dtype=torch.float64, device=sr.device)
    sr, gt = ((x / 255).float().expand(-1, 3, -1, -1) for x in (sr, gt))
    metric = metric.to(sr.device)
    metric.reset()
    with torch.inference_mode():
        metric.update(sr, gt)
        value = metric.compute()
    metric.reset()
    return value.reshape(-1).to(torch.float64)
