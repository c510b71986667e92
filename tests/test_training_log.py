"""Training curves: the texture term's diagnostics get their own panel when the term is on."""

from __future__ import annotations

import json

from PIL import Image

from xswinir.training_log import plot_training_curves, read_metrics


def _write(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_texture_diagnostics_panel_only_with_the_term(tmp_path):
    base = [{"step": s, "train/loss": 0.1 / s, "train/loss_pixel": 0.1 / s, "lr": 1e-3} for s in range(1, 6)]
    base.append({"step": 5, "val/psnr_y": 28.0, "val/psnr_y_bicubic": 27.0})
    plain = plot_training_curves(_write(tmp_path / "plain.jsonl", [
        {**r, "train/texture_tiles_used": 0.0} if "lr" in r else r for r in base]), tmp_path / "plain.png")
    texture = plot_training_curves(_write(tmp_path / "texture.jsonl", [
        {**r, "train/texture_tiles_used": 1.0, "train/texture_r2": 0.4, "train/texture_fit_error": 0.03,
         "train/texture_bicubic_error": 0.04} if "lr" in r else r for r in base]), tmp_path / "texture.png")
    assert Image.open(texture).size[0] > Image.open(plain).size[0]  # four panels instead of three
    assert len(read_metrics(tmp_path / "texture.jsonl")) == 6
    assert plot_training_curves(_write(tmp_path / "empty.jsonl", []), tmp_path / "none.png") is None
