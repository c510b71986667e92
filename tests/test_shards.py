"""Parquet shards: pack/read round trip, determinism, bad files, the CLI, training from shards, Ray Data."""

from __future__ import annotations

import hashlib
import itertools

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from xswinir.cli import main
from xswinir.config import Config, apply_overrides
from xswinir.data import build_train_batches, load_val_images
from xswinir.images import read_image
from xswinir.shards import (
    SCHEMA,
    ShardError,
    ShardImages,
    batches_from_ray_shard,
    is_shard_source,
    pack_images,
    read_shards,
)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "hr"
    (root / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, (h, w) in {"a.png": (24, 32), "sub/b.png": (40, 20), "c.jpg": (32, 32)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / name, quality=90)
    Image.fromarray(np.full((20, 20), 50000, dtype=np.uint16)).save(root / "deep.png")
    return root


def _cfg(source, **overrides) -> Config:
    base = {"data.train": str(source), "data.val": str(source), "data.gt_size": 16, "data.loader_workers": 0,
            "train.batch_size": 4, "model.upscale": 2, "model.window_size": 4}
    return apply_overrides(Config(), {**base, **overrides})


def test_round_trip_is_lossless(folder, tmp_path):
    summary = pack_images(folder, tmp_path / "shards", progress=False)
    assert summary.images == 4 and not summary.skipped and len(summary.shards) == 1
    images = ShardImages(tmp_path / "shards")
    assert images.names == ["a.png", "c.jpg", "deep.png", "sub/b.png"]
    for i, name in enumerate(images.names):
        data = (folder / name).read_bytes()
        assert images.data(i) == data
        assert images.checksums[i] == hashlib.sha256(data).hexdigest()
        pixels = images.load(i)
        torch.testing.assert_close(pixels, read_image(folder / name), rtol=0, atol=0)
        assert images.sizes[i] == tuple(pixels.shape[1:])
    table = pq.read_table(summary.shards[0])
    assert table.schema.equals(SCHEMA)


def test_packing_twice_gives_identical_bytes(folder, tmp_path):
    first = pack_images(folder, tmp_path / "one", shard_size_mb=0.002, progress=False)
    second = pack_images(folder, tmp_path / "two", shard_size_mb=0.002, progress=False)
    assert len(first.shards) > 1
    assert [p.read_bytes() for p in first.shards] == [p.read_bytes() for p in second.shards]
    # Splitting over several shards keeps every image once, in sorted order.
    assert ShardImages(tmp_path / "one").names == ["a.png", "c.jpg", "deep.png", "sub/b.png"]


def test_bad_files_are_named_and_skipped(folder, tmp_path):
    (folder / "junk.png").write_bytes(b"not an image")
    good = (folder / "a.png").read_bytes()
    (folder / "truncated.png").write_bytes(good[:100])
    summary = pack_images(folder, tmp_path / "shards", progress=False)
    assert summary.images == 4
    assert [name for name, _ in summary.skipped] == ["junk.png", "truncated.png"]
    assert "skipped 2 file(s)" in str(summary) and "junk.png" in str(summary)


def test_refuses_to_overwrite_and_to_pack_nothing(folder, tmp_path):
    pack_images(folder, tmp_path / "shards", progress=False)
    with pytest.raises(ShardError, match="--overwrite"):
        pack_images(folder, tmp_path / "shards", progress=False)
    assert pack_images(folder, tmp_path / "shards", overwrite=True, progress=False).images == 4
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.png").write_bytes(b"x")
    with pytest.raises(ShardError, match="no readable images"):
        pack_images(bad, tmp_path / "out", progress=False)


def test_cli_pack(folder, tmp_path, capsys):
    out = tmp_path / "shards"
    assert main(["pack", str(folder), str(out), "--no-progress"]) == 0
    assert "packed 4 images" in capsys.readouterr().out
    assert main(["pack", str(folder), str(out), "--no-progress"]) == 2
    assert "already holds" in capsys.readouterr().err
    assert main(["pack", str(tmp_path / "missing"), str(tmp_path / "o"), "--no-progress"]) == 2


def test_is_shard_source(folder, tmp_path):
    summary = pack_images(folder, tmp_path / "shards", progress=False)
    assert is_shard_source(tmp_path / "shards")
    assert is_shard_source(summary.shards[0])
    assert is_shard_source("s3://bucket/train")
    assert not is_shard_source(folder)
    assert not is_shard_source("skimage:train")
    with pytest.raises(ShardError, match="does not exist"):
        ShardImages(tmp_path / "nothing.parquet")


def test_training_from_shards_equals_training_from_files(folder, tmp_path):
    pack_images(folder, tmp_path / "shards", progress=False)
    for overrides in ({}, {"loss.texture_weight": 0.1, "texture.region_size": None}):
        from_files = itertools.islice(build_train_batches(_cfg(folder, **overrides), 0, 1), 3)
        from_shards = itertools.islice(build_train_batches(_cfg(tmp_path / "shards", **overrides), 0, 1), 3)
        for a, b in zip(from_files, from_shards, strict=True):
            assert a.keys() == b.keys()
            for key in a:
                torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    names = [name for name, _ in load_val_images(_cfg(tmp_path / "shards"))]
    assert names == ["a", "c", "deep", "b"]


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    import os

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    started = not ray.is_initialized()  # another test module may hold a local Ray already: reuse it
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    context = ray.data.DataContext.get_current()
    preserve_order = context.execution_options.preserve_order
    context.execution_options.preserve_order = True
    yield ray
    context.execution_options.preserve_order = preserve_order
    if started:
        ray.shutdown()


@pytest.mark.integration
def test_ray_data_reads_shards(folder, tmp_path, ray_local):
    pack_images(folder, tmp_path / "shards", shard_size_mb=0.002, progress=False)
    ds = read_shards(tmp_path / "shards")
    rows = sorted(ds.take_all(), key=lambda row: row["name"])
    assert [row["name"] for row in rows] == ["a.png", "c.jpg", "deep.png", "sub/b.png"]
    for row in rows:
        assert bytes(row["image"]) == (folder / row["name"]).read_bytes()
        assert row["sha256"] == hashlib.sha256(bytes(row["image"])).hexdigest()

    cfg = _cfg(tmp_path / "shards", **{"loss.texture_weight": 0.1, "texture.region_size": 16,
                                       "train.batch_size": 3})
    batches = list(itertools.islice(batches_from_ray_shard(ds.iterator(), cfg, rank=0), 3))  # wraps an epoch
    for batch in batches:
        assert batch["gt"].shape == (3, 3, 16, 16)
        assert batch["region"].shape == (3, 3, 16, 16) and batch["gt_offset"].shape == (3, 2)
    # With Ray Data's order preserved, the stream and a resumed stream are reproducible.
    resumed = list(itertools.islice(batches_from_ray_shard(ds.iterator(), cfg, rank=0, start_step=1), 2))
    for a, b in zip(batches[1:], resumed, strict=True):
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
