"""``xswinir study`` end to end on real Ray: two arms x two seeds of a few steps, then the report and the models."""

from __future__ import annotations

import json

import pytest
import torch

from xswinir.tune.study import EVAL_FILE

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_tiny_study_end_to_end_on_ray(tmp_path, ray_local):
    from safetensors.torch import load_file

    from xswinir.checkpoint import EMA_FILE, load_model
    from xswinir.cli import main

    config = tmp_path / "tiny.yaml"
    config.write_text(
        "name: tiny\nbase: demo\n"
        "overrides: [data.train=skimage:train, data.val_max_images=1, train.total_steps=4, train.val_every=2, "
        "texture.classifier.num_pairs=256, run.cpus_per_worker=0.5, "
        # The smallest model and batches the sweep drills train: the study's own steps are what is tested here.
        "'model.depths=[1]', 'model.num_heads=[2]', model.embed_dim=12, data.gt_size=32, texture.region_size=64, "
        "texture.classifier.steps=20, train.batch_size=2, train.warmup_steps=0]\n"
        "arms: {lambda0: [loss.texture_weight=0.0], projection: [loss.texture_weight=1.0]}\n"
        f"seeds: [0, 1]\neval_sets: [skimage:coins]\nstorage: {tmp_path / 'studies'}\n")
    assert main(["study", "--config", str(config), "--export-models", str(tmp_path / "models")]) == 0
    out = tmp_path / "studies" / "tiny"
    text = (out / "study.md").read_text()
    assert "| skimage:coins | projection | psnr_y |" in text
    assert "| skimage:coins | bicubic | 2 |" in text  # one copy per seed, from the baseline's trials
    rows = json.loads((out / "train" / "projection_s1" / EVAL_FILE).read_text())
    assert {r["kind"] for r in rows} == {"model"} and all(torch.isfinite(torch.tensor(r["psnr_y"])) for r in rows)
    baseline = json.loads((out / "train" / "lambda0_s1" / EVAL_FILE).read_text())
    assert {r["kind"] for r in baseline} == {"model", "bicubic"}

    # The exported models are the final EMA weights, each listed in the index.
    files = sorted(p.name for p in (tmp_path / "models").iterdir())
    assert files == ["README.md", "lambda0_s0.safetensors", "lambda0_s1.safetensors", "projection_s0.safetensors",
                     "projection_s1.safetensors"]
    model, _ = load_model(tmp_path / "models" / "projection_s1.safetensors")
    final = sorted(p for p in (out / "train" / "projection_s1").glob("checkpoint_*") if p.is_dir())[-1]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in load_file(final / EMA_FILE).items())
    index = (tmp_path / "models" / "README.md").read_text()
    assert sum(line.startswith(("| lambda0 |", "| projection |")) for line in index.splitlines()) == 4
