"""PSNR and SSIM as the SR literature reports them, texture-sensitive metrics from torchmetrics, and the names.

The published numbers (SwinIR's ``main_test_swinir.py``, BasicSR's ``basicsr/metrics/psnr_ssim.py``) are
computed on images rounded to 8 bits, with ``crop_border = scale`` pixels cut from every side, on the 0-255
scale, either over the RGB channels or on the luma ``Y`` of ITU-R BT.601
(``Y = 16 + 65.481 R + 128.553 G + 24.966 B`` for R, G, B in [0, 1]; Y is not rounded). SSIM uses an
11x11 Gaussian window with sigma 1.5, 'valid' filtering (no padding) and is averaged over channels. The
functions here follow those rules on ``(B, C, H, W)`` float tensors in [0, 1] on any device, in float64
as the numpy reference does.

Beside them, three full-reference metrics that react to lost or invented texture, all from torchmetrics
and measured on the same rounded, cropped images: MS-SSIM on Y (:func:`ms_ssim`), the spatial correlation
coefficient of Laplacian high-passes on Y (:func:`scc`), and LPIPS (:func:`load_lpips`), which needs
ImageNet AlexNet weights and is only used when they are already on disk - nothing is ever downloaded.
"""

from __future__ import annotations

import functools
import logging
import math
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

# Metric names reported to Ray and logged; the trainer and tune import these, never retype them.
VAL_PSNR = "val/psnr"
VAL_SSIM = "val/ssim"
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
LPIPS = "lpips"  # lower is better; None where the backbone weights are not on disk
EVAL_METRICS = (PSNR, SSIM, PSNR_Y, SSIM_Y, MS_SSIM_Y, SCC_Y, LPIPS)

# Wang, Simoncelli, Bovik 2003, finest scale first; torchmetrics' defaults.
MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
SSIM_WINDOW = 11  # side of the Gaussian SSIM window: the smallest image any SSIM here can measure
SCC_WINDOW = 8  # local correlation window of the spatial correlation coefficient (torchmetrics' default)
LPIPS_MIN_SIZE = 31  # pixels per side for which AlexNet's second max-pool still gets a 3 x 3 input

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


def _prepare(sr: torch.Tensor, gt: torch.Tensor, crop_border: int, y_channel: bool, quantize: bool) -> tuple:
    """Both images as float64 on the 0-255 scale, rounded to 8 bits, cropped, optionally Y only."""
    if sr.shape != gt.shape:
        raise ValueError(f"sr and gt differ in shape: {tuple(sr.shape)} vs {tuple(gt.shape)}")
    if sr.dim() != 4:
        raise ValueError(f"expected (B, C, H, W), got shape {tuple(sr.shape)}")
    out = []
    for x in (sr, gt):
        x = x.detach().to(torch.float64).clamp(0, 1)
        if quantize:
            x = torch.round(x * 255) / 255  # as np.uint8((x * 255).round()) in the published scripts
        if crop_border > 0:
            x = x[..., crop_border:-crop_border, crop_border:-crop_border]
        if y_channel and x.shape[1] == 3:
            x = rgb_to_y(x)
        else:
            x = x * 255
        out.append(x)
    if out[0].shape[-1] < 1 or out[0].shape[-2] < 1:
        raise ValueError(f"crop_border={crop_border} leaves no pixels of a {tuple(sr.shape[-2:])} image")
    return out[0], out[1]


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
    sr, gt = _prepare(sr, gt, crop_border, y_channel, quantize)
    mse = (sr - gt).pow(2).mean(dim=(1, 2, 3))
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
    sr, gt = _prepare(sr, gt, crop_border, y_channel, quantize)
    b, c, h, w = sr.shape
    if h < 11 or w < 11:
        raise ValueError(f"SSIM needs at least 11x11 pixels after cropping, got {h}x{w}")
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    band_h, band_w = _gaussian_band(h, sr.device), _gaussian_band(w, sr.device)
    # One filtering pass over all five statistics' inputs at once: (5, B, C, H, W) -> (5, B, C, H-10, W-10).
    stats = torch.stack([sr, gt, sr * sr, gt * gt, sr * gt])
    mu_x, mu_y, xx, yy, xy = torch.matmul(torch.matmul(band_h, stats), band_w.T)
    sigma_xx = xx - mu_x**2
    sigma_yy = yy - mu_y**2
    sigma_xy = xy - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * sigma_xy + c2)) / (
        (mu_x**2 + mu_y**2 + c1) * (sigma_xx + sigma_yy + c2)
    )
    return ssim_map.reshape(b, c, -1).mean(dim=2).mean(dim=1)


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
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

    sr, gt = _prepare(sr, gt, crop_border, y_channel, quantize)
    n = ms_ssim_scales(sr.shape[-2], sr.shape[-1]) if scales is None else scales
    if n == 0:
        return torch.full((sr.shape[0],), math.nan, dtype=torch.float64, device=sr.device)
    betas = MS_SSIM_BETAS if n == len(MS_SSIM_BETAS) else tuple(b / sum(MS_SSIM_BETAS[:n]) for b in MS_SSIM_BETAS[:n])
    # float32 on [0, 1]: float64 convolutions are 10-50x slower on CPU, and 8-bit inputs lose nothing.
    value = multiscale_structural_similarity_index_measure(
        (sr / 255).float(), (gt / 255).float(), data_range=1.0, betas=betas, reduction="none",
    )
    return value.to(torch.float64)


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
    from torchmetrics.functional.image import spatial_correlation_coefficient

    sr, gt = _prepare(sr, gt, crop_border, y_channel, quantize)
    if min(sr.shape[-2:]) < SCC_WINDOW:
        return torch.full((sr.shape[0],), math.nan, dtype=torch.float64, device=sr.device)
    value = spatial_correlation_coefficient((sr / 255).float(), (gt / 255).float(), window_size=SCC_WINDOW,
                                            reduction="none")
    return value.to(torch.float64)


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
