"""xswinir.restore: what comes in goes out (gray, alpha, 16-bit, outscale), and output names that never collide."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from xswinir.errors import UserError
from xswinir.images import ImageData, read_image_data, write_image
from xswinir.inference import bicubic_upscale
from xswinir.restore import collect_inputs, output_name, plan_outputs, restore_file, restore_image


class Doubler(nn.Module):
    """Bicubic x2 that records the channels it was given."""

    window_size = 4

    def __init__(self) -> None:
        super().__init__()
        self.channels: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.channels.append(x.shape[1])
        return bicubic_upscale(x, 2)


def test_gray_with_alpha_goes_out_gray_with_alpha(generator: torch.Generator) -> None:
    gray = torch.rand(1, 10, 12, generator=generator)
    data = ImageData(gray, torch.full((1, 10, 12), 0.5), bits=16, format="PNG")
    model = Doubler()
    out = restore_image(model, data, in_chans=3)
    assert model.channels == [3]  # replicated to RGB for an RGB model
    assert out.image.shape == (1, 20, 24) and out.bits == 16 and out.format is None
    torch.testing.assert_close(out.alpha, torch.full((1, 20, 24), 0.5), atol=1e-6, rtol=0)
    rgb_result = bicubic_upscale(gray.expand(3, -1, -1)[None], 2)[0].clamp(0, 1)
    torch.testing.assert_close(out.image, (rgb_result * torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(0, True))


@pytest.mark.parametrize(("outscale", "size"), [(None, (20, 24)), (3.0, (30, 36)), (1.5, (15, 18)), (0.05, (1, 1))])
def test_outscale_sets_the_final_size(generator: torch.Generator, outscale: float | None,
                                      size: tuple[int, int]) -> None:
    data = ImageData(torch.rand(3, 10, 12, generator=generator), None, bits=8, format="PNG")
    out = restore_image(Doubler(), data, in_chans=3, outscale=outscale)
    assert out.image.shape == (3, *size) and out.alpha is None and 0 <= out.image.min() <= out.image.max() <= 1


def test_restore_file_keeps_16_bit_and_alpha(tmp_path: Path, generator: torch.Generator) -> None:
    write_image(tmp_path / "in.png", torch.rand(3, 8, 8, generator=generator), alpha=torch.ones(1, 8, 8), bits=16)
    restored = restore_file(Doubler(), tmp_path / "in.png", tmp_path / "out.png", 3, tile=4, overlap=2)
    written = read_image_data(tmp_path / "out.png")
    assert written.bits == 16 and written.alpha is not None and written.image.shape == (3, 16, 16)
    torch.testing.assert_close(written.image, restored.image, atol=1 / 65535, rtol=0)


def test_output_names_stay_apart(tmp_path: Path) -> None:
    (tmp_path / "in" / "sub").mkdir(parents=True)
    for name in ("a.png", "a.JPG", "b.png", "sub/b.png"):
        write_image(tmp_path / "in" / name, torch.zeros(3, 4, 4))
    files = collect_inputs([str(tmp_path / "in"), str(tmp_path / "in" / "b.png")])  # b.png named twice: once
    targets = plan_outputs(files, tmp_path / "out", 2, ".png")
    assert sorted(t.relative_to(tmp_path / "out").as_posix() for t in targets) == [
        "a_jpg_x2.png", "a_png_x2.png", "b_x2.png", "sub/b_x2.png"]
    assert output_name(Path("x.png"), 1) == "x_restored.png"
    assert output_name(Path("x.png"), 2.5, ".webp") == "x_x2.5.webp"
    with pytest.raises(UserError, match="would both be written"):  # a.png and a.PNG: a_png_x2.png, twice
        plan_outputs([(Path("a.png"), Path()), (Path("a.PNG"), Path()), (Path("a_png.png"), Path())],
                      tmp_path, 2, ".png")
    with pytest.raises(UserError, match="does not exist"):
        collect_inputs([str(tmp_path / "missing.png")])
