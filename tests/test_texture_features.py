"""TextureFeatures: names, shapes, window_features == forward on crops, reference values, invariances; the pair
features (named, symmetric, bounded, what each one sees)."""

from __future__ import annotations

import math

import pytest
import torch

from xswinir.texture import TextureFeatures


@pytest.fixture(scope="module")
def features() -> TextureFeatures:
    return TextureFeatures(scales=(1, 2, 4), num_orientations=4)


@pytest.fixture(scope="module")
def paired() -> TextureFeatures:
    """The features the trained classifier uses: named features, then each window's descriptor."""
    return TextureFeatures(scales=(1, 2, 4), num_orientations=4, pair_features=True)


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


@pytest.mark.parametrize("with_pairs", [False, True])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize(("size", "stride"), [((40, 37), 3), ((32, 32), 16)])
def test_window_features_equal_forward_on_each_window(features, paired, generator, channels, size, stride,
                                                      with_pairs):
    p = 16
    features = paired if with_pairs else features
    images = torch.rand(2, channels, *size, generator=generator)
    windows = features.window_features(images, p, stride)
    nh, nw = (size[0] - p) // stride + 1, (size[1] - p) // stride + 1
    assert windows.shape == (2, features.num_features + features.descriptor_size((p, p)), nh, nw)
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


def _avg_pool_reference(x: torch.Tensor, kernel: tuple[int, int], stride: int) -> torch.Tensor:
    """The separable window means as F.avg_pool2d computes them: what _pool's strided slices reproduce."""
    x = torch.nn.functional.avg_pool2d(x, kernel_size=(kernel[0], 1), stride=(stride, 1))
    return torch.nn.functional.avg_pool2d(x, kernel_size=(1, kernel[1]), stride=(1, stride))


@pytest.mark.parametrize(("size", "kernel", "stride"), [((126, 126), (14, 14), 4), ((40, 37), (12, 9), 3),
                                                         ((33, 50), (16, 16), 1), ((64, 64), (14, 14), 16)])
def test_window_means_equal_avg_pool_bit_for_bit(generator, size, kernel, stride):
    from xswinir.texture.features import _pool

    # Maps of every magnitude, as the filter energies and their squares are; the sums must round alike.
    maps = torch.rand(2, 5, *size, generator=generator) * torch.randn(2, 5, *size, generator=generator).mul(3).exp()
    assert torch.equal(_pool(maps, kernel, stride), _avg_pool_reference(maps, kernel, stride))


@pytest.mark.parametrize("channels", [1, 3])
def test_descriptor_written_in_place_equals_the_concatenated_one(paired, generator, channels):
    # Without a gradient the descriptor is written into the feature tensor; with one it is concatenated. Both
    # hold each window's pixels centred per channel (F.unfold's layout), bit for bit.
    from torch.nn.functional import unfold

    images = torch.rand(2, channels, 45, 38, generator=generator)
    with torch.no_grad():
        in_place = paired.window_features(images, 16, 4)
    concatenated = paired.window_features(images.clone().requires_grad_(), 16, 4).detach()
    assert torch.equal(in_place, concatenated)
    num, (nh, nw) = paired.num_features, in_place.shape[-2:]
    cols = unfold(images.expand(-1, 3, -1, -1), 16, stride=4).unflatten(1, (3, -1))  # (B, 3, 256, nh * nw)
    centred = (cols - cols.mean(2, keepdim=True)).flatten(1, 2).unflatten(-1, (nh, nw))
    assert torch.equal(in_place[:, num:num + 3 * 256], centred)


def test_moved_copies_equal_padded_shifts(generator):
    from xswinir.texture.features import _moved_copies, _overlap, _shifts

    windows = torch.rand(2, 4, 3, 8, 8, generator=generator)
    shifts = _shifts(2)
    expected = torch.stack([torch.nn.functional.pad(_overlap(windows, -dy, -dx),
                                                    (max(0, dx), max(0, -dx), max(0, dy), max(0, -dy)))
                            for dy, dx in shifts], dim=-4)
    assert torch.equal(_moved_copies(windows, shifts), expected)
    assert torch.equal(_moved_copies(windows, shifts)[..., len(shifts) // 2, :, :, :], windows)  # (0, 0) in the middle


@pytest.mark.gpu
def test_cuda_matches_cpu(features, generator):
    images = torch.rand(2, 3, 40, 40, generator=generator)
    expected = features.window_features(images, 16, 4)
    got = features.to("cuda").window_features(images.cuda(), 16, 4).cpu()
    features.to("cpu")
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-3)


def _stripes(angle_degrees: float, period: float, phase: float, size: int = 16) -> torch.Tensor:
    """Gray sinusoidal stripes (1, 3, size, size) across the given direction."""
    y, x = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                          indexing="ij")
    theta = math.radians(angle_degrees)
    wave = 0.5 + 0.3 * torch.sin(2 * math.pi * (x * math.cos(theta) + y * math.sin(theta)) / period + phase)
    return wave.expand(1, 3, -1, -1).clone()


def _pairs(paired: TextureFeatures, a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
    values = paired.pair_features(paired(a), paired(b), tuple(a.shape[-2:]))
    return dict(zip(paired.pair_feature_names, values.unbind(-1), strict=True))


def test_pair_features_are_named_and_follow_the_named_features(features, paired, generator):
    assert paired.pair_feature_names == ["abs_ncc", "abs_ncc_best_shift", "orientation_agreement",
                                         "energy_agreement"]
    assert features.pair_feature_names == [] and features.descriptor_size((16, 16)) == 0
    assert paired.feature_names == features.feature_names  # the named features are the same ones
    patches = torch.rand(3, 3, 16, 16, generator=generator)
    out = paired(patches)
    assert out.shape == (3, paired.num_features + 3 * 16 * 16 + 8)
    torch.testing.assert_close(out[:, :paired.num_features], features(patches))
    named, pixels, histogram = paired.split(out, (16, 16))
    assert pixels.shape == (3, 3, 16, 16) and histogram.shape == (3, 8)
    torch.testing.assert_close(pixels.mean((-1, -2)), torch.zeros(3, 3), atol=1e-6, rtol=0)  # centred per channel
    torch.testing.assert_close(pixels, patches - patches.mean((-1, -2), keepdim=True))
    gray = torch.rand(2, 1, 16, 16, generator=generator)  # gray input gives gray RGB: vectors of one length
    torch.testing.assert_close(paired(gray), paired(gray.expand(-1, 3, -1, -1)), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="descriptor"):
        paired.split(out, (8, 8))


def test_pair_features_are_symmetric_and_bounded(paired, generator):
    fa = paired(torch.rand(6, 3, 16, 16, generator=generator))
    fb = paired(torch.rand(6, 3, 16, 16, generator=generator) ** 3)
    ab = paired.pair_features(fa, fb, (16, 16))
    assert ab.shape == (6, 4)
    assert torch.equal(ab, paired.pair_features(fb, fa, (16, 16)))  # exactly: the same products, in the same order
    assert (ab >= 0).all() and (ab <= 1 + 1e-6).all()
    # The best shift includes the zero shift.
    assert (ab[:, 1] >= ab[:, 0]).all()
    # Arbitrary vectors (not features of real windows) stay within [-1, 1] and symmetric too.
    ra, rb = torch.randn(2, 4, 5, fa.shape[-1], generator=generator)
    values = paired.pair_features(ra, rb, (16, 16))
    assert values.abs().max() <= 1 + 1e-6 and torch.equal(values, paired.pair_features(rb, ra, (16, 16)))


def test_outer_pair_features_equal_the_broadcast(paired, generator):
    fa = paired(torch.rand(5, 3, 16, 16, generator=generator))
    fb = paired(torch.rand(7, 3, 16, 16, generator=generator))
    broadcast = paired.pair_features(fa[:, None], fb[None], (16, 16))
    outer = paired.outer_pair_features(fa, fb, (16, 16))
    assert outer.shape == (5, 7, 4)
    torch.testing.assert_close(outer, broadcast, atol=1e-5, rtol=1e-5)
    batched = paired.outer_pair_features(fa.expand(2, -1, -1), fb[None], (16, 16))  # leading dims broadcast
    torch.testing.assert_close(batched[1], broadcast, atol=1e-5, rtol=1e-5)


def test_a_window_agrees_with_itself_and_ignores_brightness_and_contrast(paired, generator):
    a = 0.2 + 0.5 * torch.rand(2, 3, 16, 16, generator=generator)
    same = paired.pair_features(paired(a), paired(a), (16, 16))
    torch.testing.assert_close(same, torch.ones(2, 4), atol=1e-5, rtol=0)
    brighter = paired.pair_features(paired(a), paired(0.5 * (a - 0.45) + 0.6), (16, 16))
    torch.testing.assert_close(brighter, torch.ones(2, 4), atol=1e-4, rtol=0)


def test_best_shift_finds_a_displaced_copy(paired, generator):
    # Noise and the same noise moved by (1, 2) px: no correlation in place, almost all of it after the shift.
    image = torch.rand(1, 3, 24, 24, generator=generator)
    values = _pairs(paired, image[..., 4:20, 4:20], image[..., 5:21, 6:22])
    assert values["abs_ncc"] < 0.2
    # The overlap after the shift is 15 x 14 of the 16 x 16 pixels of each window.
    assert values["abs_ncc_best_shift"] > 0.7
    assert _pairs(paired, image[..., 4:20, 4:20], image[..., 4:20, 7:23])["abs_ncc_best_shift"] < 0.3  # 3 px: beyond


def test_orientation_and_energy_agreement_see_structure_without_pixel_correspondence(paired):
    vertical = _stripes(0, 5.0, 0.0)
    vertical_moved = _stripes(0, 5.0, 1.3)  # the same stripes, out of phase: no pixel correspondence
    horizontal = _stripes(90, 5.0, 0.0)
    coarse = _stripes(0, 14.0, 0.0)  # the same direction, another scale
    moved = _pairs(paired, vertical, vertical_moved)
    turned = _pairs(paired, vertical, horizontal)
    assert moved["orientation_agreement"] > 0.95 and turned["orientation_agreement"] < 0.2
    assert moved["energy_agreement"] > 0.95 and turned["energy_agreement"] < moved["energy_agreement"] - 0.3
    assert _pairs(paired, vertical, coarse)["energy_agreement"] < moved["energy_agreement"] - 0.05
    assert _pairs(paired, vertical, coarse)["orientation_agreement"] > 0.9  # one direction, whatever the scale


def test_flat_windows_agree_with_nothing(paired, generator):
    flat = torch.full((1, 3, 16, 16), 0.4) + 0.001 * torch.rand(1, 3, 16, 16, generator=generator)
    textured = torch.rand(1, 3, 16, 16, generator=generator)
    values = paired.pair_features(paired(flat), paired(textured), (16, 16))[0]
    assert values.max() < 0.3  # sensor noise in a flat window is no structure


def test_abs_ncc_is_the_share_one_window_explains_in_the_fit(paired, generator):
    # The fit centres each channel and finds c = argmin ||a - c b||: r² = cos²(a, b), colour included.
    a, b = torch.rand(2, 4, 3, 16, 16, generator=generator)
    b = b + 0.5 * a  # some correlation
    ac, bc = (x - x.mean((-1, -2), keepdim=True) for x in (a, b))
    cosine = (ac * bc).sum((-1, -2, -3)) / (ac.flatten(1).norm(dim=1) * bc.flatten(1).norm(dim=1))
    torch.testing.assert_close(paired.pair_features(paired(a), paired(b), (16, 16))[:, 0], cosine.abs())


def test_pair_features_pass_gradients_to_both_windows(paired, generator):
    a = torch.rand(2, 3, 16, 16, generator=generator, requires_grad=True)
    b = torch.rand(2, 3, 16, 16, generator=generator, requires_grad=True)
    paired.pair_features(paired(a), paired(b), (16, 16)).sum().backward()
    for x in (a, b):
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
