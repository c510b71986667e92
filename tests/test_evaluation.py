"""xswinir.evaluation: the engine and its callers (test sets, the study, validation, the demo), seeded degraded
inputs, the texture metrics, several sets, and the printed table."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from xswinir.cli import main
from xswinir.config import MODEL_PRESETS
from xswinir.evaluation import evaluate, evaluate_model, format_table
from xswinir.images import read_image
from xswinir.inference import bicubic_upscale
from xswinir.metrics import EVAL_METRICS, LPIPS, MS_SSIM_Y, SCC_Y, load_lpips, ms_ssim, ms_ssim_scales, scc
from xswinir.model import build_swinir


def _write_rgb(path: Path, generator: torch.Generator, size: tuple[int, int]) -> Path:
    """A smooth random image (blurry noise), so that blur and noise change it measurably."""
    h, w = size
    coarse = torch.rand(1, 3, h // 4 + 1, w // 4 + 1, generator=generator)
    image = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((image * 255).round().byte().permute(1, 2, 0).numpy()).save(path)
    return path


@pytest.fixture
def hr_dir(tmp_path: Path, generator: torch.Generator) -> Path:
    for name, size in (("a", (48, 40)), ("b", (32, 36)), ("c", (64, 64))):
        _write_rgb(tmp_path / "hr" / f"{name}.png", generator, size)
    return tmp_path / "hr"


@pytest.fixture
def no_lpips(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A torch hub cache without the AlexNet weights, and a fresh LPIPS lookup before and after."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    load_lpips.cache_clear()
    yield tmp_path / "torch_home" / "hub"
    load_lpips.cache_clear()


class Recorder(nn.Module):
    """Bicubic up-sampling that keeps every input it is given."""

    upscale = 2
    in_chans = 3

    def __init__(self) -> None:
        super().__init__()
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.clone())
        return bicubic_upscale(x, 2)


def _inputs(files: list[Path], seed: int, save_lq: Path | None = None) -> dict[str, torch.Tensor]:
    recorder = Recorder()
    rows = evaluate(files, model=recorder, degradation="blur-noise", seed=seed, save_lq=save_lq, lpips=False)
    return {row["image"]: x for row, x in zip(rows, recorder.inputs, strict=True)}


def test_same_seed_same_inputs_in_any_order(hr_dir: Path, tmp_path: Path, no_lpips: Path) -> None:
    files = sorted(hr_dir.glob("*.png"))
    first = _inputs(files, seed=7)
    again = _inputs(files, seed=7)
    reversed_order = _inputs(files[::-1], seed=7)
    alone = _inputs([files[1]], seed=7)
    other_seed = _inputs(files, seed=8)
    assert list(first) == ["a", "b", "c"] and list(reversed_order) == ["c", "b", "a"]
    for name, lq in first.items():
        assert lq.shape[-2:] == (read_image(hr_dir / f"{name}.png").shape[-2] // 2,
                                 read_image(hr_dir / f"{name}.png").shape[-1] // 2)
        assert torch.equal(lq, again[name]) and torch.equal(lq, reversed_order[name])
        assert torch.equal(lq * 255, (lq * 255).round())  # on the 8-bit grid, as a PNG
        assert not torch.equal(lq, other_seed[name])
    assert torch.equal(alone["b"], first["b"])


def test_save_lq_files_are_the_inputs_used(hr_dir: Path, tmp_path: Path, no_lpips: Path) -> None:
    inputs = _inputs(sorted(hr_dir.glob("*.png")), seed=0, save_lq=tmp_path / "lq")
    assert sorted(p.name for p in (tmp_path / "lq").iterdir()) == ["a.png", "b.png", "c.png"]
    for name, lq in inputs.items():
        assert torch.equal(read_image(tmp_path / "lq" / f"{name}.png")[None], lq)


def test_evaluate_model_tiny_swinir_and_baseline(hr_dir: Path, tmp_path: Path, no_lpips: Path) -> None:
    torch.manual_seed(0)
    model = build_swinir(MODEL_PRESETS["tiny-x2"]).train()
    rows = evaluate_model(model, str(hr_dir), 2, seed=1, save_lq=tmp_path / "lq")
    assert model.training  # the caller's mode is restored
    baseline = evaluate_model(None, str(hr_dir), 2, seed=1, save_lq=tmp_path / "lq_baseline")
    assert [r["image"] for r in rows] == [r["image"] for r in baseline] == ["a", "b", "c"]
    for row in rows + baseline:
        assert row["set"] == str(hr_dir)
        assert all(isinstance(row[k], float) for k in EVAL_METRICS if k != LPIPS)
        assert row[LPIPS] is None and 0 <= row[MS_SSIM_Y] <= 1 and row[SCC_Y] <= 1
    for name in ("a", "b", "c"):  # both saw the same inputs
        assert (tmp_path / "lq" / f"{name}.png").read_bytes() == (tmp_path / "lq_baseline" / f"{name}.png").read_bytes()
    # The baseline of the seeded inputs is bicubic up-sampling of exactly those inputs.
    gt = read_image(hr_dir / "c.png")[None]
    lq = read_image(tmp_path / "lq" / "c.png")[None]
    sr = bicubic_upscale(lq, 2).clamp(0, 1)
    from xswinir.metrics import psnr

    assert baseline[2]["psnr_y"] == pytest.approx(float(psnr(sr, gt, 2, y_channel=True)[0]), abs=1e-9)


def test_evaluate_model_denoising_upscale_1(hr_dir: Path, no_lpips: Path) -> None:
    cfg = dataclasses.replace(MODEL_PRESETS["tiny-x2"], upscale=1, upsampler="")
    rows = evaluate_model(build_swinir(cfg), str(hr_dir / "c.png"), 1, degradation="blur-noise")
    baseline = evaluate_model(None, str(hr_dir / "c.png"), 1)  # the noisy input itself
    assert rows[0]["scale"] == baseline[0]["scale"] == 1 and (rows[0]["height"], rows[0]["width"]) == (64, 64)
    assert math.isfinite(rows[0]["psnr_y"]) and math.isfinite(baseline[0]["psnr_y"])


def test_tiny_images_are_skipped_with_a_reason(hr_dir: Path, generator: torch.Generator, no_lpips: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    _write_rgb(hr_dir / "tiny.png", generator, (14, 30))
    with caplog.at_level(logging.WARNING, logger="xswinir.evaluation"):
        rows = evaluate_model(None, str(hr_dir), 2)
    assert [r["image"] for r in rows] == ["a", "b", "c"]
    assert "skipping tiny.png" in caplog.text and "SSIM window" in caplog.text


def test_lpips_without_weights_is_na_and_said_once(hr_dir: Path, tmp_path: Path, no_lpips: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="xswinir.metrics"):
        rows = evaluate(hr_dir, scale=2)
        rows += evaluate(hr_dir, scale=2)
    assert all(r[LPIPS] is None for r in rows)
    lines = [r.message for r in caplog.records if "LPIPS n/a" in r.message]
    assert len(lines) == 1 and str(no_lpips / "checkpoints" / "alexnet-owt-7be5be79.pth") in lines[0]
    assert "TORCH_HOME" in lines[0]
    assert format_table(rows[:3]).splitlines()[-1].split()[-2] == "n/a"  # the LPIPS cell of the mean row


def test_ms_ssim_and_scc_of_an_image_with_itself(generator: torch.Generator) -> None:
    for size, scales in ((200, 5), (64, 3), (24, 2)):
        x = torch.rand(2, 3, size, size, generator=generator)
        assert ms_ssim_scales(size, size) == scales
        torch.testing.assert_close(ms_ssim(x, x, y_channel=True), torch.ones(2, dtype=torch.float64))
        torch.testing.assert_close(scc(x, x, y_channel=True), torch.ones(2, dtype=torch.float64))
        noisy = (x + 0.05 * torch.randn(x.shape, generator=generator)).clamp(0, 1)
        assert (ms_ssim(noisy, x, y_channel=True) < 0.999).all() and (scc(noisy, x, y_channel=True) < 0.99).all()
    assert ms_ssim_scales(176, 300) == 5 and ms_ssim_scales(175, 300) == 4 and ms_ssim_scales(11, 11) == 1
    assert ms_ssim_scales(10, 40) == 0
    assert torch.isnan(ms_ssim(torch.rand(1, 1, 10, 10), torch.rand(1, 1, 10, 10))).all()


def test_ms_ssim_matches_float64_torchmetrics(generator: torch.Generator) -> None:
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

    gt = torch.randint(0, 256, (1, 1, 180, 180), generator=generator).double()
    sr = (gt + 20 * torch.randn(gt.shape, generator=generator, dtype=torch.float64)).round().clamp(0, 255)
    reference = multiscale_structural_similarity_index_measure(sr, gt, data_range=255.0, reduction="none")
    torch.testing.assert_close(ms_ssim(sr / 255, gt / 255), reference, atol=1e-5, rtol=0)


def test_cli_several_sets_degraded(hr_dir: Path, tmp_path: Path, generator: torch.Generator, no_lpips: Path,
                                   capsys: pytest.CaptureFixture) -> None:
    other = tmp_path / "other"
    _write_rgb(other / "d.png", generator, (40, 40))
    out = tmp_path / "res.csv"
    args = ["eval", "--hr", str(hr_dir), "--hr", str(other), "--scale", "2", "--bicubic", "--degradation",
            "blur-noise", "--seed", "3", "--save-lq", str(tmp_path / "lq"), "--device", "cpu"]
    assert main([*args, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"{hr_dir} (3 images)" in printed and f"{other} (1 images)" in printed and "all sets" in printed
    assert "MS-SSIM-Y" in printed and "degradation 'blur-noise' seed 3" in printed
    lines = [line.split(",") for line in out.read_text().splitlines()]
    header = lines[0]
    assert header[:1 + len(EVAL_METRICS)] == ["image", *EVAL_METRICS] and "set" in header
    table = [(row[0], row[header.index("set")]) for row in lines[1:]]
    assert table == [("a", str(hr_dir)), ("b", str(hr_dir)), ("c", str(hr_dir)), ("average", str(hr_dir)),
                     ("d", str(other)), ("average", str(other)), ("average", "all")]
    assert all(row[header.index(LPIPS)] == "n/a" for row in lines[1:])
    folders = sorted((tmp_path / "lq").iterdir())  # one per set, named after its source
    assert [sorted(p.name for p in f.iterdir()) for f in folders] == [["a.png", "b.png", "c.png"], ["d.png"]]

    # JSON: a mean per set; the same seed gives the same numbers.
    assert main([*args, "--out", str(tmp_path / "res.json")]) == 0
    result = json.loads((tmp_path / "res.json").read_text())
    assert set(result["sets"]) == {str(hr_dir), str(other)} and result["seed"] == 3
    assert [r["set"] for r in result["images"]].count(str(hr_dir)) == 3
    assert result["images"][0]["psnr_y"] == pytest.approx(float(lines[1][header.index("psnr_y")]))
    assert result["images"][0][LPIPS] is None


def test_cli_degradation_clashes_are_one_line_errors(hr_dir: Path, capsys: pytest.CaptureFixture) -> None:
    base = ["eval", "--hr", str(hr_dir), "--scale", "2", "--bicubic"]
    assert main([*base, "--degradation", "blur-noise", "--lr", str(hr_dir)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--degradation and --lr are mutually exclusive" in err
    assert main([*base, "--seed", "1"]) == 2
    assert "--seed only applies with --degradation" in capsys.readouterr().err
    assert main([*base, "--degradation", "blurry"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown degradation 'blurry'" in err and "blur-noise" in err


def test_lpips_with_weights_on_disk(hr_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    caplog: pytest.LogCaptureFixture) -> None:
    """The weights file is only looked for; random AlexNet weights stand in for its content (no download)."""
    import torchvision
    import torchvision.models._api

    checkpoints = tmp_path / "torch_home" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "alexnet-owt-7be5be79.pth").write_bytes(b"stand-in")
    random_weights = torchvision.models.alexnet(weights=None).state_dict()
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", lambda *args, **kwargs: random_weights)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    load_lpips.cache_clear()
    try:
        metric = load_lpips()
        assert metric is not None
        from xswinir.metrics import lpips

        x = read_image(hr_dir / "c.png")[None]
        torch.testing.assert_close(lpips(x, x, metric), torch.zeros(1, dtype=torch.float64))
        assert float(lpips(x, torch.flip(x, dims=(-1,)), metric)[0]) > 0
        with caplog.at_level(logging.WARNING, logger="xswinir.evaluation"):
            rows = evaluate(hr_dir, scale=2)
        assert rows[0][LPIPS] > 0 and rows[2][LPIPS] > 0
        assert math.isnan(rows[1][LPIPS])  # b is 28x32 after cropping: too small for AlexNet
        assert "lpips of b is NaN: 32x28 after cropping, AlexNet needs 31 px" in caplog.text
    finally:
        load_lpips.cache_clear()


def test_tiled_metrics_equal_whole_image_metrics(generator: torch.Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    """Metrics run in tiles (bounded memory): tiny tiles must give the whole-image values, and MS-SSIM and
    SCC still match torchmetrics (the reference the columns are documented against)."""
    from torchmetrics.functional.image import (
        multiscale_structural_similarity_index_measure,
        spatial_correlation_coefficient,
    )

    import xswinir.metrics as metrics

    gt = torch.rand(1, 3, 33, 29, generator=generator)
    sr = (gt + 0.1 * torch.randn(gt.shape, generator=generator)).clamp(0, 1)
    whole = {name: getattr(metrics, name)(sr, gt, 2, y_channel=True) for name in ("psnr", "ssim", "ms_ssim", "scc")}
    whole["ssim_rgb"] = metrics.ssim(sr, gt, 2)
    y_sr, y_gt = (metrics.rgb_to_y(torch.round(x[..., 2:-2, 2:-2].double() * 255) / 255).float() / 255
                  for x in (sr, gt))
    reference_ms = multiscale_structural_similarity_index_measure(
        y_sr, y_gt, data_range=1.0, betas=tuple(b / sum(metrics.MS_SSIM_BETAS[:2]) for b in metrics.MS_SSIM_BETAS[:2]),
        reduction="none")
    torch.testing.assert_close(whole["ms_ssim"], reference_ms.double(), atol=1e-6, rtol=0)
    reference_scc = spatial_correlation_coefficient(y_sr, y_gt, window_size=8, reduction="none")
    torch.testing.assert_close(whole["scc"], reference_scc.double(), atol=1e-6, rtol=0)
    monkeypatch.setattr(metrics, "METRIC_TILE", 9)
    tiled = {name: getattr(metrics, name)(sr, gt, 2, y_channel=True) for name in ("psnr", "ssim", "ms_ssim", "scc")}
    tiled["ssim_rgb"] = metrics.ssim(sr, gt, 2)
    for name, value in whole.items():
        torch.testing.assert_close(tiled[name], value, atol=1e-6, rtol=0)


def test_unreadable_and_tiny_images_are_skipped_and_named(hr_dir: Path, generator: torch.Generator,
                                                          no_lpips: Path) -> None:
    (hr_dir / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    for side in (1, 2, 4, 6):
        _write_rgb(hr_dir / f"tiny{side}.png", generator, (side, side))
    for scale in (2, 3, 4):
        skipped: list[str] = []
        rows = evaluate(hr_dir, scale=scale, skipped=skipped)
        assert [r["image"] for r in rows] == ["a", "b", "c"]
        assert len(skipped) == 5 and "broken.png: not a readable image" in skipped[0]
        assert all(f"tiny{side}.png: too small to measure at x{scale}" in "\n".join(skipped) for side in (1, 2, 4, 6))


def test_format_table_prints_long_names_whole_and_aligned() -> None:
    names = [f"Canon5D2_5_160_3200_{thing}_11" for thing in ("chair", "desk", "lamp", "plant", "shelf")]
    rows = [{"image": name, "set": "RealSR", **dict.fromkeys(EVAL_METRICS, 30.0 + i), "seconds": 0.5}
            for i, name in enumerate(names)]
    lines = format_table(rows).splitlines()
    shown = [line.split()[0] for line in lines[3:8]]
    assert shown == names  # each whole, so five different names print as five different names
    assert len({len(line) for line in lines[1:] if line.strip("-")}) == 1  # header, images, mean: one width
    assert lines[-1].split()[:2] == ["average", "32.000"]


def test_engine_is_what_evaluate_runs(hr_dir: Path, no_lpips: Path) -> None:
    """evaluate() is read_pairs + evaluate_pairs: the same rows from the pairs handed over by hand."""
    from xswinir.evaluation import evaluate_pairs, read_pairs

    by_hand = [(name, gt, lq) for name, gt, lq in read_pairs(hr_dir, 2)]
    assert [(name, tuple(gt.shape), tuple(lq.shape)) for name, gt, lq in by_hand] == [
        ("a", (3, 48, 40), (3, 24, 20)), ("b", (3, 32, 36), (3, 16, 18)), ("c", (3, 64, 64), (3, 32, 32))]
    rows = evaluate_pairs(by_hand, set_name=str(hr_dir))
    for ours, theirs in zip(rows, evaluate(hr_dir, scale=2), strict=True):
        assert ours.keys() == theirs.keys()
        for key in ours.keys() - {"seconds"}:  # NaN (VIF of a tiny image) equals NaN here
            assert ours[key] == theirs[key] or (ours[key] != ours[key] and theirs[key] != theirs[key]), key
    with pytest.raises(ValueError, match="is not lq"):
        evaluate_pairs([("odd", by_hand[0][1], by_hand[1][2])])


def test_validation_is_the_engine_on_the_validation_pairs(hr_dir: Path, tiny_config) -> None:
    from xswinir.degradations import build_degrader
    from xswinir.evaluation import build_validation_set, evaluate_pairs, validate, validation_rows
    from xswinir.metrics import PSNR_Y, VAL_PSNR_BICUBIC_Y, VAL_PSNR_Y, VAL_SSIM_BICUBIC_Y, VAL_SSIM_Y

    cfg = tiny_config(hr_dir)
    val = build_validation_set(cfg, build_degrader(cfg.degradation, cfg.scale), torch.device("cpu"))
    again = build_validation_set(cfg, build_degrader(cfg.degradation, cfg.scale), torch.device("cpu"))
    assert all(torch.equal(x, y) for x, y in zip(val.lq, again.lq, strict=True))  # fixed inputs, every run
    recorder = Recorder().train()
    rows = validation_rows(recorder, val, 2, tile=None)
    assert recorder.training  # the caller's mode is restored
    assert [r["image"] for r in rows] == ["a", "b", "c"] and {r["set"] for r in rows} == {str(hr_dir)}
    for row in rows:  # a "model" that is bicubic up-sampling scores what bicubic scores
        assert row[VAL_PSNR_Y] == row[VAL_PSNR_BICUBIC_Y] and row[VAL_SSIM_Y] == row[VAL_SSIM_BICUBIC_Y]
    bicubic = evaluate_pairs(val.pairs(), scale=2, metrics=(PSNR_Y,))
    assert [r[VAL_PSNR_BICUBIC_Y] for r in rows] == [r[PSNR_Y] for r in bicubic]
    means = validate(recorder, val, 2, tile=None)
    assert set(means) == {VAL_PSNR_Y, VAL_SSIM_Y, VAL_PSNR_BICUBIC_Y, VAL_SSIM_BICUBIC_Y}
    assert means[VAL_PSNR_Y] == pytest.approx(sum(r[VAL_PSNR_Y] for r in rows) / 3)


def test_demo_evaluation_prints_through_format_table(hr_dir: Path, tmp_path: Path, tiny_config,
                                                     capsys: pytest.CaptureFixture) -> None:
    from xswinir.cli.demo import evaluate_against_bicubic
    from xswinir.metrics import VAL_PSNR_BICUBIC_Y, VAL_PSNR_Y

    torch.manual_seed(0)
    cfg = tiny_config(hr_dir)
    evaluate_against_bicubic(build_swinir(cfg.model), cfg, tmp_path / "eval.json", tmp_path / "ckpt")
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f"{hr_dir} (3 images)" and "Y-PSNR bicubic" in printed[1]
    assert [line.split()[0] for line in printed[3:6]] == ["a", "b", "c"] and printed[-1].startswith("average")
    report = json.loads((tmp_path / "eval.json").read_text())
    assert [row["image"] for row in report["images"]] == ["a", "b", "c"]
    assert report["mean"][VAL_PSNR_BICUBIC_Y] > 20 and math.isfinite(report["mean"][VAL_PSNR_Y])
