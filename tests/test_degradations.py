"""Degrader: shapes, ranges, the effect of each operation, per-sample parameters, determinism, masks."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
import torch.nn.functional as F

from xswinir.config import DEGRADATION_PRESETS, DegradationConfig
from xswinir.degradations import (
    Degrader,
    build_degrader,
    describe_params,
    gaussian_kernels,
    resize_per_sample,
)
from xswinir.seeds import make_generator

OFF = dict(blur_prob=0.0, noise_prob=0.0)  # the default degradations blur and add noise


def _degrader(scale: int, **overrides) -> Degrader:
    """The Degrader of the default config with some fields changed (the config holds the only defaults)."""
    return build_degrader(DegradationConfig(**overrides), scale)


def _texture(B: int = 4, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Smooth-ish random images with plenty of high frequencies, in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, 3, size, size, generator=g)


def _high_freq_energy(x: torch.Tensor) -> torch.Tensor:
    """(B,) mean squared horizontal + vertical differences."""
    dx = x[..., :, 1:] - x[..., :, :-1]
    dy = x[..., 1:, :] - x[..., :-1, :]
    return dx.pow(2).mean(dim=(1, 2, 3)) + dy.pow(2).mean(dim=(1, 2, 3))


OPS = {
    "blur": dict(noise_prob=0.0),
    "motion": dict(OFF, motion_blur_prob=1.0),
    "noise": dict(blur_prob=0.0),
    "poisson": dict(OFF, poisson_prob=1.0),
    "jpeg": dict(OFF, jpeg_prob=1.0),
    "second_order": dict(OFF, second_order_prob=1.0),
    "area": dict(OFF, resize="area"),
    "bilinear": dict(OFF, resize="bilinear"),
}


@pytest.mark.parametrize("scale", [2, 4])
@pytest.mark.parametrize("op", sorted(OPS))
def test_shape_and_range(op, scale, generator):
    gt = _texture()
    lq, params = _degrader(scale, **OPS[op])(gt, generator)
    assert lq.shape == (4, 3, 32 // scale, 32 // scale)
    assert lq.dtype == torch.float32
    assert lq.min() >= 0 and lq.max() <= 1
    assert all(v.shape == (4,) for v in params.values())


def test_prob_zero_is_identity(generator):
    gt = _texture()
    lq, params = _degrader(1, **OFF)(gt, generator)
    torch.testing.assert_close(lq, gt, rtol=0, atol=0)
    assert describe_params(params, 0) == "identity"


def test_blur_lowers_high_frequencies(generator):
    gt = _texture()
    lq, params = _degrader(1, noise_prob=0.0, blur_sigma=(1.0, 2.0))(gt, generator)
    assert (_high_freq_energy(lq) < 0.5 * _high_freq_energy(gt)).all()
    assert ((params["blur_sigma_x"] >= 1.0) & (params["blur_sigma_x"] <= 2.0)).all()


def test_gaussian_kernel_matches_formula():
    # An axis-aligned kernel is separable: the outer product of two 1-D Gaussians.
    k = gaussian_kernels(torch.tensor([1.5]), torch.tensor([0.7]), torch.tensor([0.0]), 7)[0]
    r = torch.arange(-3, 4, dtype=torch.float32)
    gx, gy = torch.exp(-r**2 / (2 * 1.5**2)), torch.exp(-r**2 / (2 * 0.7**2))
    torch.testing.assert_close(k, torch.outer(gy, gx) / (gx.sum() * gy.sum()))
    # Rotating by 90 degrees swaps the axes.
    k90 = gaussian_kernels(torch.tensor([1.5]), torch.tensor([0.7]), torch.tensor([90.0]), 7)[0]
    torch.testing.assert_close(k90, k.T, atol=1e-6, rtol=1e-5)


def test_motion_blur_lowers_high_frequencies(generator):
    gt = _texture()
    lq, params = _degrader(1, **dict(OFF, motion_blur_prob=1.0))(gt, generator)
    assert (_high_freq_energy(lq) < 0.7 * _high_freq_energy(gt)).all()
    assert (params["motion_kernel_size"] == 9).all()


def test_noise_std_matches_sigma(generator):
    gt = torch.full((4, 3, 64, 64), 0.5)
    lq, params = _degrader(1, blur_prob=0.0, noise_sigma=(10.0, 10.0), noise_gray_prob=0.0)(gt, generator)
    std = (lq - gt).std(dim=(1, 2, 3))
    torch.testing.assert_close(std, torch.full((4,), 10.0 / 255), rtol=0.05, atol=0)
    assert (params["noise_sigma"] == 10.0).all() and (params["noise_gray"] == 0).all()


def test_gray_noise_is_equal_across_channels(generator):
    gt = torch.full((2, 3, 16, 16), 0.5)
    lq, params = _degrader(1, blur_prob=0.0, noise_gray_prob=1.0)(gt, generator)
    torch.testing.assert_close(lq[:, 0], lq[:, 1])
    torch.testing.assert_close(lq[:, 0], lq[:, 2])
    assert (params["noise_gray"] == 1).all()


def test_poisson_noise_std(generator):
    level = 0.4
    gt = torch.full((4, 3, 64, 64), level)
    lq, params = _degrader(1, **dict(OFF, poisson_prob=1.0, poisson_scale=(1.0, 1.0),
                                          noise_gray_prob=0.0))(gt, generator)
    expected = (level * 255) ** 0.5 / 255  # Poisson(255 x) / 255 has std sqrt(255 x) / 255
    std = (lq - gt).std(dim=(1, 2, 3))
    torch.testing.assert_close(std, torch.full((4,), expected), rtol=0.08, atol=0)
    assert (params["poisson_scale"] == 1.0).all()


def test_lower_jpeg_quality_gives_larger_error():
    gt = _texture(B=2, size=32)
    errors = []
    for quality in (10.0, 50.0, 95.0):
        degrader = _degrader(1, **dict(OFF, jpeg_prob=1.0, jpeg_quality=(quality, quality)))
        lq, params = degrader(gt, torch.Generator().manual_seed(0))
        assert (params["jpeg_quality"] == quality).all()
        errors.append((lq - gt).abs().mean())
    assert errors[0] > errors[1] > errors[2] > 0


def test_deterministic_for_a_seed():
    degrader = build_degrader(DEGRADATION_PRESETS["realistic"], 2)
    gt = _texture()
    lq1, p1 = degrader(gt, torch.Generator().manual_seed(7))
    lq2, p2 = degrader(gt, torch.Generator().manual_seed(7))
    lq3, _ = degrader(gt, torch.Generator().manual_seed(8))
    torch.testing.assert_close(lq1, lq2, rtol=0, atol=0)
    assert p1.keys() == p2.keys() and all(torch.equal(p1[k], p2[k]) for k in p1)
    assert not torch.equal(lq1, lq3)


def test_parameters_differ_within_a_batch(generator):
    gt = _texture(B=8)
    _, params = build_degrader(DEGRADATION_PRESETS["realistic"], 2)(gt, generator)
    for key in ("blur_sigma_x", "noise_sigma"):
        assert params[key].unique().numel() > 4, key


def test_probability_masks_per_sample():
    gt = _texture(B=16)
    lq, params = _degrader(1, blur_prob=0.5, noise_prob=0.0)(gt, torch.Generator().manual_seed(3))
    blurred = params["blur_sigma_x"] > 0
    assert 0 < blurred.sum() < 16  # 2**-16 chance of a false failure per seed; seed 3 is fixed
    torch.testing.assert_close(lq[~blurred], gt[~blurred], rtol=0, atol=0)
    assert ((lq[blurred] - gt[blurred]).abs().amax(dim=(1, 2, 3)) > 0).all()
    # Probabilities are honoured on average.
    _, params = _degrader(1, blur_prob=0.0, noise_prob=0.3)(torch.zeros(2000, 1, 4, 4),
                                                                  torch.Generator().manual_seed(0))
    assert abs((params["noise_sigma"] > 0).float().mean() - 0.3) < 0.05


def test_second_order_applies_per_sample():
    gt = _texture(B=8)
    degrader = _degrader(2, **dict(OFF, second_order_prob=0.5))
    lq, params = degrader(gt, torch.Generator().manual_seed(1))
    applied = params["second_order"] > 0
    assert 0 < applied.sum() < 8
    plain, _ = _degrader(2, **OFF)(gt, torch.Generator().manual_seed(1))
    torch.testing.assert_close(lq[~applied], plain[~applied], rtol=0, atol=0)
    assert (params["second_jpeg_quality"][applied] > 0).all()
    assert (params["second_jpeg_quality"][~applied] == 0).all()
    assert "2nd:" in describe_params(params, int(applied.nonzero()[0]))
    factors = params["second_resize_factor"][applied]
    assert factors.unique().numel() == factors.numel()  # drawn per sample
    assert ((factors >= 0.3) & (factors <= 1.2)).all()


def test_resize_per_sample():
    x = _texture(B=3, size=24)
    factor = torch.tensor([0.5, 1.0, 1.25])
    torch.testing.assert_close(resize_per_sample(x, torch.ones(3), (24, 24)), x, atol=1e-5, rtol=0)
    canvas = resize_per_sample(x, factor, (30, 30))
    assert canvas.shape == (3, 3, 30, 30)
    # Sample 0 shrinks to 12 x 12 at the top-left: plain bicubic interpolation of that sample alone.
    expected = F.interpolate(x[:1], size=(12, 12), mode="bicubic", align_corners=False)[0]
    torch.testing.assert_close(canvas[0, :, :12, :12], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(canvas[1, :, :24, :24], x[1], atol=1e-5, rtol=0)
    # Reading back inverts it for smooth images.
    smooth = F.interpolate(x[:, :, :6, :6], size=(24, 24), mode="bilinear", align_corners=False)
    back = resize_per_sample(resize_per_sample(smooth, factor, (30, 30)), factor, (24, 24), inverse=True)
    assert (back - smooth).abs().mean() < 0.02


def test_bfloat16_in_bfloat16_out(generator):
    gt = _texture().bfloat16()
    lq, _ = build_degrader(DEGRADATION_PRESETS["realistic"], 4)(gt, generator)
    assert lq.dtype == torch.bfloat16 and lq.shape == (4, 3, 8, 8)


@pytest.mark.parametrize("preset", sorted(DEGRADATION_PRESETS))
def test_presets_build_and_run(preset, generator):
    lq, params = build_degrader(DEGRADATION_PRESETS[preset], 2)(_texture(B=2), generator)
    assert lq.shape == (2, 3, 16, 16)
    assert "down x2" in describe_params(params, 1)


def test_matlab_resize_matches_imresize(generator):
    resize = pytest.importorskip("xswinir.resize")
    gt = _texture(B=2)
    lq, _ = build_degrader(DEGRADATION_PRESETS["bicubic"], 4)(gt, generator)
    torch.testing.assert_close(lq, resize.imresize(gt, 0.25).clamp(0, 1))


def test_describe_params_reads_the_sample():
    params = {"blur_sigma_x": torch.tensor([0.0, 1.2]), "blur_sigma_y": torch.tensor([0.0, 0.8]),
              "blur_angle": torch.tensor([0.0, 35.0]), "scale": torch.tensor([4.0, 4.0]),
              "noise_sigma": torch.tensor([12.3, 0.0]), "noise_gray": torch.tensor([1.0, 0.0]),
              "jpeg_quality": torch.tensor([0.0, 55.0])}
    assert describe_params(params, 0) == "down x4 | noise sigma 12.3 gray"
    assert describe_params(params, 1) == "blur sigma 1.20x0.80 @ 35 deg | down x4 | JPEG q55"


def test_generator_on_another_device_is_refused(generator):
    # A batch on another device type than the generator (meta here; CUDA in the gpu test) is refused up front.
    gt = torch.empty(1, 3, 8, 8, device="meta")
    with pytest.raises(ValueError, match="generator"):
        _degrader(2)(gt, generator)


@pytest.mark.gpu
def test_cuda_batch_with_cuda_generator():
    gt = _texture().cuda()
    degrader = build_degrader(DEGRADATION_PRESETS["realistic"], 2)
    lq, params = degrader(gt, make_generator(0, "cuda"))
    assert lq.is_cuda and lq.shape == (4, 3, 16, 16) and params["noise_sigma"].is_cuda
    lq2, _ = degrader(gt, make_generator(0, "cuda"))
    torch.testing.assert_close(lq, lq2, rtol=0, atol=0)
    with pytest.raises(ValueError, match="generator"):
        degrader(gt, torch.Generator().manual_seed(0))
    lq_bf16, _ = degrader(gt.bfloat16(), make_generator(0, "cuda"))
    assert lq_bf16.dtype == torch.bfloat16


def test_degrader_takes_exactly_the_config_fields_without_defaults():
    # One source of truth: the config holds the defaults, build_degrader passes every field by name.
    params = dict(inspect.signature(Degrader.__init__).parameters)
    del params["self"], params["scale"]
    fields = {f.name: f.type for f in dataclasses.fields(DegradationConfig) if f.name != "preset"}
    assert {name: p.annotation for name, p in params.items()} == fields
    assert all(p.default is inspect.Parameter.empty for p in params.values())
    degrader = build_degrader(DEGRADATION_PRESETS["realistic"], 3)
    assert degrader.scale == 3 and all(getattr(degrader, n) == getattr(DEGRADATION_PRESETS["realistic"], n)
                                       for n in fields)
