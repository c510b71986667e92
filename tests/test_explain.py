"""Explanation pictures: the core function and the ``xswinir explain`` command, with tiny real parts."""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from xswinir.checkpoint import save_weights
from xswinir.cli import main
from xswinir.config import DEGRADATION_PRESETS, MODEL_PRESETS, TextureConfig
from xswinir.explain import (
    ExplainError,
    consistency_map,
    degrade_hr,
    explain,
    pick_patches,
    search_blocks,
    upsample_input,
)
from xswinir.images import read_image, write_image
from xswinir.model import build_swinir
from xswinir.texture import TextureClassifier, TextureSearch, load_texture_classifier, save_texture_classifier
from xswinir.trust import SIGNALS, TrustError, TrustModel, embed_classifier, estimate_trust, save_trust


def textured_image(generator: torch.Generator, size: int = 64) -> torch.Tensor:
    """Stripes on top, fine noise at the bottom left, flat at the bottom right: (3, size, size)."""
    yy, xx = torch.meshgrid(torch.arange(size * 1.0), torch.arange(size * 1.0), indexing="ij")
    image = torch.stack([0.5 + 0.4 * torch.sin(xx / 2), 0.5 + 0.3 * torch.sin(yy / 3), 0.5 + 0.2 * torch.sin(xx / 5)])
    half = size // 2
    image[:, half:, :half] = 0.3 + 0.4 * torch.rand(3, size - half, half, generator=generator)
    image[:, half:, half:] = 0.6
    return image


def tiny_classifier(image: torch.Tensor, patch_size: int = 16) -> TextureClassifier:
    """The real classifier with fixed weights, standardised on the image's windows (training takes too long here)."""
    clf = TextureClassifier(patch_size, scales=(1, 2))
    with torch.no_grad():
        feats = clf.features.window_features(image[None], patch_size, 4).flatten(2)[0].T
        clf.feature_mean.copy_(feats.mean(0))
        clf.feature_std.copy_(torch.where(feats.std(0) > 1e-6, feats.std(0), torch.ones(())))
        # logit = 3 - 4 * mean |za - zb|: windows of one texture differ by ~0.5 per standardised feature,
        # windows of different textures by more than 1 (whatever the number of features).
        clf.weight_diff.fill_(-4.0 / feats.shape[1])
        clf.bias.fill_(3.0)
    return clf.eval()


@pytest.fixture
def parts(tmp_path: Path, generator: torch.Generator) -> dict[str, Path]:
    image = textured_image(generator)
    write_image(tmp_path / "hr.png", image)
    save_texture_classifier(tiny_classifier(image), tmp_path / "clf")
    torch.manual_seed(0)
    cfg = MODEL_PRESETS["tiny-x2"]
    save_weights(build_swinir(cfg), cfg, tmp_path / "model.safetensors")
    write_image(tmp_path / "lq.png", textured_image(generator, 32))
    return {"image": tmp_path / "hr.png", "classifier": tmp_path / "clf", "model": tmp_path / "model.safetensors",
            "lq": tmp_path / "lq.png"}


def repeated_texture(size: int = 32) -> torch.Tensor:
    """One texture repeated every 8 px in both directions: (3, size, size)."""
    yy, xx = torch.meshgrid(torch.arange(size * 1.0), torch.arange(size * 1.0), indexing="ij")
    return torch.stack([0.5 + 0.3 * torch.sin(xx * torch.pi / 2) * torch.cos(yy * torch.pi / 4),
                        0.5 + 0.2 * torch.cos(xx * torch.pi / 4 + yy * torch.pi / 2),
                        0.4 + 0.3 * ((xx + yy) % 4 < 2).float()])


class Upsampler(nn.Module):
    """A restorer that only up-samples (bilinear): the output's texture is the input's, nothing invented."""

    upscale = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=self.upscale, mode="bilinear", align_corners=False)


def test_cli_writes_png_and_html(parts, tmp_path, capsys):
    out = tmp_path / "out" / "explain.png"
    rc = main(["explain", str(parts["image"]), "--checkpoint", str(parts["model"]), "--classifier",
               str(parts["classifier"]), "--patches", "2", "--out", str(out), "--html", "--device", "cpu"])
    assert rc == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    picture = read_image(out)
    assert picture.shape[-1] > 800 and picture.std() > 0.05  # a real drawing, not a blank canvas
    page = out.with_suffix(".html").read_text()  # the explorable page: every patch's data inline, no network
    assert "data:image/png;base64," in page and '"patches"' in page and "<script src" not in page
    printed = capsys.readouterr().out
    assert "wrote" in printed and "c*=" in printed


def test_cli_explains_a_low_quality_image(parts, tmp_path, capsys):
    out = tmp_path / "lq_explain.png"
    rc = main(["explain", str(parts["lq"]), "--lq", "--checkpoint", str(parts["model"]), "--classifier",
               str(parts["classifier"]), "--patches", "2", "--out", str(out), "--device", "cpu"])
    assert rc == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "no HR image" in printed and "consistency r²" in printed
    assert "mean texture consistency of the restored image:" in printed and "(4x4 tiles of 16 px)" in printed


def search_for(classifier: TextureClassifier, **settings) -> TextureSearch:
    """The search with ``TextureConfig``'s settings (its defaults where not given) and the classifier's patch size."""
    return TextureSearch.from_config(TextureConfig(patch_size=classifier.patch_size, **settings), classifier)


def test_explain_with_hr_finds_windows_outside_the_patch(parts, generator):
    from xswinir.checkpoint import load_model
    from xswinir.texture import load_texture_classifier

    model, model_cfg = load_model(parts["model"])
    search = search_for(load_texture_classifier(parts["classifier"]), region_size=None)
    degraded = degrade_hr(read_image(parts["image"]), DEGRADATION_PRESETS["blur-noise"], model_cfg.upscale,
                          search.patch_size, seed=1)
    hr = degraded.hr
    positions = torch.tensor([[0, 16], [32, 0]])
    result = explain(model, search, degraded.lq, hr=hr, description=degraded.description, positions=positions)
    assert result.png is None and result.figure is not None
    assert result.sr.shape == hr.shape and result.lq.shape == (3, 32, 32) and torch.equal(result.hr, hr)
    assert result.description == degraded.description and "noise" in result.description
    assert {r["patch"] for r in result.rows} == {1, 2}
    for r in result.rows:
        tile, window = r["tile"], r["window"]
        assert window[2] - window[0] == 16 and 0 <= window[0] and window[2] <= 64 and window[3] <= 64
        overlap = max(0, min(tile[2], window[2]) - max(tile[0], window[0])) * max(
            0, min(tile[3], window[3]) - max(tile[1], window[1]))
        assert overlap / (2 * 256 - overlap) <= search.max_iou
        assert r["score"] >= search.min_score
    # Stripes find stripes: the windows of the top-row patch lie in the striped top half.
    assert all(r["window"][2] <= 40 for r in result.rows if r["patch"] == 1)
    # The texture consistency of the restored output: one value per 16 px patch, in [0, 1].
    assert result.consistency.shape == (4, 4) and 0 <= result.consistency.min() <= result.consistency.max() <= 1
    assert result.consistency_mean == pytest.approx(float(result.consistency.mean()))
    assert [s["patch"] for s in result.tile_summary] == [1, 2]
    for s in result.tile_summary:
        assert s["consistency"] == pytest.approx(float(result.consistency[s["tile"][0] // 16, s["tile"][1] // 16]),
                                                 abs=1e-5)


def test_degrade_hr_crops_to_the_scale_and_is_seeded(generator):
    hr = textured_image(generator, 67)
    first = degrade_hr(hr, DEGRADATION_PRESETS["blur-noise"], 2, 16, seed=4)
    again = degrade_hr(hr, DEGRADATION_PRESETS["blur-noise"], 2, 16, seed=4)
    other = degrade_hr(hr, DEGRADATION_PRESETS["blur-noise"], 2, 16, seed=5)
    assert torch.equal(first.hr, hr[:, :66, :66]) and first.lq.shape == (3, 33, 33)
    assert torch.equal(first.lq, again.lq) and first.description == again.description
    assert not torch.equal(first.lq, other.lq)
    with pytest.raises(ExplainError, match="smaller than one 16 px"):
        degrade_hr(hr[:, :15], DEGRADATION_PRESETS["blur-noise"], 2, 16)
    with pytest.raises(ExplainError, match="one"):
        degrade_hr(hr[None], DEGRADATION_PRESETS["blur-noise"], 2, 16)


def test_pinned_explanations(generator, one_torch_thread_per_test):
    # Values computed before explain and explain_lq became one function: the same windows, c* and maps.
    image = textured_image(generator, 64)
    clf = tiny_classifier(image)
    degraded = degrade_hr(image, DEGRADATION_PRESETS["blur-noise"], 2, 16, seed=3)
    assert degraded.description == "blur sigma 1.00x0.28 @ -5 deg | down x2 | noise sigma 11.8"
    with_hr = explain(Upsampler(), search_for(clf, region_size=48, query="lq"), degraded.lq, hr=degraded.hr,
                      description=degraded.description, patches=3)
    assert [(s["tile"], s["windows"]) for s in with_hr.tile_summary] == [
        ([32, 16, 48, 32], 0), ([16, 48, 32, 64], 5), ([0, 16, 16, 32], 5)]
    torch.testing.assert_close(torch.tensor([[s["r2"], s["consistency"]] for s in with_hr.tile_summary]),
                               torch.tensor([[0.0, 0.0321], [0.9748, 0.8485], [0.6798, 0.7712]]), atol=1e-4, rtol=0)
    assert [(r["patch"], r["window"]) for r in with_hr.rows] == [
        (2, [16, 24, 32, 40]), (2, [16, 20, 32, 36]), (2, [16, 32, 32, 48]), (2, [0, 48, 16, 64]),
        (2, [0, 36, 16, 52]), (3, [0, 0, 16, 16]), (3, [20, 4, 36, 20]), (3, [20, 16, 36, 32]),
        (3, [20, 0, 36, 16]), (3, [0, 32, 16, 48])]
    torch.testing.assert_close(torch.tensor([r["coef"] for r in with_hr.rows]), torch.tensor(
        [0.1029, 3.1573, -2.3933, -2.3538, 2.5324, 0.3629, 0.3119, 0.5781, -0.2475, 0.0843]), atol=2e-4, rtol=1e-3)
    torch.testing.assert_close(with_hr.consistency, torch.tensor(
        [[0.8103, 0.7712, 0.7606, 0.8868], [0.8747, 0.9012, 0.6169, 0.8485], [0.0218, 0.0321, 0.0381, 0.1054],
         [0.0676, 0.1021, 0.0108, 0.0179]]), atol=1e-4, rtol=0)

    lq = F.avg_pool2d(image[None], 2)[0]
    without = explain(Upsampler(), search_for(clf, min_score=0.3, region_size=48), lq, patches=2)
    assert without.description == "given low-quality input, 32x32, restored x2 (no HR image)"
    assert [(s["tile"], s["windows"]) for s in without.tile_summary] == [([16, 16, 32, 32], 5), ([16, 48, 32, 64], 5)]
    assert [r["window"] for r in without.rows] == [
        [16, 0, 32, 16], [0, 16, 16, 32], [16, 32, 32, 48], [0, 4, 16, 20], [0, 28, 16, 44], [16, 24, 32, 40],
        [16, 20, 32, 36], [16, 32, 32, 48], [16, 28, 32, 44], [16, 16, 32, 32]]
    torch.testing.assert_close(torch.tensor([r["coef"] for r in without.rows]), torch.tensor(
        [0.2957, 1.2217, 0.2555, -0.2726, -0.2714, 1.0827, -0.2495, 0.4797, -1.1239, 0.797]), atol=2e-4, rtol=1e-3)
    torch.testing.assert_close(without.consistency, torch.tensor(
        [[0.8589, 0.9443, 0.9738, 0.9151], [0.8951, 0.7476, 0.7444, 0.994], [0.0263, 0.0163, 0.3442, 0.2315],
         [0.0167, 0.0214, 0.0002, 0.0]]), atol=1e-4, rtol=0)

    consistency = consistency_map(search_for(clf, region_size=32, min_score=0.0), image)
    torch.testing.assert_close(consistency, torch.tensor(
        [[0.8885, 0.7304, 0.733, 0.8907], [0.3173, 0.0, 0.0, 0.3206], [0.0082, 0.0, 0.0, 0.0],
         [0.0028, 0.0023, 0.0, 0.0]]), atol=1e-4, rtol=0)


def test_explain_needs_no_hr_image(parts, generator, tmp_path):
    from xswinir.checkpoint import load_model
    from xswinir.texture import load_texture_classifier

    model, _ = load_model(parts["model"])
    clf = load_texture_classifier(parts["classifier"])
    lq = read_image(parts["lq"])
    # The untrained model's output shares little with the input: min_score 0 keeps the K best windows anyway.
    # A 48 px region makes every patch its own block (the 64 px output is more than one region).
    out = tmp_path / "lq_explain.png"
    result = explain(model, search_for(clf, min_score=0.0, region_size=48), lq, patches=2, out=out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and result.png == out
    assert result.hr is None and result.lq.shape == (3, 32, 32) and result.sr.shape == (3, 64, 64)
    assert result.query.shape == result.sr.shape  # the input on the output grid
    assert "no HR image" in result.description
    assert result.consistency.shape == (4, 4) and 0 <= result.consistency.min() <= result.consistency.max() <= 1
    assert result.consistency_mean == pytest.approx(float(result.consistency.mean()))
    assert {r["patch"] for r in result.rows} == {1, 2}
    for r in result.rows:  # windows of the restored output, other than the tile itself
        top, left, bottom, right = r["window"]
        assert bottom - top == right - left == 16 and 0 <= top and 0 <= left and bottom <= 64 and right <= 64
        tile = r["tile"]
        assert bottom <= tile[0] or top >= tile[2] or right <= tile[1] or left >= tile[3]  # max_iou 0: disjoint
        assert 0 <= r["score"] <= 1
    # A patch's row searches exactly what the map searched for it.
    for s in result.tile_summary:
        assert s["r2"] == s["consistency"]
        assert s["r2"] == pytest.approx(float(result.consistency[s["tile"][0] // 16, s["tile"][1] // 16]), abs=1e-5)


def test_repeated_texture_is_more_consistent_than_noise(generator):
    noise = torch.rand(3, 32, 32, generator=generator)
    both = F.interpolate(torch.cat([repeated_texture(), noise], -1)[None], scale_factor=2, mode="bilinear")[0]
    search = search_for(tiny_classifier(both), min_score=0.0)  # the same K windows for both: the fit decides
    repeated = explain(Upsampler(), search, repeated_texture(), patches=1)
    noisy = explain(Upsampler(), search, noise, patches=1)
    assert repeated.consistency_mean > 0.9 > 0.3 > noisy.consistency_mean


def test_consistency_map_matches_single_patch_searches(generator):
    from xswinir.explain import _search

    image = textured_image(generator, 80)  # 5 x 5 patches; 64 px regions give 2 x 2 blocks, the last ones overlap
    search = search_for(tiny_classifier(image), region_size=64, min_score=0.0)
    consistency = consistency_map(search, image)
    assert consistency.shape == (5, 5)
    grid = torch.stack(torch.meshgrid(torch.arange(5), torch.arange(5), indexing="ij"), -1).reshape(-1, 2) * 16
    match, regions, _ = _search(search, image, None, grid, (16, 16), torch.device("cpu"))
    assert regions.shape[-2:] == (64, 64)
    torch.testing.assert_close(consistency.flatten(), match.tile_r2[:, 0], atol=1e-5, rtol=0)


def test_search_blocks_cover_every_patch(generator):
    image = textured_image(generator, 80)
    search = search_for(tiny_classifier(image), region_size=64, min_score=0.0)
    covered = torch.zeros(5, 5, dtype=torch.int)
    for match, region_tl in search_blocks(search, image, upsample_input(F.avg_pool2d(image[None], 2)[0], 2)):
        assert match.tiles == (2, 2) and region_tl.shape == (match.boxes.shape[0], 2)
        patch_tl = (match.tile_boxes[..., :2] + region_tl[:, None, :]) // 16  # (n, T, 2) in patches
        for y, x in patch_tl.reshape(-1, 2).tolist():
            covered[y, x] += 1
    assert (covered >= 1).all() and covered.sum() > 25  # the last blocks overlap the ones before
    with pytest.raises(ExplainError, match="query"):
        next(search_blocks(search, image, image[:, :32]))


def test_denoiser_query_is_the_input(parts, generator):
    torch.manual_seed(0)
    model = build_swinir(dataclasses.replace(MODEL_PRESETS["tiny-x2"], upscale=1, upsampler=""))
    clf = tiny_classifier(textured_image(generator, 32))
    lq = read_image(parts["lq"])
    result = explain(model, search_for(clf), lq, patches=1)
    assert result.sr.shape == lq.shape and torch.equal(result.query, lq)
    assert result.consistency.shape == (2, 2)


def test_pick_patches_prefers_texture(generator):
    image = textured_image(generator)
    patches = pick_patches(image, 16, 3)
    assert patches.shape == (3, 2)
    assert not ((patches[:, 0] >= 32) & (patches[:, 1] >= 32)).any()  # never the flat quarter
    small = pick_patches(torch.rand(3, 32, 32, generator=generator), 16, 5)
    assert len({tuple(t) for t in small.tolist()}) == len(small) == 4  # all four patches, each once


def test_bad_image_gives_a_clear_error(parts, tmp_path, capsys):
    common = ["--checkpoint", str(parts["model"]), "--classifier", str(parts["classifier"]), "--out",
              str(tmp_path / "x.png")]
    (tmp_path / "broken.png").write_bytes(b"not an image")
    assert main(["explain", str(tmp_path / "broken.png"), *common]) == 2
    assert "broken.png" in capsys.readouterr().err
    assert main(["explain", str(tmp_path / "missing.png"), *common]) == 2
    assert "missing.png" in capsys.readouterr().err
    write_image(tmp_path / "small.png", torch.rand(3, 8, 8))
    assert main(["explain", str(tmp_path / "small.png"), *common]) == 2
    assert "smaller than one 16 px" in capsys.readouterr().err
    assert main(["explain", str(parts["image"]), *common, "--tile-at", "60,60"]) == 2
    assert "must lie inside" in capsys.readouterr().err
    write_image(tmp_path / "tiny_lq.png", torch.rand(3, 6, 6))
    assert main(["explain", str(tmp_path / "tiny_lq.png"), "--lq", *common]) == 2
    assert "gives a 12x12 output, smaller than one 16 px" in capsys.readouterr().err
    assert main(["explain", str(parts["lq"]), "--lq", "--degradation", "bicubic", *common]) == 2
    assert "--lq" in capsys.readouterr().err
    assert main(["explain", str(parts["image"]), "--checkpoint", str(parts["model"]), "--out",
                 str(tmp_path / "x.png")]) == 2
    assert "--classifier" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_explain_rejects_a_mismatched_hr(parts, generator):
    from xswinir.checkpoint import load_model
    from xswinir.texture import load_texture_classifier

    model, _ = load_model(parts["model"])
    search = search_for(load_texture_classifier(parts["classifier"]))
    lq = read_image(parts["lq"])
    with pytest.raises(ExplainError, match="HR image"):
        explain(model, search, lq, hr=textured_image(generator, 48))


def contrast_trust(clf: TextureClassifier, scale: int = 2) -> TrustModel:
    """A trust model by hand: ``ln(1 + error) = 0.5 + 0.5 * log_input_std``, its bound 0.4 above."""
    weights = [0.5 if name == "log_input_std" else 0.0 for name in SIGNALS]
    search = {"stride": 4, "top_k": 3, "min_score": 0.0, "max_iou": 0.0, "ridge": 1e-3, "region_size": 48}
    return TrustModel(signal_names=SIGNALS, signal_mean=[0.0] * len(SIGNALS), signal_std=[1.0] * len(SIGNALS),
                      weights=weights, bias=0.5, smear=1.0, quantile=0.4, coverage=0.9, patch_size=16, scale=scale,
                      search=search, display_max=10.0, classifier=embed_classifier(clf))


def _panel(figure, words: str):
    """The axes of the picture whose title contains ``words``, or None."""
    return next((ax for ax in figure.axes if words in ax.get_title()), None)


def test_explain_draws_the_trust_panel_beside_the_consistency(parts, tmp_path):
    lq = read_image(parts["lq"])  # stripes on top, noise bottom left, flat bottom right
    clf = load_texture_classifier(parts["classifier"])
    search, trust = search_for(clf, min_score=0.0, region_size=48), contrast_trust(clf)
    plain = explain(Upsampler(), search, lq, patches=1, out=tmp_path / "plain.png")
    estimate = functools.partial(estimate_trust, trust, trust.load_search())
    result = explain(Upsampler(), search, lq, patches=1, out=tmp_path / "trust.png", trust=estimate)
    assert plain.trust is None and _panel(plain.figure, "expected error") is None
    expected = estimate_trust(trust, trust.load_search(), lq, result.sr)  # the map the page shows too
    torch.testing.assert_close(result.trust.expected, expected.expected)
    torch.testing.assert_close(result.trust.bound, expected.bound)
    assert result.trust.expected.shape == result.consistency.shape == (4, 4)
    # Contrast raises the expected error: the flat quarter is the most trusted.
    assert result.trust.expected[2:, 2:].max() < result.trust.expected[:2].min()
    panel = _panel(result.figure, "expected error")
    assert "mean |Y error| (Y 0-255)" in panel.get_title() and "90% bound" in panel.get_title()
    heat = panel.get_images()[-1]  # over the restored image in gray
    torch.testing.assert_close(torch.as_tensor(heat.get_array().data), result.trust.expected)
    assert heat.get_clim() == (0, trust.display_max)
    assert any(ax.get_ylabel() == "expected mean |Y error| (0-255)" for ax in result.figure.axes)  # its colour bar
    order = [ax.get_position().x0 for ax in (_panel(result.figure, "texture consistency"), panel,
                                              _panel(result.figure, "similarity"))]
    assert order == sorted(order)  # beside the consistency, before the similarity
    assert read_image(tmp_path / "trust.png").shape[-1] > read_image(tmp_path / "plain.png").shape[-1]
    with pytest.raises(TrustError, match="fitted for x4"):
        wrong = contrast_trust(clf, scale=4)
        explain(Upsampler(), search, lq, patches=1, trust=functools.partial(estimate_trust, wrong, wrong.load_search()))


def test_cli_trust_reaches_the_png_and_the_page(parts, tmp_path, capsys):
    save_trust(contrast_trust(load_texture_classifier(parts["classifier"])), tmp_path / "trust.json")
    common = [str(parts["lq"]), "--lq", "--checkpoint", str(parts["model"]), "--classifier", str(parts["classifier"]),
              "--patches", "1", "--html", "--device", "cpu"]
    assert main(["explain", *common, "--out", str(tmp_path / "plain.png")]) == 0
    trust = ["--trust", str(tmp_path / "trust.json")]
    assert main(["explain", *common, "--out", str(tmp_path / "trust.png"), *trust]) == 0
    capsys.readouterr()
    # The trust panel widens the picture by its 4 inches at 110 dpi.
    width = read_image(tmp_path / "trust.png").shape[-1] - read_image(tmp_path / "plain.png").shape[-1]
    assert width == 440
    for name, has_trust in (("plain.html", False), ("trust.html", True)):
        found = re.search(r'<script type="application/json" id="page-data">(.*?)</script>',
                          (tmp_path / name).read_text(), re.S)
        assert json.loads(found.group(1))["hasTrust"] is has_trust
