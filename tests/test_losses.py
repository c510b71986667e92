"""CombinedLoss: the pixel term, the texture term over a TextureSearch, and the diagnostics."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.test_search import MeanStdClassifier, make_classifier, pinned_case, real_classifier, search_for
from xswinir.config import Config, ConfigError, LossConfig, apply_overrides
from xswinir.losses import CombinedLoss, build_loss, patch_pixels, pull_gate
from xswinir.texture import TextureSearch


def loss_for(search: TextureSearch | None, **settings) -> CombinedLoss:
    """The loss with ``LossConfig``'s settings (its defaults where not given)."""
    return CombinedLoss.from_config(LossConfig(**settings), search)


@pytest.mark.parametrize(("form", "query", "expected"), [
    ("projection", "lq", {"total": 0.076306, "texture": 0.00269, "texture_score": 0.564766,
                          "texture_underfilled": 0.75, "texture_tiles_used": 0.25, "texture_r2": 0.508995,
                          "texture_fit_error": 0.126204, "coef_mean": 0.16626, "coef_abs_max": 1.749602,
                          "texture_bicubic_error": 0.208654}),
    ("pull", "lq", {"total": 0.096002, "texture": 0.042082, "texture_score": 0.564766, "texture_underfilled": 0.75,
                    "texture_tiles_used": 0.25, "texture_r2": 0.508995, "texture_fit_error": 0.126204,
                    "coef_mean": 0.16626, "coef_abs_max": 1.749602, "texture_bicubic_error": 0.208654}),
    ("projection", "gt", {"total": 0.079879, "texture": 0.009835, "texture_score": 0.864101,
                          "texture_underfilled": 0.0, "texture_tiles_used": 1.0, "texture_r2": 0.997504,
                          "texture_fit_error": 0.012431, "coef_mean": 0.332349, "coef_abs_max": 1.001651,
                          "texture_bicubic_error": 0.213664}),
])
def test_pinned_terms(form, query, expected):
    # Values computed before the search moved into TextureSearch (see tests/test_search.py, pinned_case).
    case = pinned_case()
    loss = loss_for(search_for(case["classifier"], top_k=3, min_score=0.52, query=query), texture_weight=0.5,
                    texture_form=form)
    total, parts = loss(case["sr"], case["gt"], case["region"], case["offset"], case["valid"], lq=case["lq"])
    assert parts["pixel"].item() == pytest.approx(0.074961, abs=1e-6)
    assert total.item() == pytest.approx(expected.pop("total"), abs=1e-6)
    assert {k: round(parts[k].item(), 6) for k in expected} == pytest.approx(expected, abs=2e-6)


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
    search = search_for(MeanStdClassifier(p), top_k=5, min_score=0.0, ridge=0.0)
    match = search(gt, region, offset, valid)
    assert match.valid.sum().item() == 2
    chosen = {tuple(box.tolist()): c.item() for box, c, v in zip(match.boxes[0, 0], match.coefs[0, 0],
                                                               match.valid[0, 0], strict=True) if v}
    assert chosen.keys() == {(0, 0, 8, 8), (0, 24, 8, 32)}
    assert chosen[(0, 0, 8, 8)] == pytest.approx(0.5, abs=1e-4)
    assert chosen[(0, 24, 8, 32)] == pytest.approx(0.3, abs=1e-4)
    torch.testing.assert_close(match.target, gt, atol=1e-5, rtol=0)
    assert match.tile_r2[0, 0].item() == pytest.approx(1.0, abs=1e-5)

    loss = loss_for(search, texture_weight=1.0)
    _, parts = loss(gt.clone(), gt, region, offset, valid)
    assert parts["texture"].item() == pytest.approx(0.0, abs=1e-5)
    assert parts["texture_underfilled"].item() == 1.0  # 2 of 5 windows


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
    loss = loss_for(search_for(clf, top_k=3, min_score=0.0, ridge=0.0), texture_weight=0.5, texture_form=form)
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
    search = search_for(clf, top_k=5, min_score=0.0)
    loss = loss_for(search, texture_weight=1.0, texture_dist=dist)
    sr = gt.clone().requires_grad_()
    loss.texture_term(sr, gt, loss.search(gt, region, offset)).backward()
    assert loss.texture_term(gt, gt, loss.search(gt, region, offset)).item() == pytest.approx(0.0, abs=1e-7)
    assert sr.grad.abs().max().item() < 1e-7
    pull = loss_for(search, texture_weight=1.0, texture_form="pull", texture_dist=dist)
    assert pull.texture_term(gt, gt, pull.search(gt, region, offset)).item() > 1e-3  # the control


def test_a_step_on_the_projection_term_never_moves_away_from_gt(generator):
    # <grad, sr - gt> >= 0 for the l2 projection term: its descent direction never increases ||sr - gt||.
    gt = torch.rand(4, 3, 32, 32, generator=generator)
    region = F.pad(gt, (16, 16, 16, 16), mode="reflect")
    offset = torch.full((4, 2), 16)
    loss = loss_for(search_for(MeanStdClassifier(8), top_k=5, min_score=0.0), texture_weight=1.0, texture_dist="l2")
    match = loss.search(gt, region, offset)
    sr = (gt + 0.2 * torch.randn(gt.shape, generator=generator)).requires_grad_()
    loss.texture_term(sr, gt, match).backward()
    per_tile = (sr.grad * (sr - gt).detach()).unfold(2, 8, 8).unfold(3, 8, 8).sum(dim=(1, 4, 5))
    assert (per_tile >= -1e-9).all() and per_tile.sum() > 0
    stepped = sr.detach() - 1.0 * sr.grad / sr.grad.abs().max() * 0.01
    assert (stepped - gt).norm() < (sr.detach() - gt).norm()


def test_query_lq_needs_the_degraded_input_and_reports_diagnostics(generator):
    gt = torch.rand(2, 3, 32, 32, generator=generator)
    lq = F.avg_pool2d(gt, 2)
    loss = loss_for(search_for(MeanStdClassifier(8), query="lq", min_score=0.0), texture_weight=1.0)
    with pytest.raises(ConfigError, match="lq"):
        loss(gt.clone(), gt)
    _, parts = loss(gt.clone(), gt, lq=lq)
    assert 0 < parts["texture_tiles_used"].item() <= 1
    assert 0 <= parts["texture_r2"].item() <= 1
    expected_bicubic = (F.interpolate(lq, size=(32, 32), mode="bicubic", align_corners=False).clamp(0, 1)
                        - gt).abs().mean()
    torch.testing.assert_close(parts["texture_bicubic_error"], expected_bicubic)
    assert parts["texture_fit_error"].item() > 0


def test_a_patch_without_candidates_is_masked_out(generator):
    gt = torch.rand(1, 3, 16, 16, generator=generator)
    loss = loss_for(search_for(MeanStdClassifier(16), min_score=0.0), texture_weight=1.0)
    sr = gt.clone().requires_grad_()
    total, parts = loss(sr, gt)  # the region is gt itself: its only window is the patch's own
    assert parts["texture"].item() == 0.0 and parts["texture_underfilled"].item() == 1.0
    assert torch.isfinite(total)
    total.backward()
    assert torch.isfinite(sr.grad).all()


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
    loss = loss_for(search_for(MeanStdClassifier(16), min_score=0.0, ridge=0.0), texture_weight=2.0,
                    texture_form="pull", texture_dist=kind)
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
        loss = loss_for(search_for(MeanStdClassifier(8)), texture_weight=0.1)
        return loss(sr, gt, region, torch.full((2, 2), 16))

    (a, pa), (b, pb) = run(), run()
    assert torch.equal(a, b)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


def test_build_loss_checks_the_classifier(generator):
    cfg = apply_overrides(Config(), {"loss.texture_weight": 0.1, "texture.patch_size": 16})
    with pytest.raises(ConfigError, match="texture classifier"):
        build_loss(cfg, None)
    with pytest.raises(ConfigError, match="patch_size"):
        build_loss(cfg, MeanStdClassifier(8))
    clf = MeanStdClassifier(16)
    loss = build_loss(cfg, clf)
    assert loss.texture_search == TextureSearch.from_config(cfg.texture, clf) and loss.texture_weight == 0.1
    loss.train()
    assert not loss.classifier.training and loss.classifier is clf
    assert build_loss(apply_overrides(cfg, {"loss.texture_weight": 0.0}), MeanStdClassifier(8)).texture_search is None


def test_from_config_takes_every_setting_from_the_config():
    settings = LossConfig(pixel="charbonnier", texture_weight=0.3, texture_form="pull", texture_dist="l2",
                          charbonnier_eps=0.01)
    loss = CombinedLoss.from_config(settings, search_for(MeanStdClassifier(8)))
    assert {name: getattr(loss, name) for name in vars(settings)} == vars(settings)
    with pytest.raises(ConfigError, match="texture classifier"):
        loss_for(None, texture_weight=0.3)
    with pytest.raises(ConfigError, match="texture_form"):
        CombinedLoss(None, pixel="l1", texture_weight=0.0, texture_form="push", texture_dist="l1",
                     charbonnier_eps=1e-3)


def gated_case(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, TextureSearch]:
    """A 32 px gt of one 8 px texture repeated with a little noise (windows at stride 8: the copies), so that X c*
    fits every patch closely; the up-sampled input equals gt on the left half (bicubic wins there) and is flat
    gray on the right half."""
    pattern = torch.rand(1, 3, 8, 8, generator=generator)
    gt = (pattern.repeat(2, 1, 4, 4) + 0.03 * torch.rand(2, 3, 32, 32, generator=generator)).clamp(0, 1)
    lq_up = gt.clone()
    lq_up[..., 16:] = 0.5
    return gt, lq_up, search_for(MeanStdClassifier(8), stride=8, top_k=3, min_score=0.0)


def test_the_gate_opens_where_x_c_beats_bicubic_and_closes_elsewhere(generator):
    gt, lq_up, search = gated_case(generator)
    match = search(gt)
    assert match.valid.any(-1).all() and (match.target - gt).abs().max() < 0.1  # X c* fits everywhere
    gate = pull_gate(match, gt, lq_up, "l1", 1e-3).reshape(2, 4, 4)
    right = torch.zeros(4, 4, dtype=torch.bool)
    right[:, 2:] = True
    assert torch.equal(gate, right.expand(2, 4, 4))  # bicubic equals gt on the left: closed there
    assert not pull_gate(match, gt, gt, "l1", 1e-3).any()  # the input at gt: bicubic always wins
    assert pull_gate(match, gt, torch.full_like(gt, 0.5), "l1", 1e-3).all()
    # A patch without a valid window stays closed however poor bicubic is.
    lone = gt[:1, :, :16, :16]
    lone_match = search_for(MeanStdClassifier(16), min_score=0.0)(lone)
    assert not lone_match.valid.any()
    assert not pull_gate(lone_match, lone, torch.full_like(lone, 0.5), "l1", 1e-3).any()


def test_gated_pull_gradient_flows_only_through_open_patches(generator):
    gt, lq_up, search = gated_case(generator)
    loss = loss_for(search, texture_weight=0.1, texture_form="gated_pull")
    match = loss.search(gt)
    sr = torch.rand(gt.shape, generator=generator).requires_grad_()
    loss.texture_term(sr, gt, match, lq_up).backward()
    open_pixels = patch_pixels(pull_gate(match, gt, lq_up, "l1", 1e-3), match, (32, 32)).expand_as(gt)
    assert open_pixels[..., 16:].all() and not open_pixels[..., :16].any()
    assert (sr.grad[~open_pixels] == 0).all()
    torch.testing.assert_close(sr.grad[open_pixels], (torch.sign(sr - match.target) / sr.numel())[open_pixels])
    # The pull form, for contrast, pulls on every explained patch.
    sr.grad = None
    loss_for(search, texture_weight=0.1, texture_form="pull").texture_term(sr, gt, match).backward()
    assert (sr.grad[~open_pixels] != 0).all()


def test_gated_pull_total_is_smallest_at_gt_with_l1_and_lambda_below_one(generator):
    # Per pixel |s - gt| + lambda |s - X c*| has its minimum at s = gt for lambda < 1.
    gt, lq_up, search = gated_case(generator)
    loss = loss_for(search, texture_weight=0.1, texture_form="gated_pull")
    match = loss.search(gt)

    def total(sr: torch.Tensor, fn: CombinedLoss = loss) -> float:
        return fn(sr, gt, lq=lq_up, match=match)[0].item()

    at_gt = total(gt)
    assert at_gt > 0  # the term itself is not 0 at gt: X c* differs from gt on the open patches
    for _ in range(20):
        direction = torch.randn(gt.shape, generator=generator)
        assert total(gt + 1e-2 * direction / direction.abs().max()) > at_gt
    open_pixels = patch_pixels(pull_gate(match, gt, lq_up, "l1", 1e-3), match, (32, 32)).float()
    towards_target = (match.target - gt) * open_pixels
    assert total(gt + 0.5 * towards_target) > at_gt and total(gt + towards_target) > at_gt
    # The control: with L2 distances the minimum moves off gt, towards X c* on the open patches.
    l2 = loss_for(search, pixel="l2", texture_weight=0.1, texture_form="gated_pull", texture_dist="l2")
    assert total(gt + 0.05 * towards_target, l2) < total(gt, l2)


def test_gated_pull_needs_the_input_and_reports_its_gate(generator):
    gt, lq_up, search = gated_case(generator)
    loss = loss_for(search, texture_weight=0.1, texture_form="gated_pull")
    with pytest.raises(ConfigError, match="gated_pull"):
        loss(gt.clone(), gt)
    _, parts = loss(gt.clone(), gt, lq=lq_up)
    assert parts["texture_gate_open"].item() == 0.5
    assert "texture_gate_open" not in loss_for(search, texture_weight=0.1, texture_form="pull")(gt, gt, lq=lq_up)[1]


@pytest.mark.parametrize("form", ["projection", "pull", "gated_pull"])
def test_a_match_made_beforehand_gives_the_same_loss(form):
    # The data pipeline's search (texture.search_in=loader) hands the loss the match; nothing else changes.
    case = pinned_case()
    loss = loss_for(search_for(case["classifier"], top_k=3, min_score=0.52), texture_weight=0.5, texture_form=form)
    args = (case["sr"], case["gt"], case["region"], case["offset"], case["valid"])
    total, parts = loss(*args, lq=case["lq"])
    match = loss.texture_search(case["gt"], case["region"], case["offset"], case["valid"])
    given_total, given_parts = loss(case["sr"], case["gt"], lq=case["lq"], match=match)
    assert torch.equal(total, given_total)
    assert parts.keys() == given_parts.keys() and all(torch.equal(parts[k], given_parts[k]) for k in parts)


@pytest.mark.gpu
def test_loss_never_syncs_with_the_host_on_cuda(generator):
    # The loss runs every step: a hidden .item() or a checked solve would stall the GPU pipeline.
    gt = torch.rand(2, 3, 32, 32, generator=generator).cuda()
    region = torch.rand(2, 3, 64, 64, generator=generator).cuda()
    region[..., 16:48, 16:48] = gt
    valid = torch.ones(2, 1, 64, 64, dtype=torch.bool, device="cuda")
    offset = torch.full((2, 2), 16, device="cuda")
    loss = loss_for(search_for(real_classifier(16, region.cpu())), texture_weight=0.1).cuda()
    sr = gt.clone().requires_grad_()
    loss(sr, gt, region, offset, valid)  # warm-up: lazy CUDA initialisation may sync
    torch.cuda.set_sync_debug_mode("error")
    try:
        total, _ = loss(sr, gt, region, offset, valid)
        total.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


