"""``xswinir study`` end to end on real Ray: two arms x two seeds of a few steps, then the report."""

from __future__ import annotations

import json

import pytest
import torch

from xswinir.tune.study import EVAL_FILE

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_tiny_study_end_to_end_on_ray(tmp_path, ray_local):
    from xswinir.cli import main

    config = tmp_path / "tiny.yaml"
    config.write_text(
        "name: tiny\nbase: demo\n"
        "overrides: [data.train=skimage:train, data.val_max_images=1, train.total_steps=4, train.val_every=2, "
        "texture.classifier.num_pairs=256, run.cpus_per_worker=0.5]\n"
        "arms: {lambda0: [loss.texture_weight=0.0], projection: [loss.texture_weight=1.0]}\n"
        f"seeds: [0, 1]\neval_sets: [skimage:coins]\nstorage: {tmp_path / 'studies'}\n")
    assert main(["study", "--config", str(config)]) == 0
    out = tmp_path / "studies" / "tiny"
    text = (out / "study.md").read_text()
    assert "| skimage:coins | projection | psnr_y |" in text
    rows = json.loads((out / "train" / "projection_s1" / EVAL_FILE).read_text())
    assert {r["kind"] for r in rows} == {"model", "bicubic"} and all(torch.isfinite(torch.tensor(r["psnr_y"]))
                                                                   for r in rows)
