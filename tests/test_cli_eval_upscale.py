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
from xswinir.evaluation import evaluate
from xswinir.inference import bicubic_upscale
from xswinir.model import build_swinir


@pytest.fixture
def checkpoint(tmp_path: Path, tiny_config) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "tiny.safetensors"
    model_cfg = tiny_config().model
    save_weights(build_swinir(model_cfg), model_cfg, path)
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
    from_folder = evaluate(set5 / "HR", lq=set5 / "LR_bicubic" / "X4")  # scale implied by the sizes
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
    with Image.open(out / "rgba_x2.png") as image:  # alpha kept, up-sampled on its own
        assert image.mode == "RGBA" and image.size == (18, 24)
        assert np.asarray(image)[..., 3].min() == 200
    with Image.open(out / "sub" / "deep16_x2.png") as image:  # 16-bit gray stays 16-bit gray
        assert image.mode == "I;16" and image.size == (26, 22)
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


def test_upscale_keeps_bit_depth_alpha_gray_and_orientation(tmp_path: Path, checkpoint: Path,
                                                            generator: torch.Generator,
                                                            capsys: pytest.CaptureFixture) -> None:
    from xswinir.images import read_image_data, write_image

    inputs = tmp_path / "in"
    rgb16 = torch.rand(3, 10, 12, generator=generator)
    write_image(inputs / "deep.png", rgb16, alpha=torch.full((1, 10, 12), 0.25), bits=16)
    write_image(inputs / "gray_alpha.png", torch.rand(1, 8, 8, generator=generator), alpha=torch.ones(1, 8, 8))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait
    Image.fromarray(np.full((8, 12, 3), 90, np.uint8)).save(inputs / "phone.jpg", exif=exif.tobytes())
    out = tmp_path / "out"
    common = ["--checkpoint", str(checkpoint), "--tile", "0", "--device", "cpu"]
    assert main(["upscale", str(inputs), "--out", str(out), *common]) == 0
    deep = read_image_data(out / "deep_x2.png")
    assert deep.bits == 16 and deep.image.shape == (3, 20, 24) and (out / "deep_x2.png").read_bytes()[24] == 16
    torch.testing.assert_close(deep.alpha, torch.full((1, 20, 24), 0.25), atol=1e-4, rtol=0)
    gray = read_image_data(out / "gray_alpha_x2.png")
    assert gray.gray and gray.alpha is not None and Image.open(out / "gray_alpha_x2.png").mode == "LA"
    assert Image.open(out / "phone_x2.png").size == (16, 24)  # upright: 8 x 12 shown, doubled

    # JPEG / WebP with a quality, and a final size other than the model's scale.
    assert main(["upscale", str(inputs / "deep.png"), "--out", str(out), *common, "--format", "jpeg",
                 "--quality", "80", "--outscale", "3"]) == 0
    assert "JPEG has no alpha channel" in capsys.readouterr().out
    with Image.open(out / "deep_x3.jpg") as image:
        assert image.format == "JPEG" and image.size == (36, 30)
    assert main(["upscale", str(inputs / "deep.png"), "--out", str(out), *common, "--format", "webp",
                 "--outscale", "1.5"]) == 0
    webp = read_image_data(out / "deep_x1.5.webp")
    assert webp.format == "WEBP" and webp.image.shape == (3, 15, 18) and webp.alpha is not None
    assert main(["upscale", str(inputs), "--out", str(out), *common, "--quality", "0"]) == 2


def test_upscale_same_stem_gets_unique_names_and_overwrite_is_atomic(
        tmp_path: Path, checkpoint: Path, generator: torch.Generator, capsys: pytest.CaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    inputs = tmp_path / "in"
    _write_rgb(inputs / "a.png", generator)
    _write_rgb(inputs / "a.jpg", generator)
    _write_rgb(inputs / "b.png", generator)
    out = tmp_path / "out"
    args = ["upscale", str(inputs), "--checkpoint", str(checkpoint), "--out", str(out), "--device", "cpu"]
    assert main(args) == 0
    assert "processed 3, skipped 0" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["a_jpg_x2.png", "a_png_x2.png", "b_x2.png"]
    results = [np.asarray(Image.open(out / name)) for name in ("a_jpg_x2.png", "a_png_x2.png")]
    assert not np.array_equal(*results)  # two results, neither replaced the other

    # --overwrite: a run that dies while writing leaves the previous result, and no temporary file.
    before = (out / "b_x2.png").read_bytes()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        main([*args, "--overwrite"])
    assert (out / "b_x2.png").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["a_jpg_x2.png", "a_png_x2.png", "b_x2.png"]
