"""Trust maps: the linear fit, the conformal bound, the trust file, ``xswinir trust`` / ``upscale --trust`` and the
benchmark's quick mode, with tiny real parts."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import kornia
import pytest
import torch

from tests.test_explain import textured_image, tiny_classifier
from xswinir.checkpoint import save_weights
from xswinir.cli import main
from xswinir.config import TextureConfig
from xswinir.explain import consistency_map, upsample_input
from xswinir.images import read_image, write_image
from xswinir.model import build_swinir
from xswinir.texture import TextureClassifier, TextureSearch, save_texture_classifier
from xswinir.trust import (
    ENSEMBLE_SIGNAL,
    SIGNALS,
    PatchSample,
    TrustError,
    blur_sigma,
    conformal_quantile,
    estimate_trust,
    fit_linear,
    fit_trust,
    heatmap,
    load_trust,
    measure_signals,
    noise_sigma,
    patch_error,
    save_trust,
    split_images,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def synthetic_sample(n: int, weights: torch.Tensor, generator: torch.Generator, patches_per_image: int = 50,
                     noise: float = 0.3) -> PatchSample:
    """Patches whose ``ln(1 + error)`` is linear in named signals plus exchangeable noise."""
    S = len(weights)
    signals = torch.randn(n, S, generator=generator) * torch.linspace(0.5, 3.0, S) + torch.arange(S)
    log_error = 1.0 + signals @ weights + noise * torch.randn(n, generator=generator)
    names = SIGNALS[:S]
    image = torch.arange(n) // patches_per_image
    return PatchSample(names, signals, log_error.exp() - 1, image, [f"img{i}" for i in range(int(image[-1]) + 1)])


def test_fit_linear_recovers_known_weights(generator):
    X = torch.randn(4000, 4, generator=generator) * torch.tensor([1.0, 5.0, 0.1, 2.0]) + torch.tensor([3.0, -1, 0, 7])
    true_w, true_b = torch.tensor([0.5, -0.2, 4.0, 0.0]), 1.5
    y = X @ true_w + true_b + 0.01 * torch.randn(4000, generator=generator)
    weights, bias, mean, std = fit_linear(X, y, ridge=0.0)
    torch.testing.assert_close(weights / std, true_w, atol=0.01, rtol=0.01)  # per unit of each signal
    torch.testing.assert_close(bias - float((weights / std) @ mean), true_b, atol=0.02, rtol=0)
    # A constant signal gets weight 0 instead of a singular system; the ridge shrinks the weights.
    X[:, 3] = 2.0
    weights, _, _, std = fit_linear(X, y, ridge=0.0)
    assert float(weights[3]) == 0.0 and float(std[3]) == 1.0
    shrunk, _, _, _ = fit_linear(X, y, ridge=10.0)
    assert float(shrunk.norm()) < 0.2 * float(weights.norm())


def test_conformal_quantile_is_the_finite_sample_rank():
    residuals = torch.arange(1.0, 11.0)  # 1..10
    assert conformal_quantile(residuals, 0.5) == 6.0  # ceil(11 * 0.5) = 6th smallest
    assert conformal_quantile(residuals, 0.9) == 10.0
    assert math.isinf(conformal_quantile(residuals[:5], 0.9))  # ceil(6 * 0.9) = 6 > 5: no finite bound
    with pytest.raises(TrustError):
        conformal_quantile(residuals, 1.0)


def test_bound_covers_the_stated_share_on_new_exchangeable_data(generator):
    weights = torch.tensor([0.3, -0.1, 0.05])
    sample = synthetic_sample(6000, weights, generator)
    fit_ids, cal_ids = split_images(len(sample.image_names), 0.5, seed=0)
    assert not set(fit_ids) & set(cal_ids) and len(fit_ids) + len(cal_ids) == len(sample.image_names)
    search = TextureSearch.from_config(TextureConfig(), TextureClassifier(16, scales=(1, 2)))
    trust = fit_trust(sample, fit_ids, cal_ids, search=search, scale=2, coverage=0.9)
    torch.testing.assert_close(torch.tensor(trust.weights) / torch.tensor(trust.signal_std), weights, atol=0.02,
                               rtol=0)
    fresh = synthetic_sample(20000, weights, generator)
    z = trust.log_error(fresh.signals)
    coverage = float((fresh.error <= (z + trust.quantile).exp() - 1).float().mean())
    assert abs(coverage - 0.9) < 0.02
    # The expected error is the mean: Duan's smearing corrects exp(E[ln]) for the spread of the residuals.
    expected = z.exp() * trust.smear - 1
    assert abs(float(expected.mean() / fresh.error.mean()) - 1) < 0.03
    assert abs(trust.report["calibration_coverage"] - 0.9) < 0.03


def test_trust_file_round_trip(tmp_path, generator):
    sample = synthetic_sample(600, torch.tensor([0.3, -0.1]), generator)
    clf = tiny_classifier(textured_image(generator))
    search = TextureSearch.from_config(TextureConfig(top_k=3, min_score=0.6), clf)
    trust = fit_trust(sample, *split_images(len(sample.image_names), 0.3, 0), search=search, scale=2)
    path = save_trust(trust, tmp_path / "trust.json")
    back = load_trust(path)
    for name in ("signal_names", "signal_mean", "signal_std", "weights", "bias", "smear", "quantile", "coverage",
                 "patch_size", "scale", "search", "display_max", "report"):
        assert getattr(back, name) == getattr(trust, name), name
    assert json.loads(path.read_text())["signal_names"] == ["log_input_std", "log_output_std"]  # readable by name
    loaded = back.load_search()
    assert (loaded.top_k, loaded.min_score) == (3, 0.6)
    for key, value in clf.state_dict().items():
        torch.testing.assert_close(loaded.classifier.state_dict()[key], value)
    (tmp_path / "bad.json").write_text('{"format": "something else"}')
    with pytest.raises(TrustError, match="not a trust file"):
        load_trust(tmp_path / "bad.json")
    with pytest.raises(TrustError, match="does not exist"):
        load_trust(tmp_path / "missing.json")


def test_signals_are_named_per_patch_and_the_map_follows_them(generator):
    gt = textured_image(generator, 64)
    lq = torch.nn.functional.avg_pool2d(gt[None], 2)[0]
    search = TextureSearch.from_config(TextureConfig(region_size=32), tiny_classifier(gt))
    ensemble = torch.stack([gt + 0.01 * i for i in range(8)]).clamp(0, 1)
    signals = measure_signals(search, lq, gt, ensemble=ensemble)
    assert signals.names == (*SIGNALS, ENSEMBLE_SIGNAL)
    assert signals.values.shape == (4, 4, len(SIGNALS) + 1)
    assert signals["log_input_std"][0].min() > signals["log_input_std"][3, 3]  # stripes vs the flat corner
    assert float(signals["partners"].max()) <= 5 and float(signals["partner_score"].max()) <= 1
    up = upsample_input(lq, 2)
    torch.testing.assert_close(signals["consistency_r2"], consistency_map(search, gt, up))  # the map's own r²
    assert torch.all(signals["log_input_noise"] == signals["log_input_noise"][0, 0])  # one value per image
    # Immerkær's estimate finds added white noise (sigma 10 on 0-255) on a smooth ramp.
    ramp = torch.linspace(0, 1, 128).expand(3, 128, 128).clone()
    noisy = ramp + torch.randn(1, 128, 128, generator=generator) * 10 / 255
    assert abs(noise_sigma(noisy) - 10.0 * (65.481 + 128.553 + 24.966) / 255) < 1.5
    assert patch_error(gt, gt, 16).abs().max() == 0
    # The edge-width blur estimate finds a Gaussian blur of a step edge, also under that noise.
    edge = torch.zeros(1, 3, 64, 64)
    edge[..., 32:] = 0.8
    for sigma in (2.0, 3.0):
        blurred = kornia.filters.gaussian_blur2d(edge, (25, 25), (sigma, sigma), border_type="replicate")[0]
        assert abs(blur_sigma(blurred) - sigma) < 0.3
        assert abs(blur_sigma(blurred + torch.randn(1, 64, 64, generator=generator) * 10 / 255) - sigma) < 0.3
    assert blur_sigma(edge[0]) < 1.0


def make_parts(tmp_path: Path, generator: torch.Generator, tiny_config) -> dict[str, Path]:
    images = tmp_path / "train"
    for i in range(5):
        write_image(images / f"t{i}.png", textured_image(generator, 64).roll(8 * i, dims=-1))
    save_texture_classifier(tiny_classifier(textured_image(generator)), tmp_path / "clf")
    torch.manual_seed(0)
    cfg = tiny_config().model
    save_weights(build_swinir(cfg), cfg, tmp_path / "model.safetensors")
    write_image(tmp_path / "photo.png", textured_image(generator, 40)[:, :40, :36])
    return {"images": images, "classifier": tmp_path / "clf", "model": tmp_path / "model.safetensors",
            "photo": tmp_path / "photo.png"}


def test_cli_fit_show_and_upscale_trust(tmp_path, generator, tiny_config, capsys):
    parts = make_parts(tmp_path, generator, tiny_config)
    trust_file = tmp_path / "trust.json"
    assert main(["trust", "fit", "--checkpoint", str(parts["model"]), "--classifier", str(parts["classifier"]),
                 "--images", str(parts["images"]), "--degradation", "blur-noise", "--crop", "64",
                 "--out", str(trust_file), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "log_input_noise" in out and "wrote" in out
    assert main(["trust", "show", str(trust_file)]) == 0
    shown = capsys.readouterr().out
    assert all(name in shown for name in SIGNALS) and "bound" in shown

    out_dir = tmp_path / "out"
    assert main(["upscale", str(parts["photo"]), "--checkpoint", str(parts["model"]), "--trust", str(trust_file),
                 "--out", str(out_dir), "--device", "cpu"]) == 0
    restored = read_image(out_dir / "photo_x2.png")
    assert restored.shape[-2:] == (80, 72)
    heat = read_image(out_dir / "photo_x2_trust.png")
    assert heat.shape[-2:] == restored.shape[-2:]
    with open(out_dir / "photo_x2_trust.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["top", "left", "bottom", "right", "expected_error", "bound"]
    assert len(rows) == (80 // 16) * (72 // 16)  # whole 16 px patches of the 80 x 72 output, row-major
    assert [(int(r["top"]), int(r["left"])) for r in rows[:5]] == [(0, 0), (0, 16), (0, 32), (0, 48), (16, 0)]
    assert all(int(r["bottom"]) - int(r["top"]) == 16 and float(r["bound"]) >= 0 for r in rows)


def test_cli_trust_errors_are_one_line(tmp_path, generator, tiny_config, capsys):
    parts = make_parts(tmp_path, generator, tiny_config)
    assert main(["trust", "show", str(tmp_path / "none.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["trust", "fit", "--checkpoint", str(parts["model"]), "--images", str(parts["images"]),
                 "--out", str(tmp_path / "t.json")]) == 2
    assert "no texture classifier" in capsys.readouterr().err


def test_estimate_needs_the_fitted_scale(generator):
    sample = synthetic_sample(600, torch.tensor([0.3, -0.1]), generator)
    search = TextureSearch.from_config(TextureConfig(), tiny_classifier(textured_image(generator)))
    trust = fit_trust(sample, *split_images(len(sample.image_names), 0.3, 0), search=search, scale=4)
    gt = textured_image(generator, 32)
    with pytest.raises(TrustError, match="x4"):
        estimate_trust(trust, search, gt[:, ::2, ::2], gt)


def test_heatmap_fills_whole_patches_and_leaves_the_strip_black(generator):
    sample = synthetic_sample(600, torch.tensor([0.3, -0.1]), generator)
    gt = textured_image(generator, 48)[:, :40, :36]
    search = TextureSearch.from_config(TextureConfig(region_size=32), tiny_classifier(textured_image(generator)))
    signals = measure_signals(search, gt[:, ::2, ::2], gt)
    trust = fit_trust(sample, *split_images(len(sample.image_names), 0.3, 0), search=search, scale=2,
                      signal_names=("log_input_std", "log_output_std"))
    trust_map = trust.predict(signals, (40, 36))
    picture = heatmap(trust_map, (40, 36), vmax=trust.display_max)
    assert picture.shape == (3, 40, 36)
    assert picture[:, 32:].abs().max() == 0 and picture[:, :, 32:].abs().max() == 0  # beyond 2 x 2 patches
    assert picture[:, :32, :32].max() > 0
    assert trust_map.rows((80, 72))[1][:4] == (0, 32, 32, 64)  # boxes in the pixels of a resized output


def test_bench_quick_runs(tmp_path, generator, tiny_config, monkeypatch, capsys):
    from bench import bench_trust

    parts = make_parts(tmp_path, generator, tiny_config)
    result, plot = tmp_path / "bench.json", tmp_path / "reliability.png"
    monkeypatch.setattr(sys, "argv", [
        "bench_trust", "--quick", "--checkpoint", str(parts["model"]), "--classifier", str(parts["classifier"]),
        "--sets", f"A={parts['images']},B={parts['images']}", "--fit-images", str(parts["images"]),
        "--json", str(result), "--plot", str(plot), "--device", "cpu"])
    assert bench_trust.main() == 0
    record = json.loads(result.read_text())
    assert {(row["set"], row["score"]) for row in record["rows"]} == {
        (s, score) for s in "AB" for score in ("trust", "input_std", "output_std", "ensemble_spread", "1-r2")}
    assert all(0 <= row["coverage"] <= 1 for row in record["rows"] if row["score"] == "trust")
    assert plot.stat().st_size > 0
    assert "goal" in capsys.readouterr().out
