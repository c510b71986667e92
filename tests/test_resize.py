"""MATLAB-exact bicubic: the official Set5 LR images bit for bit, batching, up-scaling, modcrop."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from xswinir.images import read_image
from xswinir.resize import imresize, modcrop

SET5 = ("baby", "bird", "butterfly", "head", "woman")


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_reproduces_official_set5_lr(shared_data: Path, scale: int) -> None:
    matching = total = 0
    for name in SET5:
        hr = modcrop(read_image(shared_data / "Set5" / "HR" / f"{name}.png"), scale)
        official = read_image(shared_data / "Set5" / "LR_bicubic" / f"X{scale}" / f"{name}x{scale}.png")
        lq = imresize(hr, 1 / scale, round_intermediate=True)
        assert lq.shape == official.shape
        levels, official_levels = torch.round(lq * 255), torch.round(official * 255)
        matching += int((levels == official_levels).sum())
        total += levels.numel()
    # Measured: 100% of the pixels at x2, x3 and x4.
    assert matching == total, f"x{scale}: {matching / total:.4%} of pixels match"


def test_batched_equals_single_and_3d_input(generator: torch.Generator) -> None:
    x = torch.randint(0, 256, (3, 3, 23, 17), generator=generator).float() / 255
    batched = imresize(x, 0.5, round_intermediate=True)
    assert batched.shape == (3, 3, 12, 9)  # ceil(23 / 2), ceil(17 / 2) as MATLAB
    for i in range(3):
        torch.testing.assert_close(imresize(x[i], 0.5, round_intermediate=True), batched[i])


def test_upscaling_shape_and_exactness(generator: torch.Generator) -> None:
    x = torch.rand(2, 3, 7, 9, generator=generator)
    up = imresize(x, 3)
    assert up.shape == (2, 3, 21, 27)
    # Without antialiasing at integer up-scaling, the cubic kernel interpolates: every 3rd output pixel,
    # offset by 1 (the centre of each 3x3 block), is an input pixel.
    torch.testing.assert_close(up[..., 1::3, 1::3], x, atol=1e-6, rtol=0)
    constant = torch.full((1, 1, 5, 6), 0.3)
    torch.testing.assert_close(imresize(constant, 4), torch.full((1, 1, 20, 24), 0.3))
    torch.testing.assert_close(imresize(constant, 0.25), torch.full((1, 1, 2, 2), 0.3))


def test_round_intermediate_stays_on_8_bit_grid(generator: torch.Generator) -> None:
    x = torch.randint(0, 256, (1, 3, 12, 12), generator=generator).float() / 255
    for scale in (0.5, 2.0):
        y = imresize(x, scale, round_intermediate=True)
        torch.testing.assert_close(y * 255, torch.round(y * 255), atol=1e-4, rtol=0)
        assert y.min() >= 0 and y.max() <= 1
    assert imresize(x, 2.0).dtype == torch.float32


def test_size_argument(generator: torch.Generator) -> None:
    x = torch.rand(2, 3, 64, 48, generator=generator)
    torch.testing.assert_close(imresize(x, size=(16, 12)), imresize(x, 0.25))
    torch.testing.assert_close(imresize(x, size=(64, 48)), x)  # scale 1: the cubic kernel interpolates
    # Per-axis scales: halving only the height is the transpose of halving only the width.
    out = imresize(x, size=(32, 48))
    assert out.shape == (2, 3, 32, 48)
    torch.testing.assert_close(out, imresize(x.transpose(-2, -1), size=(48, 32)).transpose(-2, -1))
    with pytest.raises(ValueError, match="exactly one"):
        imresize(x, 0.5, size=(32, 24))


def test_modcrop() -> None:
    x = torch.zeros(2, 3, 17, 14)
    assert modcrop(x, 4).shape == (2, 3, 16, 12)
    assert modcrop(x[0], 3).shape == (3, 15, 12)


@pytest.mark.gpu
def test_cuda_matches_cpu(generator: torch.Generator) -> None:
    x = torch.randint(0, 256, (2, 3, 30, 24), generator=generator).float() / 255
    for scale in (1 / 3, 2):
        torch.testing.assert_close(imresize(x.cuda(), scale, True).cpu(), imresize(x, scale, True))
        torch.testing.assert_close(imresize(x.cuda(), scale).cpu(), imresize(x, scale), atol=1e-5, rtol=0)
