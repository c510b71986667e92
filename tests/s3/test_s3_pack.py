"""``xswinir pack DIR s3://bucket/shards``: the shards land in the bucket byte for byte as on disk, replace earlier
ones only with ``--overwrite``, and training batches read from the bucket are those read from disk."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import TINY
from tests.s3.conftest import Bucket
from tests.s3.endpoint import list_keys
from xswinir.cli import main
from xswinir.config import Config, apply_overrides
from xswinir.data import build_train_batches
from xswinir.images import read_image, write_image
from xswinir.sources import resolve_image_files


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three small photos (48 px) in a folder."""
    folder = tmp_path_factory.mktemp("hr")
    for path in resolve_image_files("skimage:astronaut,coffee,chelsea"):
        write_image(folder / f"{path.stem}.png", read_image(path)[:, :48, :48])
    return folder


def _pack(*args: str) -> list[str]:
    return ["pack", *args, "--no-progress", "--workers", "1"]


def test_pack_into_a_bucket_and_train_from_it(s3: Bucket, images, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # a URI once became a local folder "s3:" here
    uri = s3.uri("shards")
    assert main(_pack(str(images), uri)) == 0
    printed = capsys.readouterr().out
    assert f"{uri}/shard-00000.parquet (" in printed and f"--set data.train={uri}" in printed
    assert main(_pack(str(images), str(tmp_path / "local"))) == 0
    assert list_keys(s3.fs, s3.path("shards")) == ["shard-00000.parquet"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["local"]  # nothing else written locally
    with s3.fs.open_input_stream(s3.path("shards/shard-00000.parquet")) as f:
        assert f.read() == (tmp_path / "local" / "shard-00000.parquet").read_bytes()

    cfg = apply_overrides(Config(), {**TINY, "data.train": uri, "loss.texture_weight": 0.0})
    from_bucket = next(build_train_batches(cfg, rank=0, world_size=1))
    from_disk = next(build_train_batches(apply_overrides(cfg, {"data.train": str(tmp_path / "local")}), 0, 1))
    assert from_bucket["gt"].shape == (4, 3, 16, 16) and torch.equal(from_bucket["gt"], from_disk["gt"])


def test_pack_refuses_to_replace_shards_without_overwrite(s3: Bucket, images, capsys):
    uri = s3.uri("shards")
    assert main(_pack(str(images), uri, "--shard-size-mb", "0.001")) == 0  # one shard per image
    assert list_keys(s3.fs, s3.path("shards")) == [f"shard-0000{i}.parquet" for i in range(3)]
    capsys.readouterr()
    assert main(_pack(str(images), uri)) == 2
    assert f"{uri} already holds 3 shard(s); pass --overwrite" in capsys.readouterr().err
    assert main(_pack(str(images), uri, "--overwrite")) == 0
    assert list_keys(s3.fs, s3.path("shards")) == ["shard-00000.parquet"]  # the two left over are gone


def test_pack_into_a_missing_bucket_is_one_line(s3: Bucket, images, capsys):
    assert main(_pack(str(images), f"s3://{s3.name}-missing/shards")) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"(bucket '{s3.name}-missing', key 'shards'): NO_SUCH_BUCKET" in err
