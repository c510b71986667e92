"""Training batches streamed from Parquet shards: memory per worker bounded however large the dataset.

The in-memory path (:class:`xswinir.shards.ShardImages`) holds every encoded image of the source in each
training worker. This one holds at most a shuffle buffer of encoded rows (plus the row group being read):

* **rank partitioning** - every epoch, the row groups of all shard files are put in an order drawn from
  ``(train.seed, epoch)``, the same on every rank, and rank ``r`` reads groups ``r, r + world, ...`` of it, so
  an epoch covers every row exactly once across the ranks (with fewer row groups than ranks, rows are dealt
  instead: rank ``r`` keeps the rows whose global index is ``r`` modulo the world size);
* **on demand** - a row group is read (``pyarrow.parquet``, from disk or any filesystem pyarrow knows) when
  the first of its rows is drawn from the buffer, and its bytes are dropped row by row as they are drawn;
* **a shuffle buffer** of :data:`SHUFFLE_ROWS` rows: each step draws its images at random from it;
* **decoding in the DataLoader's worker processes**: the sampler hands them the encoded rows with the crop
  seeds, they check, decode and cut, as on the in-memory path.

The position (epoch, row-group cursor, the rows in the buffer) is the bookkeeping of row *indices* only, and
every draw of step ``t`` comes from a generator seeded with ``(train.seed, t, rank)``, as the in-memory
sampler's. So the position at step ``t`` is a function of ``t``: a run resumed at step ``t`` replays the index
bookkeeping up to ``t`` (no image is read; tens of microseconds a step) and then reads exactly the rows the
straight run read. :meth:`StreamPosition.state_dict` gives the same position as a small dict, for a checkpoint.

A damaged row (an empty cell, a checksum that does not match, an image that cannot be decoded or is too
small) is named in a warning, once per loader process, and its crops are cut from the next usable image of the
same batch; each batch carries :data:`SPARES` other rows drawn (not taken) from the buffer for that, decoded only
when needed, so even a batch of one image goes on.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import logging
import random
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from torch import Tensor
from torch.utils.data import Dataset

from xswinir.config import Config
from xswinir.errors import UserError
from xswinir.images import ImageReadError, decode_image
from xswinir.paths import printable_path
from xswinir.resize import modcrop
from xswinir.seeds import batch_seed, crop_seed, hash_seed
from xswinir.shards import (
    PAIRED_SCHEMA,
    SCHEMA,
    ShardError,
    check_pair_size,
    check_shards,
    shard_files,
)

log = logging.getLogger(__name__)

# Rows the shuffle buffer holds: ~256 x 0.4 MB for 480 px PNG sub-images. Larger mixes more, costs memory.
SHUFFLE_ROWS = 256
# Rows drawn (not taken) with each batch as stand-ins for damaged ones; decoded only when one is needed.
SPARES = 2
# The epoch order's seed is hash_seed(seed, EPOCH_STEP, epoch): no batch has step -1, so it meets no batch seed.
EPOCH_STEP = -1


class StreamError(UserError, ValueError):
    """A shard source that cannot be streamed as asked."""


@dataclass(frozen=True)
class RowGroup:
    """One row group of one shard file: the unit read from storage."""

    file: int  # index into ShardIndex.files
    group: int  # row group within the file
    first: int  # global index of its first row
    rows: int


class ShardIndex:
    """The row groups of a shard source, from the files' footers only (no image is read).

    Args:
        source: a ``.parquet`` file, a folder of them or a URI.
    """

    def __init__(self, source: str | Path) -> None:
        self.source = str(source)
        self.fs, _ = shard_files(source)
        self.files = check_shards(source)
        self.metadata: list[pq.FileMetaData] = []
        self.groups: list[RowGroup] = []
        first = 0
        try:
            for k, path in enumerate(self.files):
                meta = pq.read_metadata(path, filesystem=self.fs)
                self.metadata.append(meta)
                for g in range(meta.num_row_groups):
                    rows = meta.row_group(g).num_rows
                    self.groups.append(RowGroup(k, g, first, rows))
                    first += rows
            self.bytes = sum(info.size for info in self.fs.get_file_info(self.files))
        except (OSError, pa.ArrowException) as err:
            raise ShardError(f"cannot read the shard footers of {source}: {err}") from err
        self.rows = first
        self.paired = "lq" in self.metadata[0].schema.to_arrow_schema().names
        self.columns = (PAIRED_SCHEMA if self.paired else SCHEMA).names

    def read(self, group: RowGroup) -> list[dict[str, Any]]:
        """The rows of one row group as dicts of the shard's columns, plus ``shard`` (printable path)."""
        path = self.files[group.file]
        try:
            reader = pq.ParquetFile(path, filesystem=self.fs, metadata=self.metadata[group.file])
            # One thread: the reads are a few percent of a step, and Arrow's pool would spend CPU the loader needs.
            rows = reader.read_row_group(group.group, columns=self.columns, use_threads=False).to_pylist()
        except (OSError, pa.ArrowException) as err:
            raise ShardError(f"{printable_path(path)}: cannot read row group {group.group}: {err}") from err
        for row in rows:
            row["shard"] = printable_path(path)
        return rows


def encoded_size_mb(source: str | Path) -> float:
    """The size of a shard source's files in MiB (listing only)."""
    fs, files = shard_files(source)
    try:
        return sum(info.size for info in fs.get_file_info(files)) / 2**20
    except (OSError, pa.ArrowException) as err:
        raise ShardError(f"cannot list shards at {source}: {err}") from err


def rank_rows(groups: list[RowGroup], seed: int, epoch: int, rank: int, world_size: int) -> list[int]:
    """The global row indices rank ``rank`` reads in ``epoch``, in reading order.

    Over the ranks they are every row exactly once.
    """
    order = list(range(len(groups)))
    random.Random(hash_seed(seed, EPOCH_STEP, epoch)).shuffle(order)
    if len(groups) >= world_size:
        return [row for k in order[rank::world_size]
                for row in range(groups[k].first, groups[k].first + groups[k].rows)]
    return [row for k in order for row in range(groups[k].first, groups[k].first + groups[k].rows)
            if row % world_size == rank]


class StreamPosition:
    """Where one rank's stream is: the epoch, the rows of the epoch still to come, the shuffle buffer.

    Only row indices; entries are ``(epoch, global row)``, so that a row met again in the next epoch while its
    first copy is still buffered stays a separate entry.

    Args:
        groups: the source's row groups (:attr:`ShardIndex.groups`).
        seed: ``train.seed``.
        rank: this worker's rank in ``[0, world_size)``.
        world_size: number of workers.
        capacity: rows the buffer holds; raised to the images of one batch plus the spares when smaller.
    """

    def __init__(self, groups: list[RowGroup], seed: int, rank: int, world_size: int,
                 capacity: int = SHUFFLE_ROWS) -> None:
        self.groups = groups
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.capacity = capacity
        self.epoch = -1
        self.pending: deque[tuple[int, int]] = deque()  # rows of the current epoch not yet in the buffer
        self.epoch_rows = 0  # rows of the current epoch: `pending` is always the last len(pending) of them
        self.buffer: list[tuple[int, int]] = []
        self.step = 0
        if not rank_rows(groups, seed, 0, rank, world_size):
            raise StreamError(f"rank {rank} of {world_size} gets no shard row: the source has "
                              f"{sum(g.rows for g in groups)} rows; use fewer workers")

    def _fill(self, need: int) -> None:
        while len(self.buffer) < max(self.capacity, need):
            if not self.pending:
                self.epoch += 1
                self.pending.extend((self.epoch, row) for row in rank_rows(self.groups, self.seed, self.epoch,
                                                                             self.rank, self.world_size))
                self.epoch_rows = len(self.pending)
            self.buffer.append(self.pending.popleft())

    def take(self, step: int, images: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]], list[int]]:
        """Draws step ``step``'s rows from the buffer (refilled first).

        Returns:
            ``(rows taken, spares, crop seeds)``: ``images`` entries taken out of the buffer, up to :data:`SPARES`
            other images drawn but left in it (stand-ins for damaged rows), and one crop seed per row taken.
        """
        rng, taken = self._take(step, images)
        # The spares: from a random place on, the first entries that are other images than those taken (a small
        # source's buffer holds several epochs, so several copies of one row).
        j, n = rng.randrange(len(self.buffer)), len(self.buffer)
        rows = {row for _, row in taken}
        spares: list[tuple[int, int]] = []
        for k in range(n):
            entry = self.buffer[(j + k) % n]
            if entry[1] not in rows:
                spares.append(entry)
                rows.add(entry[1])
                if len(spares) == SPARES:
                    break
        seeds = [rng.getrandbits(62) for _ in range(images)]
        return taken, spares, seeds

    def skip(self, step: int, images: int) -> None:
        """Moves past step ``step`` as :meth:`take` does, without the draws that do not move the position."""
        self._take(step, images)

    def _take(self, step: int, images: int) -> tuple[random.Random, list[tuple[int, int]]]:
        if step != self.step:
            raise StreamError(f"the stream is at step {self.step}, not {step}: steps must follow one another")
        self._fill(images + SPARES)
        rng = random.Random(batch_seed(self.seed, step, self.rank))
        taken = []
        for _ in range(images):
            j = rng.randrange(len(self.buffer))
            taken.append(self.buffer[j])
            self.buffer[j] = self.buffer[-1]  # swap-remove: O(1), and the order stays a function of the draws
            self.buffer.pop()
        self.step += 1
        return rng, taken

    def state_dict(self) -> dict[str, Any]:
        """The position as plain data: enough to continue exactly, without replaying.

        Its size is the buffer's (``capacity`` entries, a few kB), not the source's: the rows still to come in the
        epoch are a suffix of :func:`rank_rows`, so how many of the epoch's rows were read says which.
        """
        return {"step": self.step, "epoch": self.epoch, "epoch_rows_read": self.epoch_rows - len(self.pending),
                "buffer": list(self.buffer)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continues from :meth:`state_dict`'s dict (or an older one that lists the rows still to come)."""
        self.step, self.epoch = state["step"], state["epoch"]
        self.buffer = [tuple(entry) for entry in state["buffer"]]
        rows = rank_rows(self.groups, self.seed, self.epoch, self.rank, self.world_size) if self.epoch >= 0 else []
        if "pending" in state:  # written before epoch_rows_read existed: the rows still to come, listed
            state = {**state, "epoch_rows_read": len(rows) - len(state["pending"])}
        read = state["epoch_rows_read"]
        if not 0 <= read <= len(rows):
            raise StreamError(f"the saved stream position read {read} rows of epoch {self.epoch}, which has "
                              f"{len(rows)} for rank {self.rank}: the checkpoint belongs to another source")
        self.epoch_rows = len(rows)
        self.pending = deque((self.epoch, row) for row in rows[read:])


class ShardStream:
    """The batch sampler of the stream: each step, the encoded rows of its images with their crop seeds.

    Holds the bytes of at most ``capacity`` buffered rows plus the rest of the row group last read
    (:attr:`held_rows`). Yields lists of keys for :class:`StreamDataset`: ``(row, seed, count)`` per image,
    then the spares ``(row, 0, 0)``.

    Args:
        index: the source's row groups.
        batch_size: items per step on this rank.
        crops_per_image: items cut from each decoded image.
        start_step: the first step; the position before it is replayed from the row indices.
    """

    def __init__(self, index: ShardIndex, batch_size: int, seed: int, rank: int, world_size: int,
                 start_step: int = 0, crops_per_image: int = 1, capacity: int = SHUFFLE_ROWS) -> None:
        self.index = index
        self.batch_size = batch_size
        self.crops_per_image = crops_per_image
        self.position = StreamPosition(index.groups, seed, rank, world_size, capacity)
        self.held: dict[tuple[int, int], dict[str, Any]] = {}
        self.max_held = 0
        self._group_of = {g.first: g for g in index.groups}
        self._firsts = sorted(self._group_of)
        for step in range(start_step):  # indices only: no row is read
            self.position.skip(step, self.images)

    @property
    def images(self) -> int:
        return -(-self.batch_size // self.crops_per_image)

    @property
    def held_rows(self) -> int:
        """Encoded rows this stream holds in memory now."""
        return len(self.held)

    def _group(self, row: int) -> RowGroup:
        return self._group_of[self._firsts[bisect.bisect_right(self._firsts, row) - 1]]

    def _row(self, entry: tuple[int, int], drawn: list[tuple[int, int]]) -> dict[str, Any]:
        """The bytes of entry ``entry`` of this step's ``drawn`` ones; reads its row group first when not held."""
        if entry not in self.held:
            group = self._group(entry[1])
            rows = self.index.read(group)

            def in_group(e: tuple[int, int]) -> bool:
                return group.first <= e[1] < group.first + group.rows

            # The rows of the group still to be handed out: this step's (taken out of the buffer already), those in
            # the buffer and those about to enter it, at the head of `pending` (a rank reads a group's rows one
            # after another). Only these: looking through all of `pending` would cost a step time that grows
            # with the dataset.
            waiting = {*filter(in_group, drawn), *filter(in_group, self.position.buffer),
                       *itertools.takewhile(in_group, self.position.pending)}
            for e in waiting:
                self.held[e] = rows[e[1] - group.first] | {"index": e[1]}
            self.max_held = max(self.max_held, len(self.held))
        return self.held[entry]

    def batch(self) -> list[tuple[dict[str, Any], int, int]]:
        """The next step's keys."""
        taken, spares, seeds = self.position.take(self.position.step, self.images)
        k = self.crops_per_image
        counts = [k] * (len(taken) - 1) + [self.batch_size - k * (len(taken) - 1)]
        drawn = [*taken, *spares]
        keys = [(self._row(entry, drawn), seed, count) for entry, seed, count in zip(taken, seeds, counts, strict=True)]
        keys += [(self._row(entry, drawn), 0, 0) for entry in spares]
        for entry in taken:
            self.held.pop(entry, None)
        return keys

    def __iter__(self) -> Iterator[list[tuple[dict[str, Any], int, int]]]:
        while True:
            yield self.batch()


class StreamDataset(Dataset):
    """Decodes the encoded rows :class:`ShardStream` hands out and cuts their items (in the loader workers).

    Args:
        cutter: how an item is cut (:class:`xswinir.data.PatchCutter`).
        paired: the rows carry LQ partners.
        verify_checksums: compare each row's sha256 before decoding.
    """

    def __init__(self, cutter: Any, paired: bool, verify_checksums: bool = True) -> None:
        self.cutter = cutter
        self.paired = paired
        self.verify_checksums = verify_checksums
        self.warned: set[str] = set()  # damaged rows named once per loader process

    def __len__(self) -> int:  # the stream is endless; DataLoader only needs the method
        return 0

    def _cell(self, row: dict[str, Any], name: str, column: str, checksum: str, extra: list[str]) -> Tensor:
        empty = [c for c, value in ((column, row[column]), (checksum, row[checksum])) if value is None] + extra
        if empty:  # pack never writes an empty cell: the file was damaged, or written by another tool
            raise ImageReadError(f"{printable_path(name)}: damaged shard row (empty {', '.join(empty)} cell) in "
                                 f"{row['shard']}")
        data = row[column]
        if self.verify_checksums and hashlib.sha256(data).hexdigest() != row[checksum]:
            raise ImageReadError(f"{name}: sha256 does not match the shard's record (corrupted shard "
                                 f"{row['shard']}?)")
        return decode_image(data, name, self.cutter.channels)

    def decode(self, row: dict[str, Any]) -> tuple[Tensor, Tensor | None]:
        """A row's image (modcropped when paired) and LQ partner, checked; raises ``ImageReadError``."""
        name = row["name"] if row["name"] is not None else f"row {row['index']}"
        sizes = [] if None not in (row["width"], row["height"]) else ["width/height"]
        image = self._cell(row, name, "image", "sha256", sizes)
        if not self.paired:
            return self.cutter.check_size(image, name), None
        s = self.cutter.scale
        image = modcrop(image, s)
        lq = self._cell(row, f"{name} (LQ)", "lq", "lq_sha256", [])
        check_pair_size(tuple(image.shape[1:]), tuple(lq.shape[1:]), name, s)
        return self.cutter.check_size(image, name, paired=True), lq

    def __getitems__(self, keys: list[tuple[dict[str, Any], int, int]]) -> list[list[dict[str, Tensor]]]:
        """The items of one step: ``count`` per image; a damaged image's from the next usable one of the batch."""
        decoded: dict[int, tuple[Tensor, Tensor | None] | None] = {}

        def usable(j: int) -> tuple[Tensor, Tensor | None] | None:
            if j not in decoded:  # lazily: the spares are decoded only when an image fails
                try:
                    decoded[j] = self.decode(keys[j][0])
                except ImageReadError as err:
                    decoded[j] = None
                    if str(err) not in self.warned:
                        self.warned.add(str(err))
                        log.warning("skipping %s; using the next image of the batch instead", err)
            return decoded[j]

        out = []
        for i, (_, seed, count) in enumerate(keys):
            if not count:
                continue
            pair = next((p for j in [*range(i, len(keys)), *range(i)] if (p := usable(j)) is not None), None)
            if pair is None:
                raise StreamError(f"no image of this batch can be read (first: {sorted(self.warned)[0]})")
            image, lq = pair
            out.append([self.cutter(image, seed if c == 0 else crop_seed(seed, c), lq) for c in range(count)])
        return out

    def __getitem__(self, key: tuple[dict[str, Any], int, int]) -> list[dict[str, Tensor]]:
        return self.__getitems__([key])[0]


def stream_choice(cfg: Config) -> tuple[bool, str]:
    """Whether ``data.train`` (shards) streams: when its encoded size is over ``data.stream_above_mb``.

    Returns:
        ``(stream, why)``: the decision and the reason, for the log line.
    """
    size = encoded_size_mb(cfg.data.train)
    limit = cfg.data.stream_above_mb
    if size > limit:
        return True, f"{size:.0f} MiB of shards > data.stream_above_mb={limit:g}: streamed, {SHUFFLE_ROWS}-row buffer"
    return False, f"{size:.0f} MiB of shards <= data.stream_above_mb={limit:g}: held in memory"


class StreamRecorder:
    """The batch sampler of streamed training data: a :class:`~xswinir.stream.ShardStream` that keeps its position
    for the checkpoints.

    The DataLoader draws each step's keys ahead of the training loop (``prefetch_factor`` steps per loader
    process), so when the checkpoint after ``t`` steps is written the stream is already further on. This keeps a
    copy of the position (:meth:`~xswinir.stream.StreamPosition.state_dict`) as it stood before each step that
    follows a checkpoint.

    Args:
        stream: the stream the DataLoader draws from, through this.
        checkpoint_after: whether a checkpoint is written after this many steps.
    """

    def __init__(self, stream: ShardStream, checkpoint_after: Callable[[int], bool]) -> None:
        self.stream = stream
        self.checkpoint_after = checkpoint_after
        self._kept: dict[int, dict[str, Any]] = {}

    def __iter__(self) -> Iterator[list[tuple[dict[str, Any], int, int]]]:
        while True:
            position = self.stream.position
            if self.checkpoint_after(position.step):
                self._kept[position.step] = position.state_dict()
            yield self.stream.batch()

    def position(self, step: int) -> dict[str, Any]:
        """The stream's position after ``step`` steps (the next one to draw is step ``step``)."""
        for older in [s for s in self._kept if s < step]:
            del self._kept[older]
        if step in self._kept:
            return self._kept.pop(step)
        if self.stream.position.step != step:  # the loop asked for a step that is not a checkpoint's
            raise ValueError(f"no stream position kept for step {step} (the stream is at {self.stream.position.step})")
        return self.stream.position.state_dict()  # nothing drawn ahead (no loader processes): it stands there

    def for_checkpoint(self, positions: list[dict[str, Any]]) -> dict[str, Any]:
        """What a checkpoint keeps: every rank's position (indexed by rank) and what they are positions in."""
        return {"world_size": len(positions), "seed": self.stream.position.seed, "rows": self.stream.index.rows,
                "positions": positions}
