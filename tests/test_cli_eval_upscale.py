"""`xswinir eval` and `xswinir upscale` run in-process on tiny images and a tiny SwinIR checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from xswinir.checkpoint import save_weights
from xswinir.cli import main
from xswinir.config import ModelConfig
from xswinir.evaluation import evaluate
from xswinir.inference import bicubic_upscale
from xswinir.model import build_swinir

TINY = ModelConfig(upscale=2, window_size=4, depths=(1,), embed_dim=12, num_heads=(2,), img_size=16)


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "tiny.safetensors"
    save_weights(build_swinir(TINY), TINY, path)
    return path


def _write_rgb(path: Path, generator: torch.Generator, size: tuple[int, int] = (20, 24)) -> None:
    array = torch.randint(0, 256, (*size, 3), generator=generator, dtype=torch.uint8).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


# Bicubic Y-PSNR on Set5 in the literature (e.g. the SRCNN, VDSR and SwinIR papers' tables).
@pytest.mark.parametrize(("scale", "expected"), [(2, 33.66), (3, 30.39), (4, 28.42)])
def test_eval_bicubic_reproduces_literature_on_set5(shared_data: Path, tmp_path: Path, scale: int,
                                                    expected: float) -> None:
    out = tmp_path / "bicubic.json"
    assert main(["eval", "--hr", str(shared_data / "Set5" / "HR"), "--scale", str(scale), "--bicubic",
                 "--out", str(out), "--device", "cpu"]) == 0
    result = json.loads(out.read_text())
    assert len(result["images"]) == 5 and result["scale"] == scale
    # Measured 33.673 / 30.403 / 28.429 (Y unrounded, as BasicSR).
    assert abs(result["average"]["psnr_y"] - expected) <= 0.02


def test_eval_lr_folder_equals_on_the_fly(shared_data: Path) -> None:
    set5 = shared_data / "Set5"
    from_folder = evaluate(set5 / "HR", lr=set5 / "LR_bicubic" / "X4")  # scale implied by the sizes
    on_the_fly = evaluate(set5 / "HR", scale=4)
    assert [r["image"] for r in from_folder] == ["baby", "bird", "butterfly", "head", "woman"]
    for a, b in zip(from_folder, on_the_fly, strict=True):
        assert a["scale"] == 4 and a["psnr_y"] == b["psnr_y"] and a["ssim"] == b["ssim"]


class BicubicModel(nn.Module):
    """A "model" that is the bicubic baseline: evaluating it must equal ``--bicubic``."""

    upscale = 2
    in_chans = 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bicubic_upscale(x, 2)


def test_evaluate_model_path_equals_bicubic_path(tmp_path: Path, generator: torch.Generator) -> None:
    for name in ("a", "b"):
        _write_rgb(tmp_path / "hr" / f"{name}.png", generator, (33, 30))
    with_model = evaluate(tmp_path / "hr", model=BicubicModel())
    baseline = evaluate(tmp_path / "hr", scale=2)
    assert [r["height"] for r in baseline] == [32, 32]  # modcropped
    for a, b in zip(with_model, baseline, strict=True):
        for key in ("psnr", "ssim", "psnr_y", "ssim_y"):
            assert a[key] == b[key]


def test_eval_checkpoint_writes_csv(tmp_path: Path, checkpoint: Path, generator: torch.Generator,
                                    capsys: pytest.CaptureFixture) -> None:
    for name in ("one", "two"):
        _write_rgb(tmp_path / "hr" / f"{name}.png", generator, (40, 36))
    out = tmp_path / "res.csv"
    code = main(["eval", "--hr", str(tmp_path / "hr"), "--checkpoint", str(checkpoint), "--tile", "12",
                 "--overlap", "4", "--out", str(out), "--device", "cpu"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "PSNR-Y" in printed and "average" in printed
    lines = out.read_text().splitlines()
    assert lines[0].startswith("image,psnr,ssim,psnr_y,ssim_y")
    assert [line.split(",")[0] for line in lines[1:]] == ["one", "two", "average"]
    assert all(np.isfinite(float(line.split(",")[3])) for line in lines[1:])


def test_eval_errors_are_messages(tmp_path: Path, shared_data: Path, capsys: pytest.CaptureFixture) -> None:
    set5 = shared_data / "Set5"
    empty = tmp_path / "empty_lr"
    empty.mkdir()
    _write_rgb(empty / "other.png", torch.Generator().manual_seed(1))
    assert main(["eval", "--hr", str(set5 / "HR"), "--lr", str(empty), "--scale", "2", "--bicubic"]) == 2
    assert "no LR image for baby.png" in capsys.readouterr().err
    assert main(["eval", "--hr", str(set5 / "HR"), "--bicubic"]) == 2
    assert "--scale" in capsys.readouterr().err
    assert main(["eval", "--hr", str(set5 / "HR"), "--scale", "2", "--bicubic", "--out", "x.txt"]) == 2


def test_upscale_folder_with_bad_and_odd_images(tmp_path: Path, checkpoint: Path, generator: torch.Generator,
                                                capsys: pytest.CaptureFixture) -> None:
    inputs = tmp_path / "in"
    _write_rgb(inputs / "rgb.png", generator)
    Image.fromarray(np.full((10, 14), 120, np.uint8)).save(inputs / "gray.png")
    Image.fromarray(np.full((12, 9, 4), 200, np.uint8), "RGBA").save(inputs / "rgba.png")
    (inputs / "sub").mkdir()
    Image.fromarray(np.full((11, 13), 40000, np.uint16)).save(inputs / "sub" / "deep16.png")
    (inputs / "bad.png").write_text("not an image")
    out = tmp_path / "out"
    args = ["upscale", str(inputs), "--checkpoint", str(checkpoint), "--out", str(out), "--tile", "8",
            "--overlap", "4", "--device", "cpu"]
    assert main(args) == 1
    printed = capsys.readouterr().out
    assert "processed 4, skipped 1: " in printed and "bad.png: not a readable image" in printed
    with Image.open(out / "rgb_x2.png") as image:
        assert image.mode == "RGB" and image.size == (48, 40)
    with Image.open(out / "gray_x2.png") as image:
        assert image.mode == "L" and image.size == (28, 20)
    with Image.open(out / "rgba_x2.png") as image:
        assert image.mode == "RGB" and image.size == (18, 24)
    with Image.open(out / "sub" / "deep16_x2.png") as image:
        assert image.mode == "L" and image.size == (26, 22)
    assert not (out / "bad_x2.png").exists()

    # A second run leaves existing outputs alone unless --overwrite.
    before = (out / "rgb_x2.png").stat().st_mtime_ns
    assert main([*args[:1], str(inputs / "rgb.png"), *args[2:]]) == 1
    assert "exists (pass --overwrite)" in capsys.readouterr().out
    assert (out / "rgb_x2.png").stat().st_mtime_ns == before
    assert main([*args[:1], str(inputs / "rgb.png"), *args[2:], "--overwrite"]) == 0
    assert "processed 1, skipped 0" in capsys.readouterr().out


def test_upscale_missing_input_is_a_message(tmp_path: Path, checkpoint: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["upscale", str(tmp_path / "nope.png"), "--checkpoint", str(checkpoint)]) == 2
    assert "nope.png does not exist" in capsys.readouterr().err
