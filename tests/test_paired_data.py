"""Paired training data (``data.train_lq``, shards packed with ``--lq``): LQ crops aligned with the gt crops,
missing or mismatched partners skipped by name, and a train step that uses them instead of the degrader."""

from __future__ import annotations

import itertools
import logging

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from xswinir.config import ConfigError
from xswinir.data import DataError, build_train_batches
from xswinir.shards import ShardImages, pack_images


def _pair(hr_dir, lq_dir, stem, h, w, seed, lq_stem=None):
    """A noisy HR image and its exact 2x2 box average: a crop misplaced by one LQ pixel no longer matches."""
    hr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(hr).save(hr_dir / f"{stem}.png")
    crop = hr[: h - h % 2, : w - w % 2].astype(np.float64)
    lq = crop.reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3)).round().astype(np.uint8)
    Image.fromarray(lq).save(lq_dir / f"{lq_stem or stem + 'x2'}.png")


@pytest.fixture
def pairs(tmp_path):
    hr, lq = tmp_path / "hr", tmp_path / "lq"
    hr.mkdir()
    lq.mkdir()
    _pair(hr, lq, "a", 40, 48, 0)
    _pair(hr, lq, "b", 49, 41, 1, lq_stem="b_x2")  # odd sides: the HR image is modcropped
    _pair(hr, lq, "c", 36, 36, 2, lq_stem="c")
    return hr, lq


def _assert_aligned(batch):
    torch.testing.assert_close(F.avg_pool2d(batch["gt"], 2), batch["lq"], rtol=0, atol=0.51 / 255)


@pytest.mark.parametrize("texture", [{}, {"loss.texture_weight": 0.1, "texture.region_size": 32},
                                     {"loss.texture_weight": 0.1, "texture.region_size": None}])
def test_lq_crops_are_aligned_with_the_gt_crops(pairs, tiny_config, texture):
    hr, lq = pairs
    cfg = tiny_config(hr, **{"data.train_lq": str(lq), "train.batch_size": 8, "data.crops_per_image": 2, **texture})
    for batch in itertools.islice(build_train_batches(cfg, 0, 1), 4):
        assert batch["lq"].shape == (8, 3, 8, 8)
        _assert_aligned(batch)
        for i, (top, left) in enumerate(batch.get("gt_offset", torch.zeros(0, 2)).tolist()):
            assert top % 2 == left % 2 == 0
            torch.testing.assert_close(batch["region"][i, :, top:top + 16, left:left + 16], batch["gt"][i])
    unpaired = next(build_train_batches(tiny_config(hr), 0, 1))
    assert "lq" not in unpaired


def test_missing_and_mismatched_partners_are_named_and_skipped(pairs, tiny_config, caplog):
    hr, lq = pairs
    _pair(hr, lq, "d", 40, 40, 3, lq_stem="other")
    Image.fromarray(np.zeros((10, 10, 3), dtype=np.uint8)).save(lq / "ex2.png")
    Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8)).save(hr / "e.png")
    cfg = tiny_config(hr, **{"data.train_lq": str(lq)})
    with caplog.at_level(logging.WARNING):
        batch = next(build_train_batches(cfg, 0, 1))
    _assert_aligned(batch)
    assert "d.png: no LQ partner" in caplog.text and "dx2, d_x2, d" in caplog.text
    assert "e.png: its LQ image is 10x10, not 40x40 (after modcrop) / 2" in caplog.text
    assert "skipped 2 of 5 images" in caplog.text

    summary = pack_images(hr, hr.parent / "shards", lq_source=lq, scale=2, progress=False)
    assert [name for name, _ in summary.skipped] == ["d.png", "e.png"]


def test_paired_shards_give_the_batches_of_paired_folders(pairs, tiny_config):
    hr, lq = pairs
    pack_images(hr, hr.parent / "shards", lq_source=lq, scale=2, progress=False)
    assert ShardImages(hr.parent / "shards").paired
    overrides = {"loss.texture_weight": 0.1, "texture.region_size": 32, "train.batch_size": 6}
    folders = build_train_batches(tiny_config(hr, **{"data.train_lq": str(lq), **overrides}), 0, 1)
    shards = build_train_batches(tiny_config(hr.parent / "shards", **overrides), 0, 1)
    for a, b in zip(itertools.islice(folders, 3), itertools.islice(shards, 3), strict=True):
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)

    pack_images(hr, hr.parent / "subs", lq_source=lq, scale=2, sub_image=24, sub_step=12, progress=False)
    subs = ShardImages(hr.parent / "subs")
    assert len(subs) > 3
    for i in range(len(subs)):
        torch.testing.assert_close(F.avg_pool2d(subs.load(i)[None], 2)[0], subs.load_lq(i), rtol=0, atol=0.51 / 255)
    _assert_aligned(next(build_train_batches(tiny_config(hr.parent / "subs"), 0, 1)))


def test_paired_settings_that_cannot_work(pairs, tiny_config, tmp_path):
    hr, lq = pairs
    with pytest.raises(ConfigError, match="multiple of model.upscale"):
        tiny_config(hr, **{"data.train_lq": str(lq), "loss.texture_weight": 0.1, "texture.region_size": 33})
    pack_images(hr, tmp_path / "shards", progress=False)
    with pytest.raises(DataError, match="for image folders"):
        build_train_batches(tiny_config(tmp_path / "shards", **{"data.train_lq": str(lq)}), 0, 1)
    with pytest.raises(DataError, match="missing"):
        build_train_batches(tiny_config(hr, **{"data.train_lq": str(tmp_path / "missing")}), 0, 1)


class NoDegrader(nn.Module):
    def forward(self, gt, generator):
        raise AssertionError("the degrader ran on a paired batch")


def test_train_step_uses_the_batch_lq(pairs, tiny_config):
    from xswinir.trainer import build_training_parts, train_step

    hr, lq = pairs
    cfg = tiny_config(hr, **{"data.train_lq": str(lq)})
    parts = build_training_parts(cfg, torch.device("cpu"), None)
    batch = next(build_train_batches(cfg, 0, 1))
    before = [p.detach().clone() for p in parts.model.parameters()]
    out = train_step(parts.model, NoDegrader(), parts.loss_fn, parts.optimizer, batch, torch.Generator())
    assert torch.isfinite(out["loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before, parts.model.parameters(), strict=True))
    with pytest.raises(AssertionError, match="degrader ran"):  # the control: unpaired batches are degraded
        train_step(parts.model, NoDegrader(), parts.loss_fn, parts.optimizer, {"gt": batch["gt"]}, torch.Generator())


def test_paired_data_is_checked_before_ray_as_the_workers_would_skip_it(pairs, tiny_config, tmp_path, caplog):
    from xswinir.data import PatchCutter, PatchDataset, check_train_source, open_images

    hr, lq = pairs
    _pair(hr, lq, "d", 40, 40, 3, lq_stem="other")  # no partner
    Image.fromarray(np.zeros((10, 10, 3), dtype=np.uint8)).save(lq / "ex2.png")  # wrong size
    Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8)).save(hr / "e.png")
    (hr / "f.png").write_bytes(b"not an image")
    _pair(hr, lq, "g", 20, 20, 4)  # just large enough
    _pair(hr, lq, "h", 14, 30, 5)  # smaller than the 16 px patch; paired images are never padded
    cfg = tiny_config(hr, **{"data.train_lq": str(lq), "run.storage": str(tmp_path / "runs")})
    with caplog.at_level(logging.WARNING):
        skipped = check_train_source(cfg)
    dataset = PatchDataset(open_images(str(hr), 3, str(lq), 2), PatchCutter.from_config(cfg))
    assert skipped == dataset.skipped  # the driver names exactly what the workers would skip
    assert [name for name, _ in skipped] == ["d.png", "e.png", "f.png", "h.png"]
    assert "training data: skipping e.png: its LQ image is 10x10, not 40x40 (after modcrop) / 2" in caplog.text
    assert "training data: 4 of 8 images are skipped" in caplog.text


def test_paired_data_with_no_usable_pair_is_refused_before_ray(tmp_path, tiny_config):
    from xswinir.data import check_train_source
    from xswinir.trainer import fit

    hr, lq = tmp_path / "hr", tmp_path / "lq"
    hr.mkdir()
    lq.mkdir()
    for stem in ("a", "b", "c"):
        Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8)).save(hr / f"{stem}.png")
        Image.fromarray(np.zeros((21, 20, 3), dtype=np.uint8)).save(lq / f"{stem}x2.png")  # one row too many
    (hr / "d.png").write_bytes((hr / "a.png").read_bytes())  # and one without a partner
    cfg = tiny_config(hr, **{"data.train_lq": str(lq), "run.storage": str(tmp_path / "runs")})
    expected = (f"data.train {hr} (LQ partners in {lq}): none of its 4 images is usable (3 with an LQ partner of "
                f"the wrong size (not HR / 2), 1 without an LQ partner); first: a.png: its LQ image is 20x21, not "
                "40x40 (after modcrop) / 2")
    with pytest.raises(DataError) as refused:
        check_train_source(cfg)
    assert str(refused.value) == expected
    with pytest.raises(DataError, match="none of its 4 images is usable"):
        fit(cfg)  # refused in the driver: Ray never starts, no texture classifier is trained


def test_pack_lq_with_partners_of_the_wrong_size_says_so(tmp_path, capsys):
    from xswinir.cli import main

    hr, lq = tmp_path / "hr", tmp_path / "lq"
    hr.mkdir()
    lq.mkdir()
    for stem in ("a", "b"):
        Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8)).save(hr / f"{stem}.png")
        Image.fromarray(np.zeros((10, 10, 3), dtype=np.uint8)).save(lq / f"{stem}x2.png")
    assert main(["pack", str(hr), str(tmp_path / "out"), "--lq", str(lq), "--scale", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"xswinir pack: error: nothing to pack from {hr}: all 2 file(s) were skipped (2 whose LQ partner "
                   "is not their size / 2); first: a.png: its LQ image is 10x10, not 40x40 (after modcrop) / 2")
    assert not (tmp_path / "out").exists()
