"""PSNR and SSIM as the SR literature reports them, batched in torch, and the metric names.

The published numbers (SwinIR's ``main_test_swinir.py``, BasicSR's ``basicsr/metrics/psnr_ssim.py``) are
computed on images rounded to 8 bits, with ``crop_border = scale`` pixels cut from every side, on the 0-255
scale, either over the RGB channels or on the luma ``Y`` of ITU-R BT.601
(``Y = 16 + 65.481 R + 128.553 G + 24.966 B`` for R, G, B in [0, 1]; Y is not rounded). SSIM uses an
11x11 Gaussian window with sigma 1.5, 'valid' filtering (no padding) and is averaged over channels. The
functions here follow those rules on ``(B, C, H, W)`` float tensors in [0, 1] on any device, in float64
as the numpy reference does.
"""

from __future__ import annotations

import functools

import torch

# Metric names reported to Ray and logged; the trainer and tune import these, never retype them.
VAL_PSNR = "val/psnr"
VAL_SSIM = "val/ssim"
VAL_PSNR_Y = "val/psnr_y"
VAL_SSIM_Y = "val/ssim_y"
VAL_PSNR_BICUBIC_Y = "val/psnr_y_bicubic"
VAL_SSIM_BICUBIC_Y = "val/ssim_y_bicubic"

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
        "psnr": psnr(sr, gt, crop_border),
        "ssim": ssim(sr, gt, crop_border),
        "psnr_y": psnr(sr, gt, crop_border, y_channel=True),
        "ssim_y": ssim(sr, gt, crop_border, y_channel=True),
    }
