"""Explanation pictures: the core function and the ``xswinir explain`` command, with tiny real parts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from xswinir.cli import main
from xswinir.config import DEGRADATION_PRESETS, MODEL_PRESETS, Config, DataConfig, TextureConfig
from xswinir.explain import ExplainError, explain, pick_tiles
from xswinir.images import read_image, write_image
from xswinir.model import build_swinir, save_weights
from xswinir.texture import TextureClassifier, save_texture_classifier


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
        clf.weight_diff.fill_(-0.5)
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
    return {"image": tmp_path / "hr.png", "classifier": tmp_path / "clf", "model": tmp_path / "model.safetensors"}


def test_cli_writes_png_and_html(parts, tmp_path, capsys):
    out = tmp_path / "out" / "explain.png"
    rc = main(["explain", str(parts["image"]), "--checkpoint", str(parts["model"]), "--classifier",
               str(parts["classifier"]), "--patches", "2", "--out", str(out), "--html", "--device", "cpu"])
    assert rc == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    picture = read_image(out)
    assert picture.shape[-1] > 800 and picture.std() > 0.05  # a real drawing, not a blank canvas
    page = out.with_suffix(".html").read_text()
    assert "data:image/png;base64," in page and page.count("<tr><td>") >= 2
    printed = capsys.readouterr().out
    assert "wrote" in printed and "c*=" in printed


def test_explain_core_finds_windows_outside_the_tile(parts, generator):
    from xswinir.model import load_model
    from xswinir.texture import load_texture_classifier

    model, model_cfg = load_model(parts["model"])
    clf = load_texture_classifier(parts["classifier"])
    cfg = Config(model=model_cfg, data=DataConfig(gt_size=64), degradation=DEGRADATION_PRESETS["blur-noise"],
                 texture=TextureConfig(patch_size=16, region_size=None))
    hr = read_image(parts["image"])
    tiles = torch.tensor([[0, 16], [32, 0]])
    result = explain(model, clf, hr, cfg, seed=1, tiles=tiles)
    assert result.png is None and result.figure is not None
    assert result.sr.shape == hr.shape and result.lq.shape == (3, 32, 32)
    assert result.description  # what the degradation did
    assert {r["patch"] for r in result.rows} == {1, 2}
    for r in result.rows:
        tile, window = r["tile"], r["window"]
        assert window[2] - window[0] == 16 and 0 <= window[0] and window[2] <= 64 and window[3] <= 64
        overlap = max(0, min(tile[2], window[2]) - max(tile[0], window[0])) * max(
            0, min(tile[3], window[3]) - max(tile[1], window[1]))
        assert overlap / (2 * 256 - overlap) <= cfg.texture.max_iou
        assert r["score"] >= cfg.texture.min_score
    # Stripes find stripes: the windows of the top-row tile lie in the striped top half.
    assert all(r["window"][2] <= 40 for r in result.rows if r["patch"] == 1)


def test_pick_tiles_prefers_texture(generator):
    image = textured_image(generator)
    tiles = pick_tiles(image, 16, 3)
    assert tiles.shape == (3, 2)
    assert not ((tiles[:, 0] >= 32) & (tiles[:, 1] >= 32)).any()  # never the flat quarter
    small = pick_tiles(torch.rand(3, 32, 32, generator=generator), 16, 5)
    assert len({tuple(t) for t in small.tolist()}) == len(small) == 4  # all four tiles, each once


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
    assert main(["explain", str(parts["image"]), "--checkpoint", str(parts["model"]), "--out",
                 str(tmp_path / "x.png")]) == 2
    assert "--classifier" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_explain_rejects_html_without_output(parts):
    from xswinir.model import load_model
    from xswinir.texture import load_texture_classifier

    model, model_cfg = load_model(parts["model"])
    cfg = Config(model=model_cfg, data=DataConfig(gt_size=64))
    with pytest.raises(ExplainError, match="output path"):
        explain(model, load_texture_classifier(parts["classifier"]), read_image(parts["image"]), cfg, html=True)
