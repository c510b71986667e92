"""TextureFeatures: names, shapes, window_features == forward on crops, reference values, invariances."""

from __future__ import annotations

import math

import pytest
import torch

from xswinir.texture import TextureFeatures


@pytest.fixture(scope="module")
def features() -> TextureFeatures:
    return TextureFeatures(scales=(1, 2, 4), num_orientations=4)


def _index(features: TextureFeatures, name: str) -> int:
    return features.feature_names.index(name)


def test_names_match_the_feature_vector(features, generator):
    names = features.feature_names
    out = features(torch.rand(3, 3, 16, 16, generator=generator))
    assert out.shape == (3, len(names)) == (3, features.num_features)
    assert len(set(names)) == len(names)
    assert 30 <= len(names) <= 80
    assert "grad_energy_s2_o45_mean" in names and "lbp_nonuniform" in names
    assert len(TextureFeatures(scales=(1, 2), num_orientations=6).feature_names) == 2 * 2 * 6 + 16 + 16
    assert len(TextureFeatures(layout_grid=0).feature_names) == 2 * 3 * 4 + 16


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize(("size", "stride"), [((40, 37), 3), ((32, 32), 16)])
def test_window_features_equal_forward_on_each_window(features, generator, channels, size, stride):
    p = 16
    images = torch.rand(2, channels, *size, generator=generator)
    windows = features.window_features(images, p, stride)
    nh, nw = (size[0] - p) // stride + 1, (size[1] - p) // stride + 1
    assert windows.shape == (2, features.num_features, nh, nw)
    crops = torch.stack([images[..., i * stride:i * stride + p, j * stride:j * stride + p]
                         for i in range(nh) for j in range(nw)], dim=1).flatten(0, 1)  # (2 * nh * nw, C, p, p)
    expected = features(crops).view(2, nh, nw, -1).permute(0, 3, 1, 2)
    torch.testing.assert_close(windows, expected, atol=1e-5, rtol=1e-4)


def test_gray_input_has_zero_colour_and_equals_gray_rgb(features, generator):
    gray = torch.rand(4, 1, 16, 16, generator=generator)
    f_gray = features(gray)
    f_rgb = features(gray.expand(-1, 3, -1, -1))
    colour = [i for i, n in enumerate(features.feature_names) if n.startswith("chroma")]
    assert len(colour) == 2
    assert torch.all(f_gray[:, colour] == 0)
    torch.testing.assert_close(f_rgb, f_gray, atol=1e-5, rtol=1e-4)
    stripes = torch.zeros(1, 3, 16, 16)
    stripes[:, 0, :, ::2] = 0.8  # red and black columns: colour varies inside the window
    assert features(stripes)[0, _index(features, "chroma_cr_std")] > 0.1


def test_no_feature_sees_mean_brightness_or_colour(features, generator):
    # A texture is the same texture in shade and in light, and under a colour cast.
    x = 0.2 + 0.5 * torch.rand(3, 3, 24, 24, generator=generator)
    brighter = features(x + 0.2)
    tinted = features(x + torch.tensor([0.1, -0.05, 0.0])[:, None, None])
    torch.testing.assert_close(brighter, features(x), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(tinted, features(x), atol=1e-4, rtol=1e-4)


def test_layout_cells_say_where_the_window_is_bright(features):
    # Bright top-left quarter: cell (0, 0) is far above the window mean, cell (3, 3) below it.
    x = torch.zeros(1, 1, 16, 16)
    x[..., :8, :8] = 1.0
    out = features(x)[0]
    assert out[_index(features, "layout_r0c0")] > 1.0 and out[_index(features, "layout_r3c3")] < -0.5
    flipped = features(x.flip(-1))[0]
    assert flipped[_index(features, "layout_r0c3")] == pytest.approx(out[_index(features, "layout_r0c0")].item())
    assert out[_index(features, "ramp_x_mean")] < 0 and out[_index(features, "ramp_y_mean")] < 0


def test_ramp_gives_its_slope_per_orientation(features):
    """A unit-normalised derivative filter answers a ramp I = a x with a*cos(theta), independent of scale."""
    slope = 0.02
    x = torch.arange(24, dtype=torch.float32) * slope
    ramp = x.expand(1, 1, 24, 24).clone()
    out = features(ramp)[0]
    for s in (1, 2, 4):
        for degrees in (0, 45, 90, 135):
            expected = abs(slope * math.cos(math.radians(degrees)))
            assert out[_index(features, f"grad_energy_s{s}_o{degrees}_mean")].item() == pytest.approx(
                expected, abs=1e-5)
            assert out[_index(features, f"grad_energy_s{s}_o{degrees}_std")].item() == pytest.approx(0, abs=1e-3)
    assert out[_index(features, "contrast_laplacian_mean")].item() == pytest.approx(0, abs=1e-5)
    assert out[_index(features, "ramp_x_mean")].item() == pytest.approx(slope, abs=1e-5)
    assert out[_index(features, "ramp_y_mean")].item() == pytest.approx(0, abs=1e-5)
    assert out[_index(features, "luma_std")].item() == pytest.approx(x.std(unbiased=False).item(), abs=1e-4)


def test_lbp_histogram_sums_to_one_and_is_rotation_invariant(features, generator):
    patches = torch.rand(5, 3, 16, 16, generator=generator)
    lbp = [i for i, n in enumerate(features.feature_names) if n.startswith("lbp_")]
    f = features(patches)
    f_rot = features(torch.rot90(patches, 1, dims=(-2, -1)))
    torch.testing.assert_close(f[:, lbp].sum(1), torch.ones(5))
    torch.testing.assert_close(f_rot[:, lbp], f[:, lbp])
    # A quarter turn swaps the 0 and 90 degree filter responses.
    for s in (1, 2, 4):
        torch.testing.assert_close(f_rot[:, _index(features, f"grad_energy_s{s}_o90_mean")],
                                   f[:, _index(features, f"grad_energy_s{s}_o0_mean")], atol=1e-5, rtol=1e-4)
    flat = features(torch.full((1, 3, 16, 16), 0.5))[0]
    assert flat[_index(features, "lbp_ones0")] == 1.0  # no neighbour brighter than the threshold


def test_gradients_reach_the_input(features, generator):
    patches = torch.rand(2, 3, 16, 16, generator=generator, requires_grad=True)
    features(patches).sum().backward()
    assert patches.grad is not None and torch.isfinite(patches.grad).all() and patches.grad.abs().sum() > 0
    flat = torch.full((1, 3, 16, 16), 0.3, requires_grad=True)
    features(flat).sum().backward()
    assert torch.isfinite(flat.grad).all()


def test_too_small_windows_raise(features):
    with pytest.raises(ValueError, match="smaller"):
        features(torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="smaller"):
        features.window_features(torch.rand(1, 3, 12, 40), 16, 4)
    with pytest.raises(ValueError, match="1 or 3"):
        features(torch.rand(1, 2, 16, 16))


@pytest.mark.gpu
def test_cuda_matches_cpu(features, generator):
    images = torch.rand(2, 3, 40, 40, generator=generator)
    expected = features.window_features(images, 16, 4)
    got = features.to("cuda").window_features(images.cuda(), 16, 4).cpu()
    features.to("cpu")
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-3)
