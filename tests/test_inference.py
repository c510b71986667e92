"""Tiled inference equals the untiled run for a local model, stays close for SwinIR; x8 self-ensemble."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from xswinir.inference import bicubic_upscale, restore
from xswinir.resize import imresize


class LocalNet(nn.Module):
    """Two 3x3 convs and a pixel shuffle: each output depends on LR pixels at most 2 away."""

    def __init__(self, scale: int = 2, window_size: int = 4) -> None:
        super().__init__()
        self.window_size = window_size
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3 * scale**2, 3, padding=1),
                                  nn.PixelShuffle(scale))
        self.seen: list[tuple[int, int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(tuple(x.shape[-2:]))
        return self.body(x)


@pytest.fixture
def local_net() -> LocalNet:
    torch.manual_seed(0)
    return LocalNet().eval()


@pytest.mark.parametrize("size", [(37, 29), (16, 70)])
def test_tiled_equals_untiled_for_local_model(local_net: LocalNet, generator: torch.Generator,
                                              size: tuple[int, int]) -> None:
    lq = torch.rand(2, 3, *size, generator=generator)
    full = restore(local_net, lq)
    local_net.seen.clear()
    # overlap 8: the blend ignores 8 / 4 = 2 LR pixels at each inner tile edge, the receptive radius.
    tiled = restore(local_net, lq, tile=18, overlap=8)
    assert tiled.shape == (2, 3, size[0] * 2, size[1] * 2)
    torch.testing.assert_close(tiled, full, atol=1e-6, rtol=1e-6)
    # Tiles are rounded down to the window (18 -> 16) and memory stays bounded by them: the last tile of a
    # row or column may be up to window - 1 longer, so that every tile starts on the window grid.
    assert len(local_net.seen) > 1
    assert all(h < 16 + 4 and w < 16 + 4 for h, w in local_net.seen)
    assert (16, 16) in local_net.seen


def test_too_small_overlap_differs_at_seams(local_net: LocalNet, generator: torch.Generator) -> None:
    lq = torch.rand(1, 3, 32, 32, generator=generator)
    full = restore(local_net, lq)
    tiled = restore(local_net, lq, tile=12, overlap=0)
    assert (tiled - full).abs().max() > 1e-3  # the test above could fail: cut context shows


def test_3d_input_and_large_tile(local_net: LocalNet, generator: torch.Generator) -> None:
    lq = torch.rand(3, 10, 11, generator=generator)
    out = restore(local_net, lq, tile=64)
    assert out.shape == (3, 20, 22)
    torch.testing.assert_close(out, restore(local_net, lq[None])[0])
    assert not out.requires_grad


def _dihedral_reference(model: nn.Module, lq: torch.Tensor) -> torch.Tensor:
    """The x8 ensemble written with rot90: 4 rotations, each with and without a horizontal flip."""
    outs = []
    with torch.no_grad():
        for flip in (False, True):
            x = lq.flip(-1) if flip else lq
            for k in range(4):
                y = torch.rot90(model(torch.rot90(x, k, (-2, -1))), -k, (-2, -1))
                outs.append(y.flip(-1) if flip else y)
    return torch.stack(outs).mean(0)


def test_self_ensemble_matches_rot90_reference(local_net: LocalNet, generator: torch.Generator) -> None:
    lq = torch.rand(2, 3, 20, 23, generator=generator)
    expected = _dihedral_reference(local_net, lq)
    torch.testing.assert_close(restore(local_net, lq, self_ensemble=True), expected)
    torch.testing.assert_close(restore(local_net, lq, tile=16, overlap=8, self_ensemble=True), expected,
                               atol=1e-6, rtol=1e-6)
    assert (restore(local_net, lq) - expected).abs().max() > 1e-4


def test_self_ensemble_of_equivariant_model_is_unchanged(generator: torch.Generator) -> None:
    model = nn.Upsample(scale_factor=2, mode="nearest")
    lq = torch.rand(1, 3, 9, 13, generator=generator)
    torch.testing.assert_close(restore(model, lq, self_ensemble=True), restore(model, lq))


def test_bicubic_upscale(generator: torch.Generator) -> None:
    lq = torch.randint(0, 256, (2, 3, 8, 10), generator=generator).float() / 255
    up = bicubic_upscale(lq, 3)
    assert up.shape == (2, 3, 24, 30)
    torch.testing.assert_close(up, imresize(lq, 3, round_intermediate=True))


@pytest.fixture
def tiny_swinir(tiny_config) -> nn.Module:
    from xswinir.model import build_swinir

    torch.manual_seed(0)
    return build_swinir(tiny_config().model).eval()


def test_tiled_swinir_close_to_untiled(tiny_swinir: nn.Module, generator: torch.Generator) -> None:
    lq = torch.rand(1, 3, 30, 26, generator=generator)
    full = restore(tiny_swinir, lq)  # untrained: outputs span about [-0.8, 1.8]
    small = (restore(tiny_swinir, lq, tile=16, overlap=8) - full).abs()
    large = (restore(tiny_swinir, lq, tile=24, overlap=12) - full).abs()
    assert small.shape == (1, 3, 60, 52)
    # Measured: mean 2.7e-3 / max 0.04, and mean 1.2e-4 / max 6.8e-3.
    assert small.mean() < 5e-3 and small.max() < 0.1
    assert large.mean() < 5e-4 and large.max() < 0.02
    assert large.mean() < small.mean()


@pytest.mark.gpu
def test_cuda_tiled_matches_cpu(local_net: LocalNet, generator: torch.Generator) -> None:
    lq = torch.rand(2, 3, 40, 33, generator=generator)
    cpu = restore(local_net, lq, tile=16, overlap=8, self_ensemble=True)
    gpu = restore(local_net.cuda(), lq.cuda(), tile=16, overlap=8, self_ensemble=True)
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_tiled_bicubic_resizes_equal_whole_image_ones(scale: int, generator: torch.Generator,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import xswinir.inference as inference

    monkeypatch.setattr(inference, "RESIZE_TILE", 8)  # 8-px LR tiles: many tiles, edges and margins in play
    lq = torch.randint(0, 256, (2, 3, 21, 30), generator=generator).float() / 255
    expected_up = imresize(lq, scale, round_intermediate=True)
    assert torch.equal(inference.bicubic_upscale(lq, scale), expected_up)
    assert torch.equal(inference.bicubic_upscale(lq[0], scale), expected_up[0])
    gt = torch.randint(0, 256, (3, 19 * scale, 26 * scale), generator=generator).float() / 255
    assert torch.equal(inference.bicubic_downscale(gt, scale), imresize(gt, 1 / scale, round_intermediate=True))
