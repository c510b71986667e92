"""The streaming reader (xswinir.stream): rank partitioning, the memory bound, exact resume, the automatic
choice between streaming and holding shards in memory, damaged rows skipped."""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from xswinir.checkpoint import load_checkpoint, save_checkpoint
from xswinir.config import Config, load_config
from xswinir.data import build_train_batches
from xswinir.errors import ConfigError
from xswinir.shards import SCHEMA
from xswinir.stream import SPARES, ShardIndex, ShardStream, StreamError, StreamPosition, rank_rows, stream_choice
from xswinir.trainer import build_training_parts, run_step

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROWS, GROUP_ROWS = 30, 4  # two files of 15 rows: groups of 4, 4, 4, 3 each


def _png(rng: np.random.Generator, size: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_shards(folder: Path, rows: int = ROWS, size: int = 20, files: int = 2) -> Path:
    """``rows`` random PNGs named ``img000.png, ...`` in ``files`` shards of small row groups."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    cells = [{"image": (data := _png(rng, size)), "width": size, "height": size, "name": f"img{i:03d}.png",
              "sha256": hashlib.sha256(data).hexdigest()} for i in range(rows)]
    per_file = -(-rows // files)
    for k in range(files):
        table = pa.Table.from_pylist(cells[k * per_file:(k + 1) * per_file], schema=SCHEMA)
        pq.write_table(table, folder / f"shard-{k:05d}.parquet", row_group_size=GROUP_ROWS, compression="none")
    return folder


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("stream") / "shards")


def stream_config(source: Path, *extra: str) -> Config:
    # As tests/test_trainer.py's tiny config, streamed whatever the size (stream_above_mb=0).
    return load_config("demo", [
        "model.depths=[2]", "model.num_heads=[2]", "model.embed_dim=12", "model.window_size=4",
        "model.drop_path_rate=0.5", "data.gt_size=16", "data.loader_workers=0", f"data.train={source}",
        "loss.texture_weight=0", "train.batch_size=4", "data.crops_per_image=2", "train.total_steps=6",
        "train.warmup_steps=2", "train.ema_decay=0.5", "data.stream_above_mb=0", *extra,
    ])


@pytest.mark.parametrize("world_size", [1, 2, 3, 5, 9])  # 9 > the 8 row groups: rows are dealt instead
def test_each_epoch_covers_every_row_once_across_ranks(shards, world_size):
    index = ShardIndex(shards)
    assert index.rows == ROWS and len(index.groups) == 8
    for epoch in range(3):
        rows = [row for rank in range(world_size) for row in rank_rows(index.groups, 0, epoch, rank, world_size)]
        assert sorted(rows) == list(range(ROWS))
    assert rank_rows(index.groups, 0, 0, 0, 1) != rank_rows(index.groups, 0, 1, 0, 1)  # a new order each epoch

    # What the streams hand out: every row of epoch 0 once over the ranks, before their first epoch ends.
    seen: Counter[int] = Counter()
    for rank in range(world_size):
        stream = ShardStream(index, batch_size=2, seed=0, rank=rank, world_size=world_size, capacity=6)
        share = len(rank_rows(index.groups, 0, 0, rank, world_size))
        drawn = []
        while sum(e == 0 for e, _ in drawn) < share:
            drawn += stream.position.take(stream.position.step, 2)[0]
        seen.update(row for epoch, row in drawn if epoch == 0)
    assert seen == Counter(range(ROWS))


def test_memory_holds_at_most_the_buffer_and_one_row_group(shards):
    index = ShardIndex(shards)
    stream = ShardStream(index, batch_size=4, seed=0, rank=0, world_size=1, crops_per_image=2, capacity=5)
    held = []
    for _ in range(40):  # several epochs
        keys = stream.batch()
        assert [count for _, _, count in keys] == [2, 2, 0, 0]
        held.append(stream.held_rows)
    assert max(held) <= 5 + GROUP_ROWS and stream.max_held <= 5 + GROUP_ROWS
    assert len(stream.position.buffer) <= 5
    # Bounded whatever the source: a source ten times larger holds no more.
    big = ShardStream(ShardIndex(write_shards(shards.parent / "big", rows=10 * ROWS, size=8, files=4)),
                      batch_size=4, seed=0, rank=0, world_size=1, crops_per_image=2, capacity=5)
    for _ in range(40):
        big.batch()
    assert big.max_held <= 5 + GROUP_ROWS


def test_each_row_group_is_read_about_once_per_epoch(tmp_path, monkeypatch):
    index = ShardIndex(write_shards(tmp_path / "shards", rows=10 * ROWS, size=8, files=4))
    reads: Counter[int] = Counter()
    read = index.read

    def counted(group):
        reads[group.first] += 1
        return read(group)

    monkeypatch.setattr(index, "read", counted)
    capacity = 5
    stream = ShardStream(index, batch_size=4, seed=0, rank=0, world_size=1, crops_per_image=2, capacity=capacity)
    while stream.position.epoch < 3:  # epochs 0 and 1 drawn, 2 begun
        stream.batch()
    # A group is read when its first row is drawn, and its other rows are kept until drawn (those drawn in the
    # same step too); only around an epoch's turn may a group be read again (its last copies still buffered
    # while the next epoch's wait further on). Reading a group per row drawn would be 8 times as many reads.
    assert set(reads) == {g.first for g in index.groups}
    assert sum(reads.values()) <= 3 * len(index.groups) + 3 * capacity, sorted(reads.values())


def test_position_is_replayed_or_restored_exactly(shards):
    index = ShardIndex(shards)
    straight = StreamPosition(index.groups, seed=3, rank=1, world_size=2, capacity=6)
    draws = [straight.take(step, 2) for step in range(25)]
    saved = StreamPosition(index.groups, seed=3, rank=1, world_size=2, capacity=6)
    for step in range(10):
        saved.take(step, 2)
    restored = StreamPosition(index.groups, seed=3, rank=1, world_size=2, capacity=6)
    restored.load_state_dict(saved.state_dict())
    assert [restored.take(step, 2) for step in range(10, 25)] == draws[10:]
    replayed = ShardStream(index, batch_size=2, seed=3, rank=1, world_size=2, start_step=10, capacity=6)
    assert replayed.position.state_dict() == saved.state_dict() and replayed.held_rows == 0


def test_saved_position_is_as_small_as_the_buffer_at_every_step_across_epochs(shards):
    """The rows still to come are saved as a count, not listed: restored at any step, even at an epoch's turn, the
    draws go on as in a straight run; an older checkpoint's listed form still loads; a count the source cannot
    hold is refused."""
    index = ShardIndex(shards)
    rows_per_epoch = len(rank_rows(index.groups, 3, 0, 1, 2))
    straight = StreamPosition(index.groups, seed=3, rank=1, world_size=2, capacity=4)
    steps = 3 * rows_per_epoch // 2 + 2  # two images a step: past the third epoch's turn
    states, draws = [], []
    for step in range(steps):
        states.append(straight.state_dict())
        draws.append(straight.take(step, 2))
    assert straight.epoch >= 2
    for step in range(steps):
        state = states[step]
        assert set(state) == {"step", "epoch", "epoch_rows_read", "buffer"} and len(state["buffer"]) <= 4 + SPARES
        restored = StreamPosition(index.groups, seed=3, rank=1, world_size=2, capacity=4)
        restored.load_state_dict(json.loads(json.dumps(state)))  # as a checkpoint stores it
        assert [restored.take(s, 2) for s in range(step, min(step + 4, steps))] == draws[step:step + 4]

    middle = states[steps // 2]
    epoch_rows = rank_rows(index.groups, 3, middle["epoch"], 1, 2)
    listed = {key: value for key, value in middle.items() if key != "epoch_rows_read"}
    listed["pending"] = [[middle["epoch"], row] for row in epoch_rows[middle["epoch_rows_read"]:]]
    older = StreamPosition(index.groups, seed=3, rank=1, world_size=2, capacity=4)
    older.load_state_dict(listed)
    assert older.state_dict() == middle
    with pytest.raises(StreamError, match="belongs to another source"):
        older.load_state_dict({**middle, "epoch_rows_read": len(epoch_rows) + 1})


def test_resumed_streamed_run_equals_the_straight_run(shards, tmp_path):
    cfg = stream_config(shards)

    def train(parts, start, stop):
        batches = build_train_batches(cfg, rank=0, world_size=1, start_step=start)
        return [run_step(parts, parts.model, cfg.train, step, 0, next(batches))["loss"] for step in range(start, stop)]

    parts = build_training_parts(cfg, torch.device("cpu"), None)
    straight = train(parts, 0, 6)
    straight_weights = parts.model.state_dict()
    for k in (1, 4):
        parts = build_training_parts(cfg, torch.device("cpu"), None)
        first = train(parts, 0, k)
        save_checkpoint(tmp_path / f"step{k}", cfg, parts.model, parts.ema.module, parts.optimizer, k, None)
        torch.manual_seed(1234)  # whatever a new process's global RNG holds
        parts = build_training_parts(cfg, torch.device("cpu"), None)
        start = load_checkpoint(tmp_path / f"step{k}", parts.model, parts.ema.module, parts.optimizer)
        rest = train(parts, start, 6)
        torch.testing.assert_close(torch.stack(first + rest), torch.stack(straight), atol=0, rtol=0)
        for key, value in parts.model.state_dict().items():
            torch.testing.assert_close(value, straight_weights[key], atol=0, rtol=0, msg=key)


def test_loader_processes_give_the_same_batches(shards):
    inline = build_train_batches(stream_config(shards), 0, 1)
    workers = build_train_batches(stream_config(shards, "data.loader_workers=2"), 0, 1)
    for _ in range(3):
        a, b = next(inline), next(workers)
        torch.testing.assert_close(a["gt"], b["gt"], atol=0, rtol=0)


def test_the_path_is_chosen_by_size_with_one_log_line(shards, caplog):
    size = sum(p.stat().st_size for p in shards.glob("*.parquet")) / 2**20
    assert stream_choice(stream_config(shards, f"data.stream_above_mb={size * 0.9}"))[0]
    assert not stream_choice(stream_config(shards, f"data.stream_above_mb={size * 1.1}"))[0]
    for limit, expected in ((0, "streamed"), (1000, "held in memory")):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="xswinir"):
            batch = next(build_train_batches(stream_config(shards, f"data.stream_above_mb={limit}"), 0, 1))
        lines = [r.getMessage() for r in caplog.records if "stream_above_mb" in r.getMessage()]
        assert len(lines) == 1 and expected in lines[0], lines
        assert batch["gt"].shape == (4, 3, 16, 16)
    with pytest.raises(ConfigError, match="data.stream_above_mb must be >= 0"):
        stream_config(shards, "data.stream_above_mb=-1")


def test_damaged_rows_are_named_and_skipped(tmp_path, caplog):
    shards = write_shards(tmp_path / "shards", rows=8, files=1)
    path = next(shards.glob("*.parquet"))
    table = pq.read_table(path)
    images = table.column("image").to_pylist()
    images[1] = None  # img001: an empty cell
    images[2] = images[2][:-1] + bytes([images[2][-1] ^ 1])  # img002: a flipped bit, caught by the checksum
    table = table.set_column(0, SCHEMA.field(0), pa.array(images, pa.binary()))
    pq.write_table(table, path, row_group_size=GROUP_ROWS, compression="none")
    # One image per batch: a damaged one's crops come from a spare row.
    cfg = stream_config(shards, "data.crops_per_image=4")
    with caplog.at_level(logging.WARNING):
        batches = build_train_batches(cfg, 0, 1)
        for _ in range(12):  # more than an epoch: both damaged rows are drawn
            assert next(batches)["gt"].shape == (4, 3, 16, 16)
    assert f"img001.png: damaged shard row (empty image cell) in {path}" in caplog.text
    assert "img002.png: sha256 does not match" in caplog.text
    assert caplog.text.count("img001.png: damaged shard row") == 1  # named once per process
