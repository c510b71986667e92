"""Parquet shards: pack/read round trip, determinism, sub-images, bad files and schemas, checksums, overwriting
safely, the CLI, training from shards."""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from xswinir.cli import main
from xswinir.data import build_train_batches, check_train_source, load_val_images
from xswinir.images import ImageReadError, read_image
from xswinir.lease import LEASE_FILE
from xswinir.shards import (
    SCHEMA,
    ShardError,
    ShardImages,
    is_shard_source,
    pack_images,
    sub_image_boxes,
)


@pytest.fixture
def folder(tmp_path):
    return write_images(tmp_path / "hr")


def write_images(root):
    """Four images of three kinds, one in a sub-folder, one 16-bit gray."""
    (root / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, (h, w) in {"a.png": (24, 32), "sub/b.png": (40, 20), "c.jpg": (32, 32)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / name, quality=90)
    Image.fromarray(np.full((20, 20), 50000, dtype=np.uint16)).save(root / "deep.png")
    return root


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
    with pytest.raises(ShardError, match=r"nothing to pack from .*bad: all 1 file\(s\) were skipped \(1 not "
                                         r"readable\); first: x.png: not a readable image"):
        pack_images(bad, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()  # a pack that failed leaves no folder behind


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


def test_training_from_shards_equals_training_from_files(folder, tmp_path, tiny_config):
    pack_images(folder, tmp_path / "shards", progress=False)
    for overrides in ({}, {"loss.texture_weight": 0.1, "texture.region_size": None}):
        from_files = itertools.islice(build_train_batches(tiny_config(folder, **overrides), 0, 1), 3)
        from_shards = itertools.islice(build_train_batches(tiny_config(tmp_path / "shards", **overrides), 0, 1), 3)
        for a, b in zip(from_files, from_shards, strict=True):
            assert a.keys() == b.keys()
            for key in a:
                torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    names = [name for name, _ in load_val_images(tiny_config(tmp_path / "shards"))]
    assert names == ["a", "c", "deep", "b"]


def test_sub_image_boxes_cover_the_image_as_basicsr():
    assert sub_image_boxes(1000, 480, 480, 240) == [(0, 0, 480, 480), (240, 0, 720, 480), (480, 0, 960, 480),
                                                    (520, 0, 1000, 480)]
    assert sub_image_boxes(300, 200, 480, 240) == [(0, 0, 300, 200)]  # smaller than a sub-image: whole
    for width, height, size, step in ((1000, 700, 480, 240), (97, 61, 32, 20)):
        covered = np.zeros((height, width), dtype=bool)
        for left, top, right, bottom in sub_image_boxes(width, height, size, step):
            assert right - left == size and bottom - top == size
            covered[top:bottom, left:right] = True
        assert covered.all()


def test_sub_images_are_lossless_crops(folder, tmp_path):
    summary = pack_images(folder, tmp_path / "shards", sub_image=16, sub_step=12, progress=False)
    assert summary.files == 4 and summary.images > 4
    assert "sub-images of 4 images" in str(summary)
    images = ShardImages(tmp_path / "shards")
    assert images.names[:4] == ["a_s001.png", "a_s002.png", "a_s003.png", "a_s004.png"]  # a.png is 32x24
    a = read_image(folder / "a.png")
    for i, (left, top, right, bottom) in enumerate(sub_image_boxes(32, 24, 16, 12)):
        assert images.sizes[i] == (16, 16)
        torch.testing.assert_close(images.load(i), a[:, top:bottom, left:right], rtol=0, atol=0)
    deep = images.names.index("deep_s001.png")  # 16-bit stays 16-bit
    torch.testing.assert_close(images.load(deep), read_image(folder / "deep.png")[:, :16, :16], rtol=0, atol=0)
    assert images.names[-1].startswith("sub/b_s")
    again = pack_images(folder, tmp_path / "again", sub_image=16, sub_step=12, progress=False, workers=2)
    assert [p.read_bytes() for p in summary.shards] == [p.read_bytes() for p in again.shards]  # any worker count
    with pytest.raises(ShardError, match="step"):
        pack_images(folder, tmp_path / "x", sub_image=16, sub_step=20, progress=False)


def test_overwrite_keeps_the_old_shards_until_the_new_ones_are_complete(folder, tmp_path):
    out = tmp_path / "shards"
    first = pack_images(folder, out, shard_size_mb=0.002, progress=False)
    before = {p.name: p.read_bytes() for p in first.shards}
    (out / "notes.txt").write_text("mine")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.png").write_bytes(b"not an image")
    with pytest.raises(ShardError, match="nothing to pack from .*broken"):
        pack_images(broken, out, overwrite=True, progress=False)
    assert {p.name: p.read_bytes() for p in out.glob("shard-*.parquet")} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "hr", "shards"]  # no temporary left over
    one = tmp_path / "one"
    one.mkdir()
    (one / "a.png").write_bytes((folder / "a.png").read_bytes())
    second = pack_images(one, out, overwrite=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "shard-00000.parquet"]  # stale shards gone
    assert second.shards == [out / "shard-00000.parquet"] and ShardImages(out).names == ["a.png"]
    fresh = pack_images(one, tmp_path / "new" / "shards", progress=False)
    assert fresh.shards == [tmp_path / "new" / "shards" / "shard-00000.parquet"]


def test_pack_into_a_file_is_a_user_error(folder, tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    assert main(["pack", str(folder), str(target), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "is a file" in err and len(err.splitlines()) == 1
    assert target.read_text() == "x"


def test_file_names_that_are_not_utf8(folder, tmp_path, capfd):
    (folder / os.fsdecode(b"caf\xe9.png")).write_bytes((folder / "a.png").read_bytes())
    (folder / os.fsdecode(b"bad\xff.png")).write_bytes(b"junk")
    assert main(["pack", str(folder), str(tmp_path / "shards"), "--no-progress"]) == 0
    out = capfd.readouterr().out
    assert "bad\\xff.png: not a readable image" in out
    assert "caf\\xe9.png" in ShardImages(tmp_path / "shards").names


def test_decompression_bombs_are_named_and_skipped(folder, tmp_path, monkeypatch):
    monkeypatch.setenv("XSWINIR_MAX_PIXELS", "600")  # 32 x 24 pixels is a "bomb" here
    summary = pack_images(folder, tmp_path / "shards", progress=False)
    assert [name for name, _ in summary.skipped] == ["a.png", "c.jpg", "sub/b.png"]
    assert summary.images == 1  # deep.png, 20 x 20


def _rewrite(path, change):
    pq.write_table(change(pq.read_table(path)), path)


def test_wrong_schema_is_refused_before_training(folder, tmp_path, tiny_config):
    pack_images(folder, tmp_path / "shards", shard_size_mb=0.002, progress=False)
    last = sorted((tmp_path / "shards").glob("*.parquet"))[-1]
    _rewrite(last, lambda t: t.rename_columns(["pixels" if c == "image" else c for c in t.column_names]))
    cfg = tiny_config(tmp_path / "shards", **{"run.storage": str(tmp_path / "runs")})
    with pytest.raises(ShardError, match=f"{last.name} is not an xswinir shard: no column 'image'"):
        check_train_source(cfg)
    with pytest.raises(ShardError, match="no column 'image'"):
        ShardImages(tmp_path / "shards")
    from xswinir.trainer import fit

    with pytest.raises(ShardError, match="no column 'image'"):  # raised before Ray starts
        fit(cfg)
    check_train_source(tiny_config(folder))


def test_checksum_mismatch_is_a_named_skip(folder, tmp_path, caplog, tiny_config):
    pack_images(folder, tmp_path / "shards", progress=False)

    def corrupt(table):
        sums = table.column("sha256").to_pylist()
        sums[1] = "0" * 64  # c.jpg
        return table.set_column(table.column_names.index("sha256"), "sha256", pa.array(sums, pa.string()))

    _rewrite(next((tmp_path / "shards").glob("*.parquet")), corrupt)
    cfg = tiny_config(tmp_path / "shards", **{"data.crops_per_image": 1})  # 24 draws of 4 images
    with caplog.at_level(logging.WARNING):
        batches = list(itertools.islice(build_train_batches(cfg, 0, 1), 6))
    assert all(b["gt"].shape == batches[0]["gt"].shape for b in batches)
    assert "c.jpg: sha256 does not match" in caplog.text
    caplog.clear()
    unchecked = tiny_config(tmp_path / "shards", **{"data.crops_per_image": 1, "data.verify_checksums": False})
    with caplog.at_level(logging.WARNING):
        list(itertools.islice(build_train_batches(unchecked, 0, 1), 6))
    assert "sha256" not in caplog.text


def test_sub_images_of_a_rotated_photo_are_cut_upright(tmp_path):
    folder = tmp_path / "hr"
    folder.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # EXIF orientation: shown rotated by 90 degrees
    pixels = np.random.default_rng(1).integers(0, 256, (20, 36, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / "phone.jpg", exif=exif, quality=95)
    upright = read_image(folder / "phone.jpg")
    assert upright.shape[1:] == (36, 20)  # the decoder turns it upright
    pack_images(folder, tmp_path / "shards", sub_image=16, sub_step=16, progress=False)
    images = ShardImages(tmp_path / "shards")
    for i, (left, top, right, bottom) in enumerate(sub_image_boxes(20, 36, 16, 16)):
        torch.testing.assert_close(images.load(i), upright[:, top:bottom, left:right], rtol=0, atol=0)


def _null_cells(table, cells):
    """The table with the ``{column: row}`` cells set to null, as a damaged file or another writer may have them."""
    for column, row in cells.items():
        values = table.column(column).to_pylist()
        values[row] = None
        index = table.column_names.index(column)
        table = table.set_column(index, table.schema.field(index), pa.array(values, table.schema.field(index).type))
    return table


def test_null_cells_are_damaged_rows_named_and_skipped(folder, tmp_path, caplog, capsys, tiny_config):
    from xswinir.texture.training import load_training_images

    shards = tmp_path / "shards"
    pack_images(folder, shards, progress=False)
    shard = next(shards.glob("*.parquet"))
    _rewrite(shard, lambda t: _null_cells(t, {"image": 1, "width": 2}))  # c.jpg, deep.png
    images = ShardImages(shards)
    assert images.sizes[2] is None and images.names[1] == "c.jpg"
    with pytest.raises(ImageReadError, match=f"c.jpg: damaged shard row \\(empty image cell\\) in {shard}"):
        images.load(1)
    with pytest.raises(ImageReadError, match="deep.png: damaged shard row \\(empty width/height cell\\)"):
        images.load(2)
    with caplog.at_level(logging.WARNING):
        batch = next(build_train_batches(tiny_config(shards, **{"data.small_images": "pad"}), 0, 1))
        assert len(load_training_images(str(shards))) == 2
    assert batch["gt"].shape[0] == 4
    assert caplog.text.count("c.jpg: damaged shard row") == 2 and "deep.png: damaged shard row" in caplog.text

    assert main(["eval", "--hr", str(shards), "--scale", "2", "--bicubic"]) == 0  # measured the rest
    text = "".join(capsys.readouterr())
    assert "Traceback" not in text and "c.jpg: damaged shard row (empty image cell)" in text

    _rewrite(shard, lambda t: _null_cells(t, {"name": 0}))
    assert ShardImages(shards).names[0] == "row 0"  # a row without a name is still named


def _write_slow_source(root):
    """Images that take a pack with 16-pixel sub-images a few seconds: long enough for a second pack to meet it."""
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(root / f"{i}.png")
    return root


_SLOW_PACK = ["--sub-image", "16", "--sub-image-step", "8", "--workers", "1", "--no-progress", "--overwrite"]


def _start_pack(src, out):
    return subprocess.Popen([sys.executable, "-m", "xswinir", "pack", str(src), str(out), *_SLOW_PACK],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_lease(out, process):
    deadline = time.time() + 300
    while not (out / LEASE_FILE).exists():
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline
        time.sleep(0.005)


def _shard_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("shard-*.parquet"))}


def test_two_packs_into_one_folder_at_once_one_is_refused(tmp_path):
    src = _write_slow_source(tmp_path / "src")
    out = tmp_path / "out"
    pack_images(src, tmp_path / "earlier", progress=False)  # out already holds shards: both ask for --overwrite
    os.replace(tmp_path / "earlier", out)
    # The second pack has imported everything before the first takes its lease; it starts on a line on stdin.
    second = subprocess.Popen([sys.executable, "-c", (
        "import sys; import xswinir.shards; from xswinir.cli import main; sys.stdin.readline(); "
        f"sys.exit(main(['pack', {str(src)!r}, {str(out)!r}, *{_SLOW_PACK!r}]))")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = _start_pack(src, out)
    try:
        _wait_for_lease(out, first)
        second.stdin.write("go\n")
        second.stdin.flush()
        _, err = second.communicate(timeout=300)
        assert second.returncode == 2, err
        assert err.strip() == (f"xswinir pack: error: {out} is in use by pid {first.pid} on host "
                               f"{socket.gethostname()} (xswinir pack, started {err.split('started ')[1][:23]}, "
                               f"renewed {err.split('renewed ')[1].split()[0]} s ago); wait for it to end, or pack "
                               "into another folder")
        first_out, first_err = first.communicate(timeout=300)
        assert first.returncode == 0, first_err
    finally:
        for process in (first, second):
            process.kill()
            process.wait()
    assert "packed 1800 sub-images of 8 images" in first_out
    solo = pack_images(src, tmp_path / "solo", sub_image=16, sub_step=8, progress=False)
    assert _shard_bytes(out) == _shard_bytes(tmp_path / "solo") and len(solo.shards) == 1
    assert sorted(p.name for p in out.iterdir()) == ["shard-00000.parquet"]  # no lease, no stale shard left


def test_a_pack_killed_midway_leaves_a_stale_lease_the_next_pack_takes_over(tmp_path, caplog):
    src = _write_slow_source(tmp_path / "src")
    out = tmp_path / "out"
    first = _start_pack(src, out)
    try:
        _wait_for_lease(out, first)
        first.send_signal(signal.SIGKILL)
        first.wait()
    finally:
        first.kill()
        first.wait()
    assert (out / LEASE_FILE).exists() and not list(out.glob("shard-*.parquet"))
    with caplog.at_level(logging.WARNING, "xswinir.lease"):
        assert main(["pack", str(src), str(out), *_SLOW_PACK]) == 0
    assert f"taking over {out} from pid {first.pid} on host" in caplog.text and "the process is gone" in caplog.text
    pack_images(src, tmp_path / "solo", sub_image=16, sub_step=8, progress=False)
    assert _shard_bytes(out) == _shard_bytes(tmp_path / "solo")
    assert not (out / LEASE_FILE).exists()
