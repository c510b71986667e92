"""PSNR/SSIM against hand-computed values and an independent loop-based SSIM; VIF against torchmetrics."""

from __future__ import annotations

import math

import pytest
import torch

import xswinir.metrics as metrics
from xswinir.metrics import (
    VAL_PSNR_BICUBIC_Y,
    VAL_PSNR_Y,
    VAL_SSIM_Y,
    VIF_MIN_SIZE,
    psnr,
    psnr_y,
    rgb_to_y,
    ssim,
    vif,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small tensors: one thread is fastest on a shared machine


def _grid(generator: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    """Random images already on the 8-bit grid, so that quantisation changes nothing."""
    return torch.randint(0, 256, shape, generator=generator).double() / 255


def test_metric_names() -> None:
    assert (VAL_PSNR_Y, VAL_SSIM_Y, VAL_PSNR_BICUBIC_Y) == ("val/psnr_y", "val/ssim_y", "val/psnr_y_bicubic")


def test_psnr_equal_images_is_inf(generator: torch.Generator) -> None:
    x = torch.rand(2, 3, 16, 16, generator=generator)
    assert torch.isinf(psnr(x, x.clone(), crop_border=2)).all()
    assert torch.isinf(psnr(x, x.clone(), crop_border=2, y_channel=True)).all()


def test_psnr_constant_offset_hand_computed(generator: torch.Generator) -> None:
    gt = _grid(generator, (2, 3, 16, 16)) * (200 / 255)  # room for the offset below 1
    gt = torch.round(gt * 255) / 255
    sr = gt + 10 / 255  # every pixel 10 levels off: MSE = 100 on the 0-255 scale
    expected = 10 * math.log10(255**2 / 100)
    torch.testing.assert_close(psnr(sr, gt, crop_border=2), torch.full((2,), expected, dtype=torch.float64))
    # On Y the offset becomes 10 * (65.481 + 128.553 + 24.966) / 255 = 10 * 219 / 255 levels.
    expected_y = 10 * math.log10(255**2 / (10 * 219 / 255) ** 2)
    torch.testing.assert_close(psnr(sr, gt, 2, y_channel=True), torch.full((2,), expected_y, dtype=torch.float64))


def test_psnr_crop_border_ignores_the_border(generator: torch.Generator) -> None:
    gt = _grid(generator, (1, 3, 16, 16))
    sr = gt.clone()
    sr[..., :3, :] = 1 - sr[..., :3, :]  # damage only the top 3 rows
    assert torch.isinf(psnr(sr, gt, crop_border=3))
    assert torch.isfinite(psnr(sr, gt, crop_border=2))


def test_psnr_rounds_to_8_bits() -> None:
    gt = torch.full((1, 1, 8, 8), 100 / 255)
    assert torch.isinf(psnr(gt + 0.3 / 255, gt))  # below half a level: the same 8-bit image
    assert torch.isfinite(psnr(gt + 0.3 / 255, gt, quantize=False))


def test_y_conversion_values() -> None:
    rgb = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    y = rgb_to_y(rgb.T.reshape(1, 3, 1, 5).double()).flatten()
    torch.testing.assert_close(y, torch.tensor([16.0, 235.0, 16 + 65.481, 16 + 128.553, 16 + 24.966],
                                               dtype=torch.float64))


def test_ssim_equal_is_one(generator: torch.Generator) -> None:
    x = torch.rand(2, 3, 24, 24, generator=generator)
    torch.testing.assert_close(ssim(x, x.clone()), torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(ssim(x, x.clone(), 2, y_channel=True), torch.ones(2, dtype=torch.float64))


def _reference_ssim_channel(a: list[list[float]], b: list[list[float]]) -> float:
    """Wang et al.'s SSIM with an 11x11 Gaussian (sigma 1.5), 'valid' positions, in plain Python."""
    g = [math.exp(-((i - 5) ** 2) / (2 * 1.5**2)) for i in range(11)]
    total = sum(g)
    g = [v / total for v in g]
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    h, w = len(a), len(a[0])
    values = []
    for i in range(h - 10):
        for j in range(w - 10):
            mx = my = sxx = syy = sxy = 0.0
            for u in range(11):
                for v in range(11):
                    k = g[u] * g[v]
                    x, y = a[i + u][j + v], b[i + u][j + v]
                    mx += k * x
                    my += k * y
                    sxx += k * x * x
                    syy += k * y * y
                    sxy += k * x * y
            sxx, syy, sxy = sxx - mx * mx, syy - my * my, sxy - mx * my
            values.append(((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2)))
    return sum(values) / len(values)


def test_ssim_matches_independent_reference(generator: torch.Generator) -> None:
    gt = _grid(generator, (1, 3, 15, 14))
    noise = torch.randint(-30, 31, gt.shape, generator=generator).double() / 255
    sr = (gt + noise).clamp(0, 1)
    expected = sum(
        _reference_ssim_channel((sr[0, c] * 255).tolist(), (gt[0, c] * 255).tolist()) for c in range(3)
    ) / 3
    torch.testing.assert_close(ssim(sr, gt), torch.tensor([expected], dtype=torch.float64))
    # Y channel: the reference on the unrounded BT.601 luma of the cropped images.
    y_sr, y_gt = rgb_to_y(sr[..., 1:-1, 1:-1]), rgb_to_y(gt[..., 1:-1, 1:-1])
    expected_y = _reference_ssim_channel(y_sr[0, 0].tolist(), y_gt[0, 0].tolist())
    torch.testing.assert_close(ssim(sr, gt, 1, y_channel=True), torch.tensor([expected_y], dtype=torch.float64))


def test_batch_entries_are_independent(generator: torch.Generator) -> None:
    gt = _grid(generator, (3, 3, 16, 16))
    sr = (gt + torch.rand(gt.shape, generator=generator).double() * 0.1).clamp(0, 1)
    batched_p, batched_s = psnr(sr, gt, 1, True), ssim(sr, gt, 1, True)
    for i in range(3):
        torch.testing.assert_close(batched_p[i:i + 1], psnr(sr[i:i + 1], gt[i:i + 1], 1, True))
        torch.testing.assert_close(batched_s[i:i + 1], ssim(sr[i:i + 1], gt[i:i + 1], 1, True))


def test_bad_shapes_raise() -> None:
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 9))
    with pytest.raises(ValueError, match="11x11"):
        ssim(torch.zeros(1, 3, 12, 12), torch.zeros(1, 3, 12, 12), crop_border=2)


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """A Gaussian blur (reflect padding), the loss of fine texture a restoration can show."""
    coords = torch.arange(-6.0, 7.0, dtype=x.dtype)
    kernel = torch.exp(-(coords**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    window = (kernel[:, None] * kernel[None, :]).expand(x.shape[1], 1, 13, 13)
    return torch.nn.functional.conv2d(torch.nn.functional.pad(x, (6, 6, 6, 6), mode="reflect"), window,
                                      groups=x.shape[1])


def _texture(generator: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    """Fine random texture in [0.15, 0.75]: room for a brightness shift without clipping."""
    return 0.15 + 0.6 * _blur(torch.rand(shape, generator=generator, dtype=torch.float64), 0.7)


def test_vif_core_reproduces_torchmetrics_documented_values() -> None:
    # The example in torchmetrics' `visual_information_fidelity` docstring, on raw (not 0-1) values.
    preds = torch.randn(4, 3, 41, 41, generator=torch.Generator().manual_seed(42))
    target = torch.randn(4, 3, 41, 41, generator=torch.Generator().manual_seed(43))
    sums = metrics._vif_sums(preds.double(), target.double(), None, None)
    torch.testing.assert_close((sums[0] / sums[1]).mean(dim=1).float(), torch.tensor([0.0040, 0.0049, 0.0017, 0.0039]),
                               atol=5e-5, rtol=0)


def test_vif_equals_torchmetrics_whole_and_in_tiles(generator: torch.Generator,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiles of any size (rounded to multiples of 8) give torchmetrics' whole-image value, on Y and on RGB."""
    from torchmetrics.functional.image import visual_information_fidelity

    gt = _texture(generator, (1, 3, 59, 50))
    sr = (gt + 0.05 * torch.randn(gt.shape, generator=generator, dtype=torch.float64)).clamp(0, 1)
    rounded = [torch.round(x[..., 2:-2, 2:-2] * 255) / 255 for x in (sr, gt)]
    reference_y = visual_information_fidelity(*(rgb_to_y(x) for x in rounded), reduction="none")
    reference_rgb = visual_information_fidelity(*(x * 255 for x in rounded), reduction="none")
    for tile in (512, 9, 16, 40):
        monkeypatch.setattr(metrics, "METRIC_TILE", tile)
        torch.testing.assert_close(vif(sr, gt, 2, y_channel=True), reference_y, atol=1e-12, rtol=0)
        torch.testing.assert_close(vif(sr, gt, 2), reference_rgb, atol=1e-12, rtol=0)


def test_vif_equal_images_score_one_and_small_images_nan(generator: torch.Generator) -> None:
    x = _texture(generator, (2, 3, 48, 50))
    torch.testing.assert_close(vif(x, x.clone(), 2, y_channel=True), torch.ones(2, dtype=torch.float64))
    side = VIF_MIN_SIZE + 3  # one pixel short after cropping 2 from each side
    small = _texture(generator, (1, 3, side, 60))
    assert torch.isnan(vif(small, small, 2, y_channel=True)).all()
    assert torch.isfinite(vif(small, small, 1, y_channel=True)).all()


def test_vif_penalises_lost_texture_more_than_a_brightness_shift(generator: torch.Generator) -> None:
    """What makes VIF texture-sensitive: PSNR calls a uniform 10-level shift worse than a blur, VIF the reverse."""
    gt = _texture(generator, (2, 3, 64, 64))
    blurred, more_blurred = _blur(gt, 1.0), _blur(gt, 2.0)
    shifted = gt + 10 / 255
    assert (psnr_y(shifted, gt, 2) < psnr_y(blurred, gt, 2)).all()
    vif_blur, vif_shift = vif(blurred, gt, 2, y_channel=True), vif(shifted, gt, 2, y_channel=True)
    assert (vif_shift > 0.99).all()  # only 8-bit rounding differs: the same local detail, brighter
    assert (vif_blur < 0.5).all() and (vif(more_blurred, gt, 2, y_channel=True) < vif_blur).all()


def test_vif_batch_entries_are_independent(generator: torch.Generator) -> None:
    gt = _texture(generator, (3, 3, 45, 47))
    sr = _blur(gt, 0.8)
    batched = vif(sr, gt, 1, y_channel=True)
    for i in range(3):
        torch.testing.assert_close(batched[i:i + 1], vif(sr[i:i + 1], gt[i:i + 1], 1, y_channel=True))


@pytest.mark.gpu
def test_cuda_matches_cpu(generator: torch.Generator) -> None:
    gt = _grid(generator, (2, 3, 32, 32))
    sr = (gt + torch.rand(gt.shape, generator=generator).double() * 0.1).clamp(0, 1)
    torch.testing.assert_close(psnr(sr.cuda(), gt.cuda(), 2, True).cpu(), psnr(sr, gt, 2, True))
    torch.testing.assert_close(ssim(sr.cuda(), gt.cuda(), 2, True).cpu(), ssim(sr, gt, 2, True))
    big = torch.nn.functional.interpolate(sr, size=(48, 48)), torch.nn.functional.interpolate(gt, size=(48, 48))
    torch.testing.assert_close(vif(*(x.cuda() for x in big), 2, True).cpu(), vif(*big, 2, True))
