"""The README's first command, shortened: training, evaluation against bicubic and the explanation picture."""

from __future__ import annotations

import json

import pytest

from xswinir.cli import main
from xswinir.metrics import VAL_PSNR_BICUBIC_Y, VAL_PSNR_Y

pytestmark = pytest.mark.integration


def test_demo_runs_end_to_end(ray_local, tmp_path, capsys):
    args = ["demo", "--out", str(tmp_path), "--set", "train.total_steps=4", "--set", "train.val_every=4",
            "--set", "texture.classifier.num_pairs=512", "--set", "data.val=skimage:coins"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "[3/3] explanation picture" in out and "Y-PSNR bicubic" in out
    report = json.loads((tmp_path / "eval.json").read_text())
    assert [row["image"] for row in report["images"]] == ["coins"]
    assert report["mean"][VAL_PSNR_Y] > 10 and report["mean"][VAL_PSNR_BICUBIC_Y] > 20
    assert (tmp_path / "explain.png").stat().st_size > 10_000
    assert (tmp_path / "explain.html").is_file()
    assert (tmp_path / "logs" / "training_curves.png").is_file()
    # A second demo into the same folder must not silently destroy the first.
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
