"""Training batches: shapes, regions, several crops per decode, resumable order, bad and small inputs,
validation images."""

from __future__ import annotations

import itertools
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from xswinir.config import Config, apply_overrides
from xswinir.data import (
    DataError,
    FileImages,
    PatchCutter,
    PatchDataset,
    StepBatchSampler,
    build_train_batches,
    collate,
    load_val_images,
)
from xswinir.errors import UserError
from xswinir.images import read_image
from xswinir.resize import modcrop


def _write_png(path, h, w, seed, mode="RGB"):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    array = rng.integers(0, 256, size=(h, w, channels), dtype=np.uint8)
    Image.fromarray(array[..., 0] if channels == 1 else array, mode).save(path)
    return path


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "hr"
    root.mkdir()
    for i, (h, w) in enumerate([(40, 48), (48, 40), (56, 56)]):
        _write_png(root / f"img{i}.png", h, w, seed=i)
    return root


def _take(iterator, n):
    return list(itertools.islice(iterator, n))


def test_plain_batch(folder, tiny_config):
    batch = next(build_train_batches(tiny_config(folder), rank=0, world_size=1))
    assert set(batch) == {"gt"}
    assert batch["gt"].shape == (4, 3, 16, 16) and batch["gt"].dtype == torch.float32
    assert 0 <= batch["gt"].min() and batch["gt"].max() <= 1


def test_batches_split_over_workers(folder, tiny_config):
    batch = next(build_train_batches(tiny_config(folder), rank=1, world_size=2))
    assert batch["gt"].shape[0] == 2


def test_resumed_run_sees_the_same_batches(folder, tiny_config):
    cfg = tiny_config(folder, **{"train.seed": 3})
    full = _take(build_train_batches(cfg, rank=0, world_size=1), 5)
    resumed = _take(build_train_batches(cfg, rank=0, world_size=1, start_step=3), 2)
    for a, b in zip(full[3:], resumed, strict=True):
        torch.testing.assert_close(a["gt"], b["gt"], rtol=0, atol=0)
    assert not torch.equal(full[0]["gt"], full[1]["gt"])
    other_rank = next(build_train_batches(cfg, rank=1, world_size=2))
    assert not torch.equal(other_rank["gt"], full[0]["gt"][:2])
    other_seed = next(build_train_batches(tiny_config(folder, **{"train.seed": 4}), rank=0, world_size=1))
    assert not torch.equal(other_seed["gt"], full[0]["gt"])


def test_loader_workers_do_not_change_the_batches(folder, tiny_config):
    cfg = tiny_config(folder)
    main = _take(build_train_batches(cfg, 0, 1), 3)
    workers = _take(build_train_batches(apply_overrides(cfg, {"data.loader_workers": 2}), 0, 1), 3)
    for a, b in zip(main, workers, strict=True):
        torch.testing.assert_close(a["gt"], b["gt"], rtol=0, atol=0)


def test_region_contains_gt_patch(folder, tiny_config):
    cfg = tiny_config(folder, **{"loss.texture_weight": 0.1, "texture.region_size": 32})
    batch = next(build_train_batches(cfg, 0, 1))
    assert batch["region"].shape == (4, 3, 32, 32)
    assert batch["region_valid"].all() and batch["region_valid"].dtype == torch.bool
    assert batch["gt_offset"].dtype == torch.long and batch["gt_offset"].shape == (4, 2)
    for i, (top, left) in enumerate(batch["gt_offset"].tolist()):
        torch.testing.assert_close(batch["region"][i, :, top:top + 16, left:left + 16], batch["gt"][i])


def test_whole_image_regions_are_padded_with_a_mask(folder, tiny_config):
    cfg = tiny_config(folder, **{"loss.texture_weight": 0.1, "texture.region_size": None, "train.batch_size": 8})
    batch = next(build_train_batches(cfg, 0, 1))
    images = [read_image(p) for p in sorted(folder.glob("*.png"))]
    areas = {img.shape[1] * img.shape[2] for img in images}
    valid = batch["region_valid"].sum(dim=(1, 2, 3))
    assert set(valid.tolist()) <= areas
    assert batch["region"].shape[2] == batch["region"].shape[3] == 56
    assert (batch["region"] * ~batch["region_valid"]).abs().sum() == 0  # padding is zero
    for i, (top, left) in enumerate(batch["gt_offset"].tolist()):
        assert batch["region_valid"][i, :, top:top + 16, left:left + 16].all()
        torch.testing.assert_close(batch["region"][i, :, top:top + 16, left:left + 16], batch["gt"][i])


def test_augmentations_are_the_image_up_to_flips_and_transpose(tmp_path):
    image = read_image(_write_png(tmp_path / "a.png", 20, 24, seed=5))
    cutter = PatchCutter(gt_size=8, with_region=True, region_size=None)
    seen = set()
    for seed in range(24):
        region = cutter(image, seed)["region"]
        candidates = {}
        for t in (False, True):
            for h in (False, True):
                for v in (False, True):
                    x = image.flip(-1) if h else image
                    x = x.flip(-2) if v else x
                    x = x.transpose(-1, -2) if t else x
                    candidates[(h, v, t)] = x
        matches = [k for k, x in candidates.items() if x.shape == region.shape and torch.equal(x, region)]
        assert len(matches) == 1
        seen.add(matches[0])
    assert len(seen) > 4  # the flips are random
    no_aug = PatchCutter(gt_size=8, with_region=True, region_size=None, use_flip=False, use_rot=False)
    assert all(torch.equal(no_aug(image, s)["region"], image) for s in range(5))


def test_bad_files_are_named_and_skipped(folder, caplog, tiny_config):
    (folder / "junk.png").write_bytes(b"this is not a png")
    good = (folder / "img0.png").read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    (folder / "notes.jpg").write_text("hello")
    with caplog.at_level(logging.WARNING):
        batch = next(build_train_batches(tiny_config(folder), 0, 1))
    assert batch["gt"].shape == (4, 3, 16, 16)
    text = caplog.text
    for name in ("junk.png", "truncated.png", "notes.jpg"):
        assert name in text
    assert "skipped 3 of 6 images" in text


def test_gray_rgba_and_16bit_become_rgb(tmp_path, tiny_config):
    _write_png(tmp_path / "gray.png", 20, 20, 1, mode="L")
    _write_png(tmp_path / "rgba.png", 20, 20, 2, mode="RGBA")
    Image.fromarray(np.full((20, 20), 40000, dtype=np.uint16)).save(tmp_path / "deep.png")
    batch = next(build_train_batches(tiny_config(tmp_path, **{"train.batch_size": 8}), 0, 1))
    assert batch["gt"].shape == (8, 3, 16, 16)
    assert 0 <= batch["gt"].min() and batch["gt"].max() <= 1


def test_small_images_skip_or_pad(folder, caplog, tiny_config):
    _write_png(folder / "tiny.png", 10, 30, seed=9)
    with caplog.at_level(logging.WARNING):
        build_train_batches(tiny_config(folder), 0, 1)
    assert "tiny.png: 30x10 is smaller than the 16x16" in caplog.text

    only_tiny = folder.parent / "tiny"
    only_tiny.mkdir()
    _write_png(only_tiny / "tiny.png", 5, 3, seed=9)
    with pytest.raises(DataError, match="tiny"):
        build_train_batches(tiny_config(only_tiny), 0, 1)
    batch = next(build_train_batches(tiny_config(only_tiny, **{"data.small_images": "pad"}), 0, 1))
    assert batch["gt"].shape == (4, 3, 16, 16)
    cfg = tiny_config(only_tiny, **{"data.small_images": "pad", "loss.texture_weight": 0.1, "texture.region_size": 32})
    assert next(build_train_batches(cfg, 0, 1))["region"].shape == (4, 3, 32, 32)


def test_nothing_usable_is_a_user_error(tmp_path, tiny_config):
    (tmp_path / "a.png").write_bytes(b"nope")
    with pytest.raises(UserError, match=str(tmp_path)):
        build_train_batches(tiny_config(tmp_path), 0, 1)
    with pytest.raises(UserError, match="does not exist"):
        build_train_batches(tiny_config(tmp_path / "missing"), 0, 1)


def test_collate_pads_regions():
    items = [{"gt": torch.ones(1, 4, 4), "region": torch.ones(1, 6, 5), "gt_offset": torch.tensor([1, 1])},
             {"gt": torch.ones(1, 4, 4), "region": torch.ones(1, 4, 8), "gt_offset": torch.tensor([0, 2])}]
    batch = collate(items)
    assert batch["region"].shape == (2, 1, 6, 8)
    assert batch["region_valid"].sum().item() == 30 + 32
    assert batch["gt_offset"].tolist() == [[1, 1], [0, 2]]


def test_load_val_images_modcrops_and_limits(folder, tiny_config):
    (folder / "broken.png").write_bytes(b"x")
    cfg = tiny_config(folder, **{"model.upscale": 3, "data.gt_size": 18})
    images = load_val_images(cfg)
    assert [name for name, _ in images] == ["img0", "img1", "img2"]
    assert all(img.shape[1] % 3 == 0 and img.shape[2] % 3 == 0 for _, img in images)
    assert images[0][1].shape == (3, 39, 48)
    torch.testing.assert_close(images[0][1], modcrop(read_image(folder / "img0.png"), 3))
    assert len(load_val_images(apply_overrides(cfg, {"data.val_max_images": 2}))) == 2


def test_default_skimage_sources():
    cfg = apply_overrides(Config(), {"data.loader_workers": 0, "train.batch_size": 2})
    assert next(build_train_batches(cfg, 0, 1))["gt"].shape == (2, 3, 64, 64)
    assert {name for name, _ in load_val_images(cfg)} == {"chelsea", "camera", "coins"}


def test_batches_of_several_crops_per_image_depend_only_on_seed_step_rank(folder, tiny_config):
    cfg = tiny_config(folder, **{"data.crops_per_image": 3, "train.batch_size": 8, "train.seed": 5,
                                 "loss.texture_weight": 0.1, "texture.region_size": 32})
    straight = _take(build_train_batches(cfg, 0, 1), 6)
    assert all(b["gt"].shape == (8, 3, 16, 16) and b["region"].shape == (8, 3, 32, 32) for b in straight)
    # Another history: started later, in worker processes whose caches saw other images first.
    later = _take(build_train_batches(apply_overrides(cfg, {"data.loader_workers": 1}), 0, 1, start_step=4), 2)
    for a, b in zip(straight[4:], later, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    assert not torch.equal(straight[4]["gt"], straight[5]["gt"])
    other_rank = _take(build_train_batches(cfg, 1, 2, start_step=4), 1)[0]
    assert not torch.equal(other_rank["gt"], straight[4]["gt"][:4])


def test_one_decode_gives_several_different_crops(tmp_path, tiny_config):
    for i in range(4):  # flat images of four grey levels: a crop's value names its image
        Image.fromarray(np.full((32, 40, 3), 40 * (i + 1), dtype=np.uint8)).save(tmp_path / f"flat{i}.png")
    cfg = tiny_config(tmp_path, **{"data.crops_per_image": 4, "train.batch_size": 8})
    for batch in _take(build_train_batches(cfg, 0, 1), 3):
        levels = batch["gt"][:, 0, 0, 0].mul(255).round().tolist()
        assert len(set(levels[:4])) == 1 and len(set(levels[4:])) == 1

    images = FileImages(sorted(tmp_path.glob("*.png")))
    loads = []
    load = images.load
    images.load = lambda i: loads.append(i) or load(i)
    random = (np.random.default_rng(0).integers(0, 256, (32, 40, 3), dtype=np.uint8))
    Image.fromarray(random).save(tmp_path / "flat0.png")
    dataset = PatchDataset(images, PatchCutter(gt_size=8), cache_mb=0)
    loads.clear()
    items = dataset[(0, 123, 5)]
    assert loads == [0] and len(items) == 5
    assert len({item["gt"].numpy().tobytes() for item in items}) == 5  # five places, one decode
    sampler = StepBatchSampler(num_images=4, batch_size=10, seed=0, rank=0, crops_per_image=4)
    assert [count for _, _, count in sampler.batch(7)] == [4, 4, 2]
