"""TextureClassifier, its training, saving/loading, the cache and the `xswinir texture` command; partners for
stochastic textures."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from xswinir.cli import main
from xswinir.config import ClassifierConfig, Config, apply_overrides
from xswinir.errors import UserError
from xswinir.images import write_image
from xswinir.texture import (
    TextureClassifier,
    TextureClassifierError,
    TextureSearch,
    ensure_texture_classifier,
    load_texture_classifier,
    plot_classifier_weights,
    roc_auc,
    save_texture_classifier,
    train_texture_classifier,
)

P = 16
TINY = ClassifierConfig(num_pairs=384, steps=60, seed=0)


def _stripes(size: int, period: float, generator: torch.Generator) -> torch.Tensor:
    """Diagonal colour stripes with a little noise, (3, size, size)."""
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    wave = 0.5 + 0.35 * torch.sin(2 * math.pi * (x + y) / period)
    noise = 0.02 * torch.randn(size, size, generator=generator)
    return torch.stack([wave + noise, 0.6 * wave, 0.3 + 0.0 * wave]).clamp(0, 1)


def _noise(size: int, generator: torch.Generator) -> torch.Tensor:
    """Gray fine-grained uniform noise, (3, size, size)."""
    return torch.rand(1, size, size, generator=generator).expand(3, -1, -1).clone()


def _grain(size: int, sigma: tuple[float, float], generator: torch.Generator, tint: float = 0.0) -> torch.Tensor:
    """A stochastic texture: Gaussian noise blurred by (sigma_y, sigma_x) px, mean 0.5, spread 0.12, (3, size, size).

    Round grains (sand, gravel) for equal sigmas, streaks (grass, fur) for unequal ones; no two windows share
    their pixels, only their statistics.
    """
    import kornia

    pad = 12
    noise = torch.randn(1, 1, size + 2 * pad, size + 2 * pad, generator=generator)
    k = (2 * round(3 * max(sigma)) + 1,) * 2
    x = kornia.filters.gaussian_blur2d(noise, k, sigma)[0, :, pad:-pad, pad:-pad]
    x = 0.5 + 0.12 * (x - x.mean()) / x.std()
    return torch.cat([x + tint, x, x - tint]).clamp(0, 1)


def _width(clf: TextureClassifier) -> int:
    """How many values ``clf.features`` gives a window: named features and, with pair features, the descriptor."""
    return clf.features.num_features + clf.features.descriptor_size((clf.patch_size, clf.patch_size))


@pytest.fixture(scope="module")
def textures() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [_stripes(72, 7.0, generator), _noise(72, generator)]


@pytest.fixture(scope="module")
def trained(textures) -> tuple[TextureClassifier, dict]:
    return train_texture_classifier(textures, P, TINY, progress=False)


def test_separates_stripes_from_noise_and_pairs_noise_with_noise(trained, textures):
    clf, report = trained
    assert report["accuracy"] > 0.9 and report["roc_auc"] > 0.95
    assert report["num_holdout_pairs"] == round(TINY.num_pairs * TINY.holdout_fraction)
    assert clf.has_pair_features and len(clf.pair_feature_names) == 4
    assert report["num_parameters"] == 2 * len(clf.feature_names) + len(clf.pair_feature_names) + 1
    assert (clf.weight_diff <= 0).all()  # a difference only ever speaks against "same texture"
    assert (clf.weight_pair >= 0).all()  # agreement only ever speaks for it
    assert report["num_positive_texture"] > 0  # same-texture pairs without pixel correspondence were drawn
    # Fresh windows: same texture scores high, different textures low.
    stripes, noise = textures
    a, b = stripes[:, 5:5 + P, 9:9 + P], stripes[:, 40:40 + P, 30:30 + P]
    c = noise[:, 20:20 + P, 11:11 + P]
    with torch.no_grad():
        same, noise_pair = clf(torch.stack([a, c]), torch.stack([b, noise[:, 50:50 + P, 50:50 + P]]))
        cross = clf(a[None], c[None])
    # Stripes in phase can stand in for each other; stripes and noise cannot. Two windows of fine noise share
    # their statistics but not their pixels: the same texture all the same (the first classifier said no).
    assert same > 0.5 and cross < 0.5 and noise_pair > 0.5


def test_pair_scores_are_symmetric(trained, generator):
    clf, _ = trained
    a, b = torch.rand(2, 6, 3, P, P, generator=generator)
    with torch.no_grad():
        assert torch.equal(clf(a, b), clf(b, a))
    fa, fb = torch.randn(2, 4, 5, _width(clf), generator=generator)
    assert torch.equal(clf.pair_logits(fa, fb), clf.pair_logits(fb, fa))
    assert clf.pair_logits(fa, fb).shape == (4, 5)


def test_all_pairs_pattern_equals_the_broadcast(trained, generator):
    clf, _ = trained
    tiles = torch.randn(2, 5, 1, _width(clf), generator=generator)  # (B, T, 1, F + D)
    windows = torch.randn(2, 1, 30, _width(clf), generator=generator)  # (B, 1, N, F + D)
    expected = clf.pair_logits(tiles, windows)  # grad enabled: the plain broadcast
    with torch.no_grad():
        fast = clf.pair_logits(tiles, windows)
        swapped = clf.pair_logits(windows.transpose(1, 2), tiles.transpose(1, 2))  # (B, N, 1, F) x (B, 1, T, F)
    assert fast.shape == expected.shape == (2, 5, 30)
    # Random raw features are far outside the standardised range, so logits reach hundreds: float32 rounding.
    torch.testing.assert_close(fast, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(swapped, expected.transpose(1, 2), atol=1e-4, rtol=1e-4)


def test_similarity_map_matches_forward_on_windows(trained, textures):
    clf, _ = trained
    image = textures[0][:, :40, :36]
    patch = textures[1][:, :P, :P]
    stride = 4
    with torch.no_grad():
        scores = clf.similarity_map(patch, image, stride)
        nh, nw = (40 - P) // stride + 1, (36 - P) // stride + 1
        assert scores.shape == (nh, nw)
        windows = torch.stack([image[:, i * stride:i * stride + P, j * stride:j * stride + P]
                               for i in range(nh) for j in range(nw)])
        expected = clf(patch.expand(len(windows), -1, -1, -1), windows).view(nh, nw)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-4)


def test_training_is_deterministic_for_a_seed(textures):
    small = dataclasses.replace(TINY, num_pairs=96, steps=20)
    clf, report = train_texture_classifier(textures, P, small, progress=False)
    again, report_again = train_texture_classifier(textures, P, small, progress=False)
    assert torch.equal(clf.weight_diff, again.weight_diff) and torch.equal(clf.weight_prod, again.weight_prod)
    assert torch.equal(clf.feature_mean, again.feature_mean)
    assert report["roc_auc"] == report_again["roc_auc"]
    other, _ = train_texture_classifier(textures, P, dataclasses.replace(small, seed=1), progress=False)
    assert not torch.equal(clf.weight_diff, other.weight_diff)


def test_features_constant_in_the_data_get_zero_weights(textures):
    gray = [t.mean(0, keepdim=True) for t in textures]  # no colour: the chroma features are constant
    clf, _ = train_texture_classifier(gray, P, dataclasses.replace(TINY, num_pairs=96, steps=20), progress=False)
    chroma = [i for i, n in enumerate(clf.feature_names) if n.startswith("chroma")]
    assert torch.all(clf.weight_diff[chroma] == 0) and torch.all(clf.weight_prod[chroma] == 0)
    assert torch.all(clf.feature_std[chroma] == 1)


def test_weight_table_names_every_weight(trained):
    clf, _ = trained
    table = clf.weight_table()
    assert len(table) == 2 * len(clf.feature_names) + len(clf.pair_feature_names)
    assert table[0] == (f"{clf.feature_names[0]}|diff|", pytest.approx(clf.weight_diff[0].item()))
    assert table[1] == (f"{clf.feature_names[0]}*prod", pytest.approx(clf.weight_prod[0].item()))
    assert table[-4:] == [(f"pair:{name}", pytest.approx(w)) for name, w in
                          zip(clf.pair_feature_names, clf.weight_pair.tolist(), strict=True)]
    assert len({name for name, _ in table}) == len(table)


def test_pair_contributions_include_the_pair_features(trained, generator):
    clf, _ = trained
    a, b = torch.rand(2, 3, 3, P, P, generator=generator)
    fa, fb = clf.features(a), clf.features(b)
    terms = clf.pair_contributions(fa, fb)
    assert terms.shape == (3, len(clf.weight_table()))
    torch.testing.assert_close(terms.sum(-1), clf.pair_logits(fa, fb) - clf.bias, rtol=1e-5, atol=1e-5)
    expected = clf.standardize_pairs(clf.pair_features(fa, fb)) * clf.weight_pair
    torch.testing.assert_close(terms[:, -4:], expected)


def test_save_load_round_trip_gives_identical_scores(trained, tmp_path, generator):
    clf, report = trained
    folder = save_texture_classifier(clf, tmp_path / "clf")
    assert sorted(p.name for p in folder.iterdir()) == ["classifier.json", "classifier.safetensors"]
    loaded = load_texture_classifier(folder)
    a, b = torch.rand(2, 5, 3, P, P, generator=generator)
    with torch.no_grad():
        assert torch.equal(loaded(a, b), clf(a, b))
    assert loaded.feature_names == clf.feature_names and loaded.patch_size == P
    assert loaded.pair_feature_names == clf.pair_feature_names and torch.equal(loaded.pair_std, clf.pair_std)
    assert loaded.report["roc_auc"] == report["roc_auc"]
    assert load_texture_classifier(folder / "classifier.json").patch_size == P  # a file inside works too


def test_loaded_classifier_is_frozen_and_passes_gradients_to_inputs_only(trained, tmp_path, generator):
    loaded = load_texture_classifier(save_texture_classifier(trained[0], tmp_path / "clf"))
    assert not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    sr = torch.rand(2, 3, 32, 32, generator=generator, requires_grad=True)
    gt = torch.rand(2, 3, 32, 32, generator=generator)
    f_sr = loaded.features.window_features(sr, P, 8).permute(0, 2, 3, 1)  # (2, 3, 3, F)
    f_gt = loaded.features.window_features(gt, P, 8).permute(0, 2, 3, 1)
    loaded.pair_logits(f_sr, f_gt).sum().backward()
    assert sr.grad is not None and torch.isfinite(sr.grad).all() and sr.grad.abs().sum() > 0
    assert all(p.grad is None for p in loaded.parameters())


@pytest.mark.parametrize("damage", ["weights", "json", "names", "missing"])
def test_loading_a_damaged_classifier_raises_a_user_error(trained, tmp_path, damage):
    folder = save_texture_classifier(trained[0], tmp_path / "clf")
    if damage == "weights":
        (folder / "classifier.safetensors").write_bytes(b"\x00garbage" * 10)
    elif damage == "json":
        (folder / "classifier.json").write_text("{not json")
    elif damage == "names":
        meta = json.loads((folder / "classifier.json").read_text())
        meta["feature_names"] = meta["feature_names"][:-1]
        (folder / "classifier.json").write_text(json.dumps(meta))
    else:
        (folder / "classifier.safetensors").unlink()
    with pytest.raises(TextureClassifierError) as info:
        load_texture_classifier(folder)
    assert isinstance(info.value, UserError)


def test_a_version_2_classifier_without_pair_features_still_loads(tmp_path, generator):
    first = TextureClassifier(P, scales=(1, 2))  # the first kind: no pair features
    with torch.no_grad():
        first.weight_diff.copy_(-torch.rand(first.weight_diff.shape, generator=generator))
    folder = save_texture_classifier(first, tmp_path / "v2")
    meta = json.loads((folder / "classifier.json").read_text())
    for key in ("pair_features", "max_shift", "pair_feature_names"):  # as version 2 wrote it
        meta.pop(key)
    (folder / "classifier.json").write_text(json.dumps({**meta, "version": 2}))
    loaded = load_texture_classifier(folder)
    assert not loaded.has_pair_features and loaded.pair_feature_names == []
    a, b = torch.rand(2, 4, 3, P, P, generator=generator)
    with torch.no_grad():
        assert torch.equal(loaded(a, b), first(a, b))
    (folder / "classifier.json").write_text(json.dumps({**meta, "version": 1}))
    with pytest.raises(TextureClassifierError, match="version"):
        load_texture_classifier(folder)


def test_roc_auc_matches_pairwise_counting(generator):
    scores = torch.randint(0, 6, (60,), generator=generator).float()  # many ties
    labels = torch.rand(60, generator=generator) < 0.4
    pos, neg = scores[labels], scores[~labels]
    expected = ((pos[:, None] > neg[None]).float() + 0.5 * (pos[:, None] == neg[None]).float()).mean()
    assert roc_auc(scores, labels) == pytest.approx(expected.item())
    assert roc_auc(torch.tensor([0.1, 0.9]), torch.tensor([0, 1])) == 1.0
    assert math.isnan(roc_auc(torch.tensor([0.1, 0.9]), torch.tensor([1, 1])))


def test_plot_writes_a_file_and_draws_into_axes(trained, tmp_path):
    from matplotlib.figure import Figure

    clf, _ = trained
    path = plot_classifier_weights(clf, tmp_path / "w.png")
    assert path.is_file() and path.stat().st_size > 1000
    ax = Figure().subplots()
    assert plot_classifier_weights(clf, ax, top=5) is ax
    assert len(ax.get_yticklabels()) == 5


def test_ensure_trains_once_then_reuses_the_cache(textures, tmp_path):
    images = tmp_path / "images"
    for i, image in enumerate(textures):
        write_image(images / f"{i}.png", image)
    cfg = apply_overrides(Config(), {"data.train": str(images), "texture.classifier.num_pairs": 64,
                                     "texture.classifier.steps": 10})
    folder = ensure_texture_classifier(cfg, tmp_path / "cache")
    assert load_texture_classifier(folder).patch_size == cfg.texture.patch_size
    stamp = (folder / "classifier.safetensors").stat().st_mtime_ns
    assert ensure_texture_classifier(cfg, tmp_path / "cache") == folder
    assert (folder / "classifier.safetensors").stat().st_mtime_ns == stamp
    other = ensure_texture_classifier(apply_overrides(cfg, {"texture.classifier.seed": 3}), tmp_path / "cache")
    assert other != folder and other.parent == folder.parent
    given = apply_overrides(cfg, {"texture.classifier.path": str(folder)})
    assert ensure_texture_classifier(given, tmp_path / "unused") == folder
    with pytest.raises(UserError):
        ensure_texture_classifier(apply_overrides(cfg, {"texture.classifier.path": str(tmp_path)}), tmp_path)


def test_cli_train_then_show(textures, tmp_path, capsys):
    images = tmp_path / "images"
    for i, image in enumerate(textures):
        write_image(images / f"{i}.png", image)
    out = tmp_path / "clf"
    rc = main(["texture", "train", "--images", str(images), "--out", str(out), "--no-progress",
               "--set", "texture.classifier.num_pairs=64", "--set", "texture.classifier.steps=10"])
    printed = capsys.readouterr().out
    assert rc == 0 and "held-out (pairs) accuracy" in printed and "ROC AUC" in printed
    assert {p.name for p in out.iterdir()} == {"classifier.json", "classifier.safetensors", "weights.png"}
    assert main(["texture", "show", str(out), "--out", str(tmp_path / "plot.png")]) == 0
    printed = capsys.readouterr().out
    assert "grad_energy_s1_o0_mean|diff|" in printed and "pair:abs_ncc_best_shift" in printed
    assert (tmp_path / "plot.png").is_file()
    (out / "classifier.json").write_text("garbage")
    assert main(["texture", "show", str(out)]) == 2


def test_too_small_patch_size_is_a_config_error(textures):
    from xswinir.config import ConfigError

    with pytest.raises(ConfigError, match="texture.classifier.scales"):
        train_texture_classifier(textures, 8, TINY, progress=False)


@pytest.mark.slow
def test_skimage_train_reaches_a_sensible_auc():
    from xswinir.texture.training import load_training_images

    clf, report = train_texture_classifier(load_training_images("skimage:train"), 16, ClassifierConfig(),
                                           progress=False)
    # "Same texture" includes windows of one texture without pixel correspondence, a harder question than the
    # first classifier's (0.9 there); measured: AUC 0.86, accuracy 0.76, same-texture positives 0.73, rankings 0.95.
    assert report["roc_auc"] > 0.8 and report["accuracy"] > 0.7
    assert report["roc_auc_texture"] > 0.65 and report["rank_accuracy"] > 0.9


def test_training_images_are_capped_spread_and_cropped(tmp_path, generator):
    from xswinir.texture.training import MAX_IMAGE_SIDE, load_training_images

    for i in range(5):
        write_image(tmp_path / f"{i}.png", torch.full((3, 24, 40), i / 10))
    write_image(tmp_path / "5.png", torch.rand(1, 20, MAX_IMAGE_SIDE + 30, generator=generator))
    images = load_training_images(str(tmp_path), max_images=3)
    assert [round(img.mean().item(), 2) for img in images[:2]] == [0.0, 0.2]  # files 0, 2, 4 of 6
    assert len(images) == 3 and all(img.shape[0] == 3 for img in images)
    assert load_training_images(str(tmp_path), max_images=10)[-1].shape == (3, 20, MAX_IMAGE_SIDE)
    assert len(load_training_images(str(tmp_path))) == 6


def test_ensure_reads_parquet_shards(textures, tmp_path):
    from xswinir.shards import pack_images

    images = tmp_path / "images"
    for i, image in enumerate(textures):
        write_image(images / f"{i}.png", image)
    pack_images(images, tmp_path / "shards")
    cfg = apply_overrides(Config(), {"data.train": str(tmp_path / "shards"), "texture.classifier.num_pairs": 64,
                                     "texture.classifier.steps": 10})
    folder = ensure_texture_classifier(cfg, tmp_path / "cache")
    assert load_texture_classifier(folder).report["num_images"] == 2


def test_pairs_overlap_no_more_than_the_search_allows():
    from xswinir.texture.training import _overlap_iou

    dy, dx = torch.tensor([0, 0, 8, 16, 13, 3]), torch.tensor([0, 16, 8, 0, 2, 15])
    boxes_a = torch.tensor([[0, 0, 16, 16]]).expand(6, 4)
    boxes_b = torch.stack([dy, dx, dy + 16, dx + 16], dim=1)
    h = (torch.minimum(boxes_a[:, 2], boxes_b[:, 2]) - torch.maximum(boxes_a[:, 0], boxes_b[:, 0])).clamp_min(0)
    w = (torch.minimum(boxes_a[:, 3], boxes_b[:, 3]) - torch.maximum(boxes_a[:, 1], boxes_b[:, 1])).clamp_min(0)
    inter = (h * w).double()
    torch.testing.assert_close(_overlap_iou(dy, dx, 16), inter / (512 - inter))


def test_held_out_auc_is_on_images_the_fit_never_saw(generator):
    # Six images, two held out (holdout_fraction 1/3): the report says so and has an AUC for both query kinds.
    images = [_stripes(64, period, generator) for period in (5.0, 7.0, 9.0)] + [
        _noise(64, generator) for _ in range(3)]

    def blur(image: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return torch.nn.functional.avg_pool2d(image, 2)

    cfg = dataclasses.replace(TINY, holdout_fraction=1 / 3, steps=30)
    clf, report = train_texture_classifier(images, P, cfg, progress=False, degrade=blur)
    assert report["holdout"] == "images" and report["num_images"] == 6
    assert report["num_holdout_pairs"] == round(cfg.num_pairs * cfg.holdout_fraction)
    assert 0.5 < report["roc_auc"] <= 1 and 0.5 < report["roc_auc_lq"] <= 1
    assert report["num_negative_nearby"] > 0
    _, few = train_texture_classifier(images[:3], P, cfg, progress=False)
    assert few["holdout"] == "pairs" and few["roc_auc_lq"] is None


def test_a_stochastic_texture_gets_partners(generator):
    # Fresh samples of the stochastic textures the classifier was trained on (fine noise, streaks): every patch
    # should find windows of the same texture elsewhere, although no window correlates with it. The first
    # classifier (partners defined by pixel correlation) found none: "no window above min_score".
    images = [_stripes(72, 7.0, generator), _noise(72, generator), _grain(72, (0.6, 2.5), generator)]
    clf, _ = train_texture_classifier(images, P, TINY, progress=False)
    search = TextureSearch(clf, stride=4, top_k=3, min_score=0.5, max_iou=0.0, ridge=1e-3, query="gt",
                           region_size=None)
    fresh = torch.Generator().manual_seed(5)
    for texture in (_noise(64, fresh), _grain(64, (0.6, 2.5), fresh)):
        match = search(texture[None])
        partnered = match.valid.any(-1)
        assert partnered.float().mean() >= 0.9
        # ... honestly: the windows share the texture, not the pixels, so they explain little of each patch.
        assert match.tile_r2[partnered].mean() < 0.5
    # Stripes still pair with stripes that can stand in for them.
    assert search(_stripes(64, 7.0, fresh)[None]).tile_r2.mean() > 0.8


def test_held_out_auc_on_tiny_synthetic_textures_is_above_a_floor(generator):
    # Ten textures, three held out by image: repeated structure (stripes) and stochastic grain of several kinds.
    # (Measured over seeds 0-3: AUC 0.92-0.93, same-texture positives 0.84-0.86, rankings 0.98-0.99.)
    images = [_stripes(80, period, generator) for period in (5.0, 7.0, 11.0)] + [
        _grain(80, sigma, generator, tint) for sigma, tint in (((0.6, 0.6), 0.0), ((1.5, 1.5), 0.05),
                                                               ((0.5, 2.5), 0.0), ((2.5, 0.5), 0.1),
                                                               ((1.0, 1.0), -0.05), ((0.6, 1.6), 0.05),
                                                               ((1.6, 0.6), -0.1))]
    cfg = dataclasses.replace(TINY, num_pairs=768, holdout_fraction=0.3, steps=80)
    clf, report = train_texture_classifier(images, P, cfg, progress=False)
    assert report["holdout"] == "images" and report["num_positive_texture"] > 0
    assert report["roc_auc"] > 0.85 and report["roc_auc_texture"] > 0.75
    assert report["rank_accuracy"] > 0.9  # the window that explains more of the patch is ranked first
