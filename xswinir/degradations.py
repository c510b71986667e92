"""Random degradations gt -> lq, batched on the batch's device (Kornia + torch).

One :class:`Degrader` call degrades a whole batch: every random parameter (blur sigmas and angle, noise
sigma, JPEG quality, ...) is drawn per sample from the caller's seeded ``torch.Generator``, and an
operation with probability ``p`` is applied to a random subset of the batch by masking with
``torch.where`` - there is no per-sample Python loop. The order follows BasicSR/Real-ESRGAN
(``basicsr/models/realesrgan_model.py``)::

    Gaussian blur -> motion blur -> down-sample by `scale` -> Gaussian noise -> Poisson noise -> JPEG
      [-> second order: blur -> random resize -> Gaussian noise -> JPEG -> resize to the LR size]

The returned ``params`` record what was done to each sample, so a batch can be reproduced and described
(:func:`describe_params`). Conventions: a sigma, scale or quality of 0 means "not applied".

Generators: random numbers are drawn on ``generator.device``; a CUDA batch needs a CUDA generator
(``torch.Generator(device="cuda").manual_seed(seed)``, see :func:`xswinir.seeds.make_generator`), otherwise a
``ValueError`` says so. The same seed gives the same parameters on the same device type, but CPU and CUDA
generators produce different streams.
"""

from __future__ import annotations

import dataclasses
import math
import typing

import kornia
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xswinir.config import DegradationConfig, ResizeMode
from xswinir.resize import imresize


def _uniform(generator: torch.Generator, n: int, bounds: tuple[float, float], device: torch.device) -> Tensor:
    low, high = bounds
    return low + (high - low) * torch.rand(n, generator=generator, device=device)


def _chance(generator: torch.Generator, n: int, prob: float, device: torch.device) -> Tensor:
    # Always drawn, even for prob 1, so that changing a probability within (0, 1] changes which samples get
    # the op but not the random stream (an op with prob 0 skips its noise images, which does shift it).
    return torch.rand(n, generator=generator, device=device) < prob


def _fit_kernel_size(kernel_size: int, height: int, width: int) -> int:
    # Reflect padding needs pad < size; tiny LR images in the second round get a smaller (odd) kernel.
    limit = 2 * min(height, width) - 1
    size = min(kernel_size, limit)
    return size if size % 2 else size - 1


def gaussian_kernels(sigma_x: Tensor, sigma_y: Tensor, angle: Tensor, kernel_size: int) -> Tensor:
    """Anisotropic Gaussian kernels, one per sample.

    Args:
        sigma_x: (B,) standard deviation along the rotated x axis, in pixels; > 0.
        sigma_y: (B,) standard deviation along the rotated y axis, in pixels; > 0.
        angle: (B,) rotation of the x axis, in degrees.
        kernel_size: odd side length k.

    Returns:
        (B, k, k) kernels that each sum to 1.
    """
    half = kernel_size // 2
    coords = torch.arange(-half, half + 1, device=sigma_x.device, dtype=torch.float32)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")  # (k, k)
    theta = torch.deg2rad(angle.float())[:, None, None]
    cos, sin = torch.cos(theta), torch.sin(theta)
    # Coordinates in the kernel's own (rotated) frame, where the covariance is diagonal.
    u = cos * xx + sin * yy
    v = -sin * xx + cos * yy
    sx = sigma_x.float()[:, None, None]
    sy = sigma_y.float()[:, None, None]
    kernel = torch.exp(-0.5 * ((u / sx) ** 2 + (v / sy) ** 2))
    return kernel / kernel.sum(dim=(1, 2), keepdim=True)


def _mask(apply: Tensor, new: Tensor, old: Tensor) -> Tensor:
    return torch.where(apply.view(-1, *([1] * (new.dim() - 1))), new, old)


class Degrader(nn.Module):
    """Batched random degradation of gt images into lq inputs.

    The arguments after ``scale`` are the fields of :class:`~xswinir.config.DegradationConfig` (which holds
    their defaults and checks their ranges; :func:`build_degrader` passes them all).

    Args:
        scale: down-sampling factor (1 for denoising / JPEG artifact removal).
        blur_prob: chance of a Gaussian blur per sample.
        blur_kernel_size: odd kernel side of the Gaussian blurs.
        blur_sigma: (low, high) sigma range in pixels.
        blur_anisotropic_prob: chance that a blurred sample gets independent sigma_x, sigma_y and an angle.
        motion_blur_prob: chance of a linear motion blur per sample.
        motion_kernel_size: odd length of the motion blur kernel.
        resize: down-sampling kernel; ``matlab`` is MATLAB's bicubic ``imresize`` (the benchmark LR files).
        noise_prob: chance of additive Gaussian noise per sample.
        noise_sigma: (low, high) noise sigma on the 0-255 scale.
        noise_gray_prob: chance that a noisy sample gets the same noise in every channel.
        poisson_prob: chance of Poisson (shot) noise per sample.
        poisson_scale: (low, high) multiplier of the Poisson noise.
        jpeg_prob: chance of JPEG compression per sample.
        jpeg_quality: (low, high) JPEG quality, 1-100.
        second_order_prob: chance of the second degradation round per sample.
        second_blur_sigma: (low, high) sigma of the second round's blur, in LR pixels.
        second_resize_range: (low, high) factor of the second round's intermediate resize, per sample.
        second_noise_sigma: (low, high) Gaussian noise sigma of the second round, 0-255 scale.
        second_jpeg_quality: (low, high) JPEG quality of the second round.
    """

    def __init__(
        self,
        scale: int,
        *,
        blur_prob: float,
        blur_kernel_size: int,
        blur_sigma: tuple[float, float],
        blur_anisotropic_prob: float,
        motion_blur_prob: float,
        motion_kernel_size: int,
        resize: ResizeMode,
        noise_prob: float,
        noise_sigma: tuple[float, float],
        noise_gray_prob: float,
        poisson_prob: float,
        poisson_scale: tuple[float, float],
        jpeg_prob: float,
        jpeg_quality: tuple[float, float],
        second_order_prob: float,
        second_blur_sigma: tuple[float, float],
        second_resize_range: tuple[float, float],
        second_noise_sigma: tuple[float, float],
        second_jpeg_quality: tuple[float, float],
    ) -> None:
        super().__init__()
        if resize not in typing.get_args(ResizeMode):
            raise ValueError(f"resize must be one of {typing.get_args(ResizeMode)}, got {resize!r}")
        self.scale = scale
        self.blur_prob = blur_prob
        self.blur_kernel_size = blur_kernel_size
        self.blur_sigma = blur_sigma
        self.blur_anisotropic_prob = blur_anisotropic_prob
        self.motion_blur_prob = motion_blur_prob
        self.motion_kernel_size = motion_kernel_size
        self.resize = resize
        self.noise_prob = noise_prob
        self.noise_sigma = noise_sigma
        self.noise_gray_prob = noise_gray_prob
        self.poisson_prob = poisson_prob
        self.poisson_scale = poisson_scale
        self.jpeg_prob = jpeg_prob
        self.jpeg_quality = jpeg_quality
        self.second_order_prob = second_order_prob
        self.second_blur_sigma = second_blur_sigma
        self.second_resize_range = second_resize_range
        self.second_noise_sigma = second_noise_sigma
        self.second_jpeg_quality = second_jpeg_quality

    def forward(self, gt: Tensor, generator: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        """Degrades a batch.

        Args:
            gt: (B, C, H, W) in [0, 1], float32 or bfloat16, on any device; H and W multiples of ``scale``.
            generator: seeded generator on ``gt``'s device type; all randomness comes from it.

        Returns:
            lq: (B, C, H / scale, W / scale) in [0, 1], ``gt``'s dtype.
            params: name -> (B,) float32 tensor on ``gt``'s device, what was done to each sample
                (see :func:`describe_params`; 0 means "not applied").
        """
        if generator.device.type != gt.device.type:
            raise ValueError(
                f"the generator is on {generator.device} but the batch is on {gt.device}; pass "
                f"torch.Generator(device='{gt.device.type}').manual_seed(seed) (xswinir.seeds.make_generator)"
            )
        B, _, H, W = gt.shape
        if H % self.scale or W % self.scale:
            raise ValueError(f"gt size {H}x{W} is not a multiple of scale {self.scale}")
        device = gt.device
        x = gt.float()  # Kornia's filters and JPEG codec, and Poisson sampling, want float32
        params: dict[str, Tensor] = {}

        x, blur = self._blur(x, generator, self.blur_prob, self.blur_sigma)
        params.update(blur)

        apply = _chance(generator, B, self.motion_blur_prob, device)
        angle = _uniform(generator, B, (-180.0, 180.0), device)
        direction = _uniform(generator, B, (-1.0, 1.0), device)
        ksize = _fit_kernel_size(self.motion_kernel_size, H, W)
        if self.motion_blur_prob > 0:
            x = _mask(apply, kornia.filters.motion_blur(x, ksize, angle, direction, border_type="reflect"), x)
        params["motion_kernel_size"] = apply.float() * ksize
        params["motion_angle"] = torch.where(apply, angle, 0.0)
        params["motion_direction"] = torch.where(apply, direction, 0.0)

        x = self._resize(x, (H // self.scale, W // self.scale), self.resize)
        params["scale"] = torch.full((B,), float(self.scale), device=device)

        x, noise = self._gaussian_noise(x, generator, self.noise_prob, self.noise_sigma)
        params.update(noise)
        x, poisson = self._poisson_noise(x, generator)
        params.update(poisson)
        x, jpeg = self._jpeg(x, generator, self.jpeg_prob, self.jpeg_quality)
        params.update(jpeg)

        x, second = self._second_order(x, generator)
        params.update(second)
        return x.clamp(0.0, 1.0).to(gt.dtype), params

    def _blur(self, x: Tensor, generator: torch.Generator, prob: float, sigma_range: tuple[float, float],
              prefix: str = "blur") -> tuple[Tensor, dict[str, Tensor]]:
        B, _, H, W = x.shape
        device = x.device
        apply = _chance(generator, B, prob, device)
        anisotropic = _chance(generator, B, self.blur_anisotropic_prob, device)
        sigma_x = _uniform(generator, B, sigma_range, device)
        sigma_y = torch.where(anisotropic, _uniform(generator, B, sigma_range, device), sigma_x)
        angle = torch.where(anisotropic, _uniform(generator, B, (-90.0, 90.0), device), 0.0)
        if prob > 0:
            ksize = _fit_kernel_size(self.blur_kernel_size, H, W)
            kernels = gaussian_kernels(sigma_x, sigma_y, angle, ksize)  # (B, k, k)
            x = _mask(apply, kornia.filters.filter2d(x, kernels, border_type="reflect"), x)
        return x, {
            f"{prefix}_sigma_x": torch.where(apply, sigma_x, 0.0),
            f"{prefix}_sigma_y": torch.where(apply, sigma_y, 0.0),
            f"{prefix}_angle": torch.where(apply, angle, 0.0),
        }

    @staticmethod
    def _resize(x: Tensor, size: tuple[int, int], mode: ResizeMode) -> Tensor:
        if tuple(x.shape[-2:]) == size:
            return x
        if mode == "matlab":
            if size[0] * x.shape[-1] == size[1] * x.shape[-2]:
                return imresize(x, size[0] / x.shape[-2])
            return F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
        if mode == "area":
            return F.interpolate(x, size=size, mode="area")
        return F.interpolate(x, size=size, mode=mode, antialias=True, align_corners=False)

    def _gaussian_noise(self, x: Tensor, generator: torch.Generator, prob: float, sigma_range: tuple[float, float],
                        prefix: str = "noise") -> tuple[Tensor, dict[str, Tensor]]:
        B, C, H, W = x.shape
        device = x.device
        apply = _chance(generator, B, prob, device)
        gray = _chance(generator, B, self.noise_gray_prob, device)
        sigma = torch.where(apply, _uniform(generator, B, sigma_range, device), 0.0)
        if prob > 0:
            noise = torch.randn(B, C, H, W, generator=generator, device=device)
            # Gray noise is the first channel's noise in every channel: one draw serves both kinds.
            noise = _mask(gray, noise[:, :1].expand(B, C, H, W), noise)
            x = (x + noise * (sigma / 255.0).view(B, 1, 1, 1)).clamp(0.0, 1.0)
        return x, {f"{prefix}_sigma": sigma, f"{prefix}_gray": (gray & apply).float()}

    def _poisson_noise(self, x: Tensor, generator: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        B, C, H, W = x.shape
        device = x.device
        apply = _chance(generator, B, self.poisson_prob, device)
        gray = _chance(generator, B, self.noise_gray_prob, device)
        scale = torch.where(apply, _uniform(generator, B, self.poisson_scale, device), 0.0)
        if self.poisson_prob > 0:
            # Shot noise of an 8-bit sensor: counts ~ Poisson(255 * x) (BasicSR uses the number of distinct
            # values per image, a per-sample loop; 255 levels is the same for 8-bit training images).
            levels = 255.0
            image = x.clamp(0.0, 1.0)
            weights = image.new_tensor([0.299, 0.587, 0.114]) if C == 3 else image.new_full((C,), 1.0 / C)
            luma = (image * weights.view(1, C, 1, 1)).sum(1, keepdim=True)
            color_noise = torch.poisson(image * levels, generator=generator) / levels - image
            gray_noise = (torch.poisson(luma * levels, generator=generator) / levels - luma).expand(B, C, H, W)
            noise = _mask(gray, gray_noise, color_noise)
            x = (x + noise * scale.view(B, 1, 1, 1)).clamp(0.0, 1.0)
        return x, {"poisson_scale": scale, "poisson_gray": (gray & apply).float()}

    @staticmethod
    def _jpeg(x: Tensor, generator: torch.Generator, prob: float, quality_range: tuple[float, float],
              prefix: str = "jpeg") -> tuple[Tensor, dict[str, Tensor]]:
        B = x.shape[0]
        apply = _chance(generator, B, prob, x.device)
        quality = _uniform(generator, B, quality_range, x.device).round().clamp(1.0, 100.0)
        if prob > 0:
            compressed = kornia.enhance.jpeg_codec_differentiable(x.clamp(0.0, 1.0), quality)
            x = _mask(apply, compressed, x)
        return x, {f"{prefix}_quality": torch.where(apply, quality, 0.0)}

    def _second_order(self, x: Tensor, generator: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        B, _, h, w = x.shape
        device = x.device
        apply = _chance(generator, B, self.second_order_prob, device)
        factor = _uniform(generator, B, self.second_resize_range, device)
        if self.second_order_prob > 0:
            # The second round runs on the whole batch and is masked at the end: cheaper than gathering the
            # chosen samples, and it keeps the random stream independent of which samples were chosen.
            y, blur = self._blur(x, generator, 1.0, self.second_blur_sigma, prefix="second_blur")
            # Each sample is resized by its own factor into the top-left of a canvas sized for the largest
            # factor the config allows (a static shape: no host sync), degraded there, and read back.
            high = self.second_resize_range[1]
            canvas = (max(1, math.ceil(h * high)), max(1, math.ceil(w * high)))
            y = resize_per_sample(y, factor, canvas)
            y, noise = self._gaussian_noise(y, generator, 1.0, self.second_noise_sigma, prefix="second_noise")
            y, jpeg = self._jpeg(y, generator, 1.0, self.second_jpeg_quality, prefix="second_jpeg")
            y = resize_per_sample(y, factor, (h, w), inverse=True)
            x = _mask(apply, y.clamp(0.0, 1.0), x)
        else:
            zeros = torch.zeros(B, device=device)
            blur = {f"second_blur_{k}": zeros for k in ("sigma_x", "sigma_y", "angle")}
            noise = {"second_noise_sigma": zeros, "second_noise_gray": zeros}
            jpeg = {"second_jpeg_quality": zeros}
        out = {"second_order": apply.float(), "second_resize_factor": torch.where(apply, factor, 0.0)}
        for part in (blur, noise, jpeg):
            out.update({k: torch.where(apply, v, 0.0) for k, v in part.items()})
        return x, out


def resize_per_sample(x: Tensor, factor: Tensor, size: tuple[int, int], inverse: bool = False) -> Tensor:
    """Resizes each sample by its own factor, batched, with bicubic ``grid_sample``.

    Forward, sample i is resized to ``factor[i] * (H, W)`` and placed at the top-left of an output of
    ``size`` (the rest repeats its border); with ``inverse``, that top-left part of ``x`` is read back and
    resized to ``size``. Like Real-ESRGAN's random resize there is no anti-aliasing (the blur before it
    does that).

    Args:
        x: (B, C, H, W).
        factor: (B,) resize factors, > 0.
        size: (H', W') of the output.
        inverse: read the top-left ``factor``-scaled part of ``x`` back to ``size`` instead.

    Returns:
        (B, C, H', W').
    """
    B, C, H, W = x.shape
    Ho, Wo = size
    f = factor.to(torch.float32)
    # align_corners=False coordinates: an output pixel centre u in [-1, 1] maps to a * (u + 1) - 1.
    if inverse:
        ax, ay = f * Wo / W, f * Ho / H
    else:
        ax, ay = Wo / (f * W), Ho / (f * H)
    theta = torch.zeros(B, 2, 3, device=x.device, dtype=torch.float32)
    theta[:, 0, 0], theta[:, 0, 2] = ax, ax - 1
    theta[:, 1, 1], theta[:, 1, 2] = ay, ay - 1
    grid = F.affine_grid(theta, [B, C, Ho, Wo], align_corners=False)
    return F.grid_sample(x.float(), grid, mode="bicubic", padding_mode="border", align_corners=False)


def build_degrader(degradation: DegradationConfig, scale: int) -> Degrader:
    """The :class:`Degrader` of ``degradation`` (a run's ``cfg.degradation``) for down-sampling by ``scale``: every
    field but ``preset``."""
    return Degrader(scale, **{f.name: getattr(degradation, f.name) for f in dataclasses.fields(degradation)
                              if f.name != "preset"})


def describe_params(params: dict[str, Tensor], index: int) -> str:
    """One line saying what the degrader did to sample ``index``, e.g. for the explanation picture.

    Example: ``"blur sigma 1.20x0.80 @ 35 deg | down x4 | noise sigma 12.3 gray | JPEG q55"``.
    """
    p = {k: float(v[index]) for k, v in params.items()}  # host copies: a description is never in a hot path
    parts: list[str] = []

    def blur(prefix: str) -> str | None:
        sx, sy, angle = p.get(f"{prefix}_sigma_x", 0.0), p.get(f"{prefix}_sigma_y", 0.0), p.get(f"{prefix}_angle", 0.0)
        if sx <= 0:
            return None
        if math.isclose(sx, sy):
            return f"blur sigma {sx:.2f}"
        return f"blur sigma {sx:.2f}x{sy:.2f} @ {angle:.0f} deg"

    def noise(prefix: str) -> str | None:
        sigma = p.get(f"{prefix}_sigma", 0.0)
        if sigma <= 0:
            return None
        return f"noise sigma {sigma:.1f}{' gray' if p.get(f'{prefix}_gray', 0.0) else ''}"

    parts.append(blur("blur") or "")
    if p.get("motion_kernel_size", 0.0) > 0:
        parts.append(f"motion blur k{p['motion_kernel_size']:.0f} @ {p['motion_angle']:.0f} deg")
    if p.get("scale", 1.0) != 1.0:
        parts.append(f"down x{p['scale']:.0f}")
    parts.append(noise("noise") or "")
    if p.get("poisson_scale", 0.0) > 0:
        parts.append(f"poisson x{p['poisson_scale']:.2f}{' gray' if p.get('poisson_gray', 0.0) else ''}")
    if p.get("jpeg_quality", 0.0) > 0:
        parts.append(f"JPEG q{p['jpeg_quality']:.0f}")
    if p.get("second_order", 0.0) > 0:
        second = [blur("second_blur"), f"resize x{p['second_resize_factor']:.2f}", noise("second_noise"),
                  f"JPEG q{p['second_jpeg_quality']:.0f}"]
        parts.append("2nd: " + ", ".join(s for s in second if s))
    text = " | ".join(s for s in parts if s)
    return text or "identity"
