"""CombinedLoss and the batched texture search."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from xswinir.config import Config, ConfigError, LossConfig, TextureConfig, apply_overrides
from xswinir.losses import CombinedLoss, build_loss, candidate_mask, solve_coefficients, texture_search


class _MeanStdFeatures(nn.Module):
    """Per-channel window mean and standard deviation: a transparent stand-in for the texture features."""

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.window_features(patches, patches.shape[-1], patches.shape[-1]).flatten(1)

    def window_features(self, images: torch.Tensor, patch_size: int, stride: int) -> torch.Tensor:
        mean = F.avg_pool2d(images, patch_size, stride)
        sq = F.avg_pool2d(images.square(), patch_size, stride)
        return torch.cat((mean, (sq - mean.square()).clamp_min(0).add(1e-6).sqrt()), dim=1)


class MeanStdClassifier(nn.Module):
    """A linear pair classifier on |fa - fb| with trainable weights, like the real one."""

    def __init__(self, patch_size: int, channels: int = 3) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.features = _MeanStdFeatures()
        self.weight = nn.Parameter(torch.full((2 * channels,), 20.0))
        self.bias = nn.Parameter(torch.tensor(3.0))

    def pair_logits(self, fa: torch.Tensor, fb: torch.Tensor) -> torch.Tensor:
        return self.bias - ((fa - fb).abs() * self.weight).sum(-1)


def real_classifier(patch_size: int, sample: torch.Tensor) -> nn.Module:
    """The project's TextureClassifier with fixed weights ("differences speak against"), standardised on sample."""
    from xswinir.texture import TextureClassifier

    clf = TextureClassifier(patch_size, scales=(1, 2))
    with torch.no_grad():
        feats = clf.features.window_features(sample, patch_size, 4).flatten(2).transpose(1, 2).flatten(0, 1)
        std = feats.std(0)
        clf.feature_mean.copy_(feats.mean(0))
        clf.feature_std.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)))
        clf.weight_diff.fill_(-0.5)
        clf.bias.fill_(3.0)
    return clf.eval()


def make_classifier(kind: str, patch_size: int, sample: torch.Tensor) -> nn.Module:
    return MeanStdClassifier(patch_size) if kind == "double" else real_classifier(patch_size, sample)


def _iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of boxes (..., 4) top/left/bottom/right, written independently of candidate_mask."""
    h = (torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0])).clamp_min(0)
    w = (torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1])).clamp_min(0)
    inter = (h * w).float()
    area = lambda x: ((x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1])).float()  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def test_projection_is_exact_when_gt_lies_in_the_span(generator):
    # One 8 px tile; the only candidates are two windows A and B (everything else is marked invalid),
    # and gt = 0.5 A + 0.3 B, so X c* must reproduce gt and the term must vanish.
    p = 8
    region = torch.rand(1, 3, 48, 48, generator=generator)
    a, b = region[..., 0:8, 0:8], region[..., 0:8, 24:32]
    gt = 0.5 * a + 0.3 * b
    region[..., 32:40, 16:24] = gt
    valid = torch.zeros(1, 1, 48, 48, dtype=torch.bool)
    valid[..., 0:8, 0:8] = valid[..., 0:8, 24:32] = valid[..., 32:40, 16:24] = True
    offset = torch.tensor([[32, 16]])
    match = texture_search(MeanStdClassifier(p), gt, region, offset, valid, stride=4, top_k=5, min_score=0.0,
                           ridge=0.0)
    assert match.valid.sum().item() == 2
    chosen = {tuple(box.tolist()): c.item() for box, c, v in zip(match.boxes[0, 0], match.coefs[0, 0],
                                                               match.valid[0, 0], strict=True) if v}
    assert chosen.keys() == {(0, 0, 8, 8), (0, 24, 8, 32)}
    assert chosen[(0, 0, 8, 8)] == pytest.approx(0.5, abs=1e-4)
    assert chosen[(0, 24, 8, 32)] == pytest.approx(0.3, abs=1e-4)
    torch.testing.assert_close(match.target, gt, atol=1e-5, rtol=0)
    assert match.tile_r2[0, 0].item() == pytest.approx(1.0, abs=1e-5)

    loss = CombinedLoss(MeanStdClassifier(p), texture_weight=1.0, top_k=5, min_score=0.0, ridge=0.0)
    _, parts = loss(gt.clone(), gt, region, offset, valid)
    assert parts["texture"].item() == pytest.approx(0.0, abs=1e-5)
    assert parts["texture_underfilled"].item() == 1.0  # 2 of 5 windows


@pytest.mark.parametrize("kind", ["double", "real"])
def test_repeated_texture_is_reproduced_from_other_places(generator, kind):
    # A 16 px texture tiled 4 x 4: every tile has identical copies elsewhere, found by the classifier.
    tile = torch.rand(1, 3, 16, 16, generator=generator)
    gt = tile.repeat(1, 1, 4, 4)
    clf = make_classifier(kind, 16, gt)
    match = texture_search(clf, gt, stride=4, top_k=3, min_score=0.5, ridge=0.0)
    assert match.valid.all()
    torch.testing.assert_close(match.target, gt, atol=1e-4, rtol=0)
    assert (_iou(match.boxes, match.tile_boxes[:, :, None, :]) <= 0.1).all()


@pytest.mark.parametrize("max_iou", [0.0, 0.1, 0.5])
def test_the_targets_own_window_is_never_chosen(generator, max_iou):
    gt = torch.rand(2, 3, 32, 32, generator=generator)
    match = texture_search(MeanStdClassifier(8), gt, stride=2, top_k=5, min_score=0.0, max_iou=max_iou)
    iou = _iou(match.boxes, match.tile_boxes[:, :, None, :])  # (B, T, K)
    assert (iou[match.valid] <= max_iou + 1e-6).all()
    assert match.valid.all()


def test_without_exclusion_the_own_window_wins(generator):
    # The control for the test above: with no exclusion (max_iou = 1, which the config refuses) the tile's
    # own window scores best and is chosen, which is the collapse the exclusion prevents.
    gt = torch.rand(1, 3, 32, 32, generator=generator)
    match = texture_search(MeanStdClassifier(8), gt, stride=4, top_k=2, min_score=0.0, max_iou=1.0)
    assert torch.equal(match.boxes[:, :, 0], match.tile_boxes)


def test_candidate_mask_matches_box_iou():
    tile_tl = torch.tensor([[[4, 8], [0, 0]]])  # (1, 2 tiles, 2)
    allowed = candidate_mask(tile_tl, (24, 24), 8, 2, max_iou=0.2)
    tops, lefts = torch.meshgrid(torch.arange(9) * 2, torch.arange(9) * 2, indexing="ij")
    windows = torch.stack((tops, lefts, tops + 8, lefts + 8), -1).reshape(1, 1, 81, 4)
    tiles = torch.cat((tile_tl, tile_tl + 8), -1)[:, :, None, :]
    assert torch.equal(allowed, _iou(windows, tiles) <= 0.2)


def _projection_reference(match, e: torch.Tensor, p: int) -> torch.Tensor:
    """P_X e per tile written out: centre the tile per channel, least squares on the centred windows (ridge 0)."""
    B, C, H, W = e.shape
    out = torch.zeros(B, match.tiles[0] * match.tiles[1], C * p * p, dtype=torch.float64)
    for b in range(B):
        for t in range(out.shape[1]):
            ty, tx = divmod(t, match.tiles[1])
            y = e[b, :, ty * p:(ty + 1) * p, tx * p:(tx + 1) * p].double()
            y = (y - y.mean(dim=(1, 2), keepdim=True)).flatten()
            X = match.windows[b, t][:, match.valid[b, t]].double()
            c = torch.linalg.lstsq(X, y[:, None]).solution
            out[b, t] = (X @ c).squeeze(1)
    return out


@pytest.mark.parametrize("kind", ["double", "real"])
@pytest.mark.parametrize("form", ["projection", "pull"])
def test_gradients_reach_only_sr(generator, kind, form):
    gt = torch.rand(2, 3, 16, 16, generator=generator).requires_grad_()
    clf = make_classifier(kind, 8, gt.detach())
    clf.requires_grad_(True)
    region = F.pad(gt.detach(), (8, 8, 8, 8), mode="reflect").requires_grad_()
    offset = torch.full((2, 2), 8)
    match = texture_search(clf, gt, region, offset, stride=4, top_k=3, min_score=0.0)
    for t in (match.target, match.coefs, match.scores, match.windows, match.tile_r2):
        assert not t.requires_grad

    loss = CombinedLoss(clf, texture_weight=0.5, texture_form=form, top_k=3, min_score=0.0, ridge=0.0)
    assert not any(p.requires_grad for p in clf.parameters())
    sr = torch.rand(2, 3, 16, 16, generator=generator).requires_grad_()
    total, parts = loss(sr, gt.detach(), region, offset)
    total.backward()
    assert region.grad is None and gt.grad is None
    assert all(p.grad is None for p in clf.parameters())
    match = loss.search(gt.detach(), region.detach(), offset)
    if form == "pull":  # l1 + 0.5 * mean |sr - X c*|
        texture_grad = torch.sign(sr - match.target)
    else:  # l1 + 0.5 * mean |P e|: the gradient is P^T sign(P e) = P sign(P e), P symmetric
        projected = _projection_reference(match, (sr - gt).detach(), 8)
        back = _projection_reference(match, _untile_test(torch.sign(projected), 3, 8, 2, 2), 8)
        texture_grad = _untile_test(back, 3, 8, 2, 2)
    expected = torch.sign(sr - gt) / sr.numel() + 0.5 * texture_grad / sr.numel()
    torch.testing.assert_close(sr.grad, expected.detach().float(), atol=1e-6, rtol=1e-4)
    assert all(v.ndim == 0 and not v.requires_grad for v in parts.values())


def _untile_test(tiles: torch.Tensor, C: int, p: int, th: int, tw: int) -> torch.Tensor:
    """(B, T, C*p*p) tiles back to (B, C, th*p, tw*p), written independently of the library."""
    B = tiles.shape[0]
    out = torch.zeros(B, C, th * p, tw * p, dtype=tiles.dtype)
    for t in range(th * tw):
        ty, tx = divmod(t, tw)
        out[:, :, ty * p:(ty + 1) * p, tx * p:(tx + 1) * p] = tiles[:, t].reshape(B, C, p, p)
    return out


@pytest.mark.parametrize("kind", ["double", "real"])
@pytest.mark.parametrize("dist", ["l1", "l2", "charbonnier"])
def test_projection_term_is_consistent_its_minimum_is_at_gt(generator, kind, dist):
    # At sr = gt the term and its gradient vanish, whatever the chosen windows; the pull form does not.
    gt = torch.rand(2, 3, 32, 32, generator=generator)
    region = F.pad(gt, (16, 16, 16, 16), mode="reflect")
    offset = torch.full((2, 2), 16)
    clf = make_classifier(kind, 8, gt)
    loss = CombinedLoss(clf, texture_weight=1.0, texture_dist=dist, top_k=5, min_score=0.0)
    sr = gt.clone().requires_grad_()
    loss.texture_term(sr, gt, loss.search(gt, region, offset)).backward()
    assert loss.texture_term(gt, gt, loss.search(gt, region, offset)).item() == pytest.approx(0.0, abs=1e-7)
    assert sr.grad.abs().max().item() < 1e-7
    pull = CombinedLoss(clf, texture_weight=1.0, texture_form="pull", texture_dist=dist, top_k=5, min_score=0.0)
    assert pull.texture_term(gt, gt, pull.search(gt, region, offset)).item() > 1e-3  # the control


def test_a_step_on_the_projection_term_never_moves_away_from_gt(generator):
    # <grad, sr - gt> >= 0 for the l2 projection term: its descent direction never increases ||sr - gt||.
    gt = torch.rand(4, 3, 32, 32, generator=generator)
    region = F.pad(gt, (16, 16, 16, 16), mode="reflect")
    offset = torch.full((4, 2), 16)
    loss = CombinedLoss(MeanStdClassifier(8), texture_weight=1.0, texture_dist="l2", top_k=5, min_score=0.0)
    match = loss.search(gt, region, offset)
    sr = (gt + 0.2 * torch.randn(gt.shape, generator=generator)).requires_grad_()
    loss.texture_term(sr, gt, match).backward()
    per_tile = (sr.grad * (sr - gt).detach()).unfold(2, 8, 8).unfold(3, 8, 8).sum(dim=(1, 4, 5))
    assert (per_tile >= -1e-9).all() and per_tile.sum() > 0
    stepped = sr.detach() - 1.0 * sr.grad / sr.grad.abs().max() * 0.01
    assert (stepped - gt).norm() < (sr.detach() - gt).norm()


def test_query_decides_which_windows_are_chosen(generator):
    # Two candidate windows: one with gt's brightness, one with the query's; the mean-matching double picks
    # whichever its query tile resembles, and c* still fits gt.
    p = 8
    gt = torch.full((1, 3, 8, 8), 0.2) + 0.05 * torch.rand(1, 3, 8, 8, generator=generator)
    query = torch.full((1, 3, 8, 8), 0.8)
    region = torch.full((1, 3, 8, 32), 0.5)
    region[..., 0:8, 0:8] = gt
    region[..., 0:8, 8:16] = 0.2 + 0.05 * torch.rand(1, 3, 8, 8, generator=generator)
    region[..., 0:8, 24:32] = 0.8 + 0.05 * torch.rand(1, 3, 8, 8, generator=generator)
    offset = torch.zeros(1, 2, dtype=torch.long)
    own = texture_search(MeanStdClassifier(p), gt, region, offset, stride=8, top_k=1, min_score=0.0)
    assert own.boxes[0, 0, 0].tolist() == [0, 8, 8, 16]
    via_query = texture_search(MeanStdClassifier(p), gt, region, offset, query=query, stride=8, top_k=1,
                               min_score=0.0)
    assert via_query.boxes[0, 0, 0].tolist() == [0, 24, 8, 32]
    assert torch.equal(texture_search(MeanStdClassifier(p), gt, region, offset, query=gt, stride=8, top_k=1,
                                      min_score=0.0).boxes, own.boxes)
    with pytest.raises(ValueError, match="query"):
        texture_search(MeanStdClassifier(p), gt, region, offset, query=query[..., :4], stride=8)


def test_query_lq_needs_the_degraded_input_and_reports_diagnostics(generator):
    gt = torch.rand(2, 3, 32, 32, generator=generator)
    lq = F.avg_pool2d(gt, 2)
    loss = CombinedLoss(MeanStdClassifier(8), texture_weight=1.0, query="lq", min_score=0.0)
    with pytest.raises(ConfigError, match="lq"):
        loss(gt.clone(), gt)
    _, parts = loss(gt.clone(), gt, lq=lq)
    assert 0 < parts["texture_tiles_used"].item() <= 1
    assert 0 <= parts["texture_r2"].item() <= 1
    expected_bicubic = (F.interpolate(lq, size=(32, 32), mode="bicubic", align_corners=False).clamp(0, 1)
                        - gt).abs().mean()
    torch.testing.assert_close(parts["texture_bicubic_error"], expected_bicubic)
    assert parts["texture_fit_error"].item() > 0


@pytest.mark.parametrize("kind", ["double", "real"])
@pytest.mark.parametrize("p", [8, 16, 32])
@pytest.mark.parametrize("size", [32, 64])
def test_shapes_for_every_patch_size(generator, p, size, kind):
    B, K = 2, 5
    region = torch.rand(B, 3, size + 32, size + 16, generator=generator)
    offset = torch.tensor([[0, 16], [32, 0]])
    gt = torch.stack([region[i, :, o[0]:o[0] + size, o[1]:o[1] + size] for i, o in enumerate(offset.tolist())])
    match = texture_search(make_classifier(kind, p, region), gt, region, offset, stride=4, top_k=K, min_score=0.0)
    T = (size // p) ** 2
    assert match.target.shape == gt.shape and match.mask.shape == (B, 1, size, size)
    assert match.boxes.shape == (B, T, K, 4) and match.coefs.shape == (B, T, K)
    assert match.scores.shape == (B, T, K) and match.valid.shape == (B, T, K)
    assert match.tiles == (size // p, size // p)
    assert torch.isfinite(match.target).all() and torch.isfinite(match.coefs).all()
    assert ((match.boxes[..., 2:] - match.boxes[..., :2]) == p).all()
    assert (match.boxes[..., 2] <= region.shape[-2]).all() and (match.boxes[..., 3] <= region.shape[-1]).all()
    assert match.tile_r2.shape == (B, T) and ((match.tile_r2 >= 0) & (match.tile_r2 <= 1)).all()
    # Each chosen box really holds the pixels that went into X: rebuild one tile's X c* by hand, as the
    # tile's own per-channel mean plus the coefficients times the windows' deviations from their means.
    b, t = 1, T - 1
    ty, tx = divmod(t, size // p)
    tile = gt[b, :, ty * p:(ty + 1) * p, tx * p:(tx + 1) * p]
    cols = [region[b, :, y0:y1, x0:x1] for y0, x0, y1, x1 in match.boxes[b, t].tolist()]
    by_hand = tile.mean(dim=(1, 2), keepdim=True) + sum(
        (c - c.mean(dim=(1, 2), keepdim=True)) * w for c, w in zip(cols, match.coefs[b, t].tolist(), strict=True))
    torch.testing.assert_close(match.target[b, :, ty * p:(ty + 1) * p, tx * p:(tx + 1) * p], by_hand,
                               atol=1e-5, rtol=1e-5)


def test_fewer_candidates_than_k_are_padded_as_invalid(generator):
    # A 16 x 24 region has 3 windows at stride 4 (left 0, 4, 8); IoU with the tile: 1, 0.6, 0.33.
    gt = torch.rand(1, 3, 16, 16, generator=generator)
    region = F.pad(gt, (0, 8, 0, 0), mode="reflect")
    match = texture_search(MeanStdClassifier(16), gt, region, stride=4, top_k=5, min_score=0.0, max_iou=0.5)
    assert match.boxes.shape == (1, 1, 5, 4)
    assert match.valid[0, 0].tolist() == [True, False, False, False, False]
    assert match.boxes[0, 0, 0].tolist() == [0, 8, 16, 24]
    assert (match.coefs[~match.valid] == 0).all()


def test_a_tile_without_candidates_is_masked_out(generator):
    gt = torch.rand(1, 3, 16, 16, generator=generator)
    loss = CombinedLoss(MeanStdClassifier(16), texture_weight=1.0, min_score=0.0)
    sr = gt.clone().requires_grad_()
    total, parts = loss(sr, gt)  # the region is gt itself: its only window is the tile's own
    assert parts["texture"].item() == 0.0 and parts["texture_underfilled"].item() == 1.0
    assert torch.isfinite(total)
    total.backward()
    assert torch.isfinite(sr.grad).all()


def test_min_score_drops_dissimilar_windows(generator):
    # Left half noise, right half flat: flat tiles find flat windows only; noise tiles find few above 0.9.
    gt = torch.rand(1, 3, 32, 64, generator=generator)
    gt[..., 32:] = 0.5
    match = texture_search(MeanStdClassifier(16), gt, stride=4, top_k=5, min_score=0.9)
    assert (match.scores[match.valid] >= 0.9).all()
    assert not match.valid.all()
    flat = match.tile_boxes[0, :, 1] >= 32
    assert match.valid[0, flat].all()
    assert (match.boxes[0, flat][..., 1] >= 32).all()


def test_lambda_zero_is_exactly_the_pixel_loss(generator):
    sr = torch.rand(2, 3, 16, 16, generator=generator)
    gt = torch.rand(2, 3, 16, 16, generator=generator)
    cfg = apply_overrides(Config(), {"loss.texture_weight": 0.0})
    total, parts = build_loss(cfg, None)(sr, gt)
    assert torch.equal(total, F.l1_loss(sr, gt))
    assert parts["texture"].item() == 0.0


@pytest.mark.parametrize("kind", ["l1", "l2", "charbonnier"])
def test_texture_distances(generator, kind):
    gt = torch.rand(1, 3, 16, 16, generator=generator).repeat(1, 1, 2, 2)
    sr = (gt + 0.1).requires_grad_()
    loss = CombinedLoss(MeanStdClassifier(16), texture_weight=2.0, texture_form="pull", texture_dist=kind,
                        min_score=0.0, ridge=0.0)
    total, parts = loss(sr, gt)
    target = loss.search(gt).target
    d = sr.detach() - target
    expected = {"l1": d.abs(), "l2": d.square(), "charbonnier": (d.square() + 1e-6).sqrt()}[kind].mean()
    torch.testing.assert_close(parts["texture"], expected)
    torch.testing.assert_close(total.detach(), parts["pixel"] + 2.0 * expected)


def test_deterministic_for_a_fixed_seed():
    def run() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        g = torch.Generator().manual_seed(3)
        gt = torch.rand(2, 3, 32, 32, generator=g)
        sr = torch.rand(2, 3, 32, 32, generator=g)
        region = torch.rand(2, 3, 64, 64, generator=g)
        region[..., 16:48, 16:48] = gt
        return CombinedLoss(MeanStdClassifier(8), texture_weight=0.1)(sr, gt, region, torch.full((2, 2), 16))

    (a, pa), (b, pb) = run(), run()
    assert torch.equal(a, b)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


@pytest.mark.parametrize("value", [0.0, 0.5])
def test_flat_windows_give_finite_zero_coefficients(value):
    # Flat windows carry no structure: the fit is the tile's own mean, with coefficients 0, never NaN.
    gt = torch.full((1, 3, 32, 32), value)
    match = texture_search(MeanStdClassifier(8), gt, stride=4, top_k=5, min_score=0.0, ridge=1e-3)
    assert match.valid.all()
    assert torch.isfinite(match.coefs).all() and torch.isfinite(match.target).all()
    torch.testing.assert_close(match.target, gt, atol=1e-6, rtol=0)
    assert (match.coefs == 0).all() and (match.tile_r2 == 0).all()


def test_identical_windows_share_the_weight_evenly(generator):
    pattern = torch.rand(1, 3, 8, 8, generator=generator)
    gt = pattern.repeat(1, 1, 4, 4)
    match = texture_search(MeanStdClassifier(8), gt, stride=8, top_k=5, min_score=0.0, ridge=1e-3)
    torch.testing.assert_close(match.coefs, torch.full_like(match.coefs, 0.2), atol=1e-3, rtol=0)


def test_ridge_is_relative_to_the_valid_columns_only(generator):
    X = torch.randn(3, 40, 5, generator=generator, dtype=torch.float64)
    y = torch.randn(3, 40, generator=generator, dtype=torch.float64)
    valid = torch.tensor([True, False, True, False, False]).expand(3, 5)
    with_invalid = solve_coefficients(X, y, valid, ridge=0.5)
    only_valid = solve_coefficients(X[..., [0, 2]], y, torch.ones(3, 2, dtype=torch.bool), ridge=0.5)
    torch.testing.assert_close(with_invalid[..., [0, 2]], only_valid)


def test_solve_matches_lstsq_and_ignores_invalid_columns(generator):
    X = torch.randn(4, 30, 5, generator=generator, dtype=torch.float64)
    y = torch.randn(4, 30, generator=generator, dtype=torch.float64)
    valid = torch.tensor([True, True, False, True, False]).expand(4, 5)
    coefs = solve_coefficients(X, y, valid, ridge=0.0)
    ref = torch.linalg.lstsq(X[..., [0, 1, 3]], y[..., None]).solution.squeeze(-1)
    torch.testing.assert_close(coefs[..., [0, 1, 3]], ref.float(), atol=1e-5, rtol=1e-5)
    assert (coefs[..., [2, 4]] == 0).all()


def test_region_valid_masks_out_padded_windows(generator):
    # The best matches (copies of the tile) sit in the padded band; masked, none of them may be chosen.
    tile = torch.rand(1, 3, 8, 8, generator=generator)
    region = torch.rand(1, 3, 32, 32, generator=generator)
    region[..., 24:32, :] = tile.repeat(1, 1, 1, 4)
    region[..., 0:8, 0:8] = tile
    valid = torch.ones(1, 1, 32, 32, dtype=torch.bool)
    valid[..., 24:, :] = False
    offset = torch.zeros(1, 2, dtype=torch.long)
    unmasked = texture_search(MeanStdClassifier(8), tile, region, offset, stride=4, top_k=3, min_score=0.0)
    assert (unmasked.boxes[0, 0, :, 2] > 24).all()  # control: without the mask the band wins
    masked = texture_search(MeanStdClassifier(8), tile, region, offset, valid, stride=4, top_k=3, min_score=0.0)
    assert (masked.boxes[0, 0, :, 2] <= 24).all()


def test_build_loss_checks_the_classifier(generator):
    cfg = apply_overrides(Config(), {"loss.texture_weight": 0.1, "texture.patch_size": 16})
    with pytest.raises(ConfigError, match="texture classifier"):
        build_loss(cfg, None)
    with pytest.raises(ConfigError, match="patch_size"):
        build_loss(cfg, MeanStdClassifier(8))
    loss = build_loss(cfg, MeanStdClassifier(16))
    assert loss.top_k == cfg.texture.top_k and loss.texture_weight == 0.1
    loss.train()
    assert not loss.classifier.training


def test_chunked_pair_scoring_gives_the_same_match(generator, monkeypatch):
    import xswinir.losses as losses

    gt = torch.rand(2, 3, 32, 32, generator=generator)
    region = torch.rand(2, 3, 48, 48, generator=generator)
    offset = torch.tensor([[0, 16], [8, 4]])
    whole = texture_search(MeanStdClassifier(8), gt, region, offset, stride=4, top_k=4, min_score=0.0)
    monkeypatch.setattr(losses, "_PAIR_ELEMENTS", 1000)  # forces chunks of a few tiles
    chunked = texture_search(MeanStdClassifier(8), gt, region, offset, stride=4, top_k=4, min_score=0.0)
    assert torch.equal(whole.boxes, chunked.boxes) and torch.equal(whole.target, chunked.target)


@pytest.mark.parametrize("override", [{"texture.ridge": -1.0}, {"texture.min_score": 1.5}, {"texture.max_iou": 1.0}])
def test_texture_settings_are_checked(override):
    with pytest.raises(ConfigError, match="texture"):
        apply_overrides(Config(), override)


@pytest.mark.gpu
def test_loss_never_syncs_with_the_host_on_cuda(generator):
    # The loss runs every step: a hidden .item() or a checked solve would stall the GPU pipeline.
    gt = torch.rand(2, 3, 32, 32, generator=generator).cuda()
    region = torch.rand(2, 3, 64, 64, generator=generator).cuda()
    region[..., 16:48, 16:48] = gt
    valid = torch.ones(2, 1, 64, 64, dtype=torch.bool, device="cuda")
    offset = torch.full((2, 2), 16, device="cuda")
    loss = CombinedLoss(real_classifier(16, region.cpu()), texture_weight=0.1).cuda()
    sr = gt.clone().requires_grad_()
    loss(sr, gt, region, offset, valid)  # warm-up: lazy CUDA initialisation may sync
    torch.cuda.set_sync_debug_mode("error")
    try:
        total, _ = loss(sr, gt, region, offset, valid)
        total.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_mask_covers_explained_whole_tiles_only(generator):
    gt = torch.rand(1, 3, 40, 36, generator=generator)
    match = texture_search(MeanStdClassifier(16), gt, stride=4, top_k=2, min_score=0.0)
    assert match.tiles == (2, 2) and match.valid.any(-1).all()
    expected = torch.zeros(1, 1, 40, 36, dtype=torch.bool)
    expected[..., :32, :32] = True
    assert torch.equal(match.mask, expected)
    assert (match.target[..., 32:, :] == 0).all() and (match.target[..., :, 32:] == 0).all()


@pytest.mark.parametrize("function", [texture_search, CombinedLoss.__init__])
def test_search_and_loss_defaults_are_the_configs(function):
    # The config is the source of truth; a default here that drifted from it would change what a run means.
    loss, texture = LossConfig(), TextureConfig()
    checked = []
    for name, param in inspect.signature(function).parameters.items():
        if param.default is inspect.Parameter.empty or param.default is None:
            continue
        source = texture if hasattr(texture, name) else loss
        assert param.default == getattr(source, name), name
        checked.append(name)
    assert {"stride", "top_k", "min_score", "max_iou", "ridge"} <= set(checked)
