"""Parquet shards of training images: writing them (``xswinir pack``) and reading them back.

A shard is a Parquet file with one row per image and the columns

====== ========= ===========================================================
image  binary    the encoded file bytes, exactly as they were on disk
width  int32     pixels
height int32     pixels
name   string    path relative to the packed folder (POSIX separators)
sha256 string    hex digest of ``image``
====== ========= ===========================================================

Packing is deterministic: input files are sorted, nothing time-dependent is written, so packing the same
folder twice with the same pyarrow gives byte-identical shards. Shards are read with plain pyarrow
(:class:`ShardImages`, for the data loader, the validation set and the benchmark) or with Ray Data
(:func:`read_shards`, for Ray Train's dataset shards), from a local path or any filesystem pyarrow knows
(``s3://``, ``gs://``, ...).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from xswinir.errors import UserError
from xswinir.images import ImageReadError, decode_image, resolve_image_files

if TYPE_CHECKING:
    import ray.data

    from xswinir.config import Config

log = logging.getLogger(__name__)

SCHEMA = pa.schema([
    ("image", pa.binary()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("name", pa.string()),
    ("sha256", pa.string()),
])
SHARD_PATTERN = "shard-{:05d}.parquet"
# Rows per row group: the unit a reader fetches; small enough that one row group of 2K PNGs stays ~100 MB.
ROW_GROUP_ROWS = 32


class ShardError(UserError, ValueError):
    """Shards that cannot be written or read as asked."""


@dataclass
class PackSummary:
    """What :func:`pack_images` did."""

    images: int = 0
    bytes: int = 0  # encoded image bytes written
    shards: list[Path] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)

    def __str__(self) -> str:
        lines = [f"packed {self.images} images ({self.bytes / 2**20:.1f} MiB) into {len(self.shards)} shard(s)"]
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} file(s):")
            lines.extend(f"  {name}: {reason}" for name, reason in self.skipped)
        return "\n".join(lines)


def _write_shard(rows: list[dict[str, Any]], path: Path) -> None:
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    # Images are already compressed: Parquet compression would cost CPU for nothing.
    pq.write_table(table, path, row_group_size=ROW_GROUP_ROWS, compression="none", write_statistics=False)


def pack_images(source: str | Path, out: str | Path, shard_size_mb: float = 256.0, overwrite: bool = False,
                progress: bool = True) -> PackSummary:
    """Packs the images of a source into Parquet shards ``out/shard-00000.parquet, ...``.

    Every file is decoded once to check it (and to record its size); files that are not readable images are
    named in the summary and skipped.

    Args:
        source: an image folder, an image file or ``skimage:NAMES`` (see :func:`xswinir.images.resolve_image_files`).
        out: the output folder; created if missing.
        shard_size_mb: a shard is closed once its encoded images reach this size.
        overwrite: replace existing ``shard-*.parquet`` files in ``out`` instead of refusing.
        progress: show a tqdm progress bar.

    Raises:
        ShardError: ``out`` already holds shards and ``overwrite`` is False, or nothing could be packed.
        FileNotFoundError: the source names nothing.
    """
    from tqdm import tqdm

    files = resolve_image_files(source)
    root = Path(str(source)).expanduser()
    out = Path(out)
    existing = sorted(out.glob("shard-*.parquet")) if out.is_dir() else []
    if existing and not overwrite:
        raise ShardError(f"{out} already holds {len(existing)} shard(s); pass --overwrite to replace them")
    out.mkdir(parents=True, exist_ok=True)
    for path in existing:
        path.unlink()
    summary = PackSummary()
    rows: list[dict[str, Any]] = []
    size = 0
    limit = shard_size_mb * 2**20
    for path in tqdm(files, desc="packing", unit="img", disable=not progress):
        name = path.relative_to(root).as_posix() if root.is_dir() else path.name
        try:
            data = path.read_bytes()
            image = decode_image(data, name)
        except (ImageReadError, OSError) as err:
            reason = str(err).removeprefix(f"{name}: ")
            summary.skipped.append((name, reason))
            log.warning("skipping %s: %s", name, reason)
            continue
        rows.append({"image": data, "width": image.shape[2], "height": image.shape[1], "name": name,
                     "sha256": hashlib.sha256(data).hexdigest()})
        size += len(data)
        summary.images += 1
        summary.bytes += len(data)
        if size >= limit:
            summary.shards.append(out / SHARD_PATTERN.format(len(summary.shards)))
            _write_shard(rows, summary.shards[-1])
            rows, size = [], 0
    if rows:
        summary.shards.append(out / SHARD_PATTERN.format(len(summary.shards)))
        _write_shard(rows, summary.shards[-1])
    if not summary.images:
        raise ShardError(f"no readable images in {source}; skipped {len(summary.skipped)} file(s)")
    return summary


def is_shard_source(source: str | Path) -> bool:
    """True for a ``.parquet`` file, a local folder holding ``.parquet`` files, or a URI (``s3://...``)."""
    text = str(source)
    if text.startswith("skimage:"):
        return False
    if "://" in text or text.endswith(".parquet"):
        return True
    path = Path(text).expanduser()
    return path.is_dir() and any(path.glob("*.parquet"))


def shard_files(source: str | Path) -> tuple[pafs.FileSystem, list[str]]:
    """The filesystem and sorted ``.parquet`` paths that a shard source names."""
    text = str(source)
    try:
        if "://" in text:
            fs, path = pafs.FileSystem.from_uri(text)
        else:
            fs, path = pafs.LocalFileSystem(), str(Path(text).expanduser().resolve())
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            return fs, [path]
        if info.type == pafs.FileType.NotFound:
            raise ShardError(f"shard source {source} does not exist")
        selector = pafs.FileSelector(path, recursive=True)
        files = sorted(i.path for i in fs.get_file_info(selector)
                       if i.type == pafs.FileType.File and i.path.endswith(".parquet"))
    except (OSError, pa.ArrowException) as err:
        raise ShardError(f"cannot list shards at {source}: {err}") from err
    if not files:
        raise ShardError(f"{source} holds no .parquet shards")
    return fs, files


class ShardImages:
    """All rows of a shard source, read with plain pyarrow and decoded on demand.

    The encoded bytes stay in memory (they are the compressed files); ``load(i)`` decodes one image.
    Usable wherever :mod:`xswinir.data` takes a list of images, and picklable for DataLoader workers.

    Args:
        source: a ``.parquet`` file, a folder of them or a URI.
        channels: 1 or 3; images are converted on decoding.
    """

    def __init__(self, source: str | Path, channels: int = 3) -> None:
        fs, files = shard_files(source)
        tables = []
        for path in files:
            try:
                tables.append(pq.read_table(path, filesystem=fs, columns=SCHEMA.names))
            except (OSError, pa.ArrowException) as err:
                raise ShardError(f"{path} is not a readable shard: {err}") from err
        table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
        self.source = str(source)
        self.channels = channels
        self.names: list[str] = table.column("name").to_pylist()
        self.sizes: list[tuple[int, int]] = list(zip(table.column("height").to_pylist(),
                                                     table.column("width").to_pylist(), strict=True))
        self.checksums: list[str] = table.column("sha256").to_pylist()
        self._images = table.column("image").combine_chunks()

    def __len__(self) -> int:
        return len(self.names)

    def data(self, index: int) -> bytes:
        """The encoded bytes of image ``index``, as they were in the packed file."""
        return self._images[index].as_py()

    def load(self, index: int) -> torch.Tensor:
        """Image ``index`` decoded to float32 ``(channels, H, W)`` in [0, 1]; raises ``ImageReadError``."""
        return decode_image(self.data(index), self.names[index], self.channels)


def read_shards(source: str | Path) -> ray.data.Dataset:
    """Shards as a Ray Data dataset of rows (the columns of :data:`SCHEMA`), for ``TorchTrainer(datasets=...)``."""
    import ray.data

    fs, files = shard_files(source)
    paths = files if "://" not in str(source) else [f"{str(source).split('://')[0]}://{f}" for f in files]
    return ray.data.read_parquet(paths)  # every column of SCHEMA


def batches_from_ray_shard(
    shard: Any, cfg: Config, rank: int, start_step: int = 0
) -> Iterator[dict[str, torch.Tensor]]:
    """Training batches from ``ray.train.get_dataset_shard("train")``, like :func:`xswinir.data.build_train_batches`.

    Rows arrive as encoded bytes in the order Ray Data streams them, epoch after epoch; each is decoded and
    cut (gt crop, flips, search region) with a seed derived from ``(cfg.train.seed, step, rank, slot)``.
    Crops are reproducible for the same rows; the row order is reproducible only when Ray Data preserves
    order (``DataContext.get_current().execution_options.preserve_order = True``). On resume the first
    ``start_step`` batches' rows are skipped without decoding. Unreadable and too-small images are skipped
    with a warning.

    Args:
        shard: a Ray Data ``DataIterator`` (or anything with ``iter_batches(batch_size=, batch_format=)``).
        cfg: the run's config; the per-worker batch is ``cfg.train.batch_size // cfg.run.num_workers``.
        rank: this worker's rank.
        start_step: the first step to produce.

    Yields:
        dicts as :func:`xswinir.data.collate` makes them.
    """
    from xswinir.data import PatchCutter, collate, sample_seed

    per_worker = cfg.train.batch_size // cfg.run.num_workers
    cutter = PatchCutter.from_config(cfg)
    step, slot, items, skipped = start_step, 0, [], 0
    to_skip = start_step * per_worker
    while True:
        produced = False
        for batch in shard.iter_batches(batch_size=per_worker, batch_format="numpy"):
            for data, name in zip(batch["image"], batch["name"], strict=True):
                produced = True
                if to_skip:
                    to_skip -= 1
                    continue
                try:
                    image = decode_image(bytes(data), str(name), cutter.channels)
                    image = cutter.check_size(image, str(name))
                except ImageReadError as err:
                    skipped += 1
                    log.warning("skipping %s (%d skipped so far): %s", name, skipped, err)
                    continue
                items.append(cutter(image, sample_seed(cfg.train.seed, step, rank, slot)))
                slot += 1
                if len(items) == per_worker:
                    yield collate(items)
                    step, slot, items = step + 1, 0, []
        if not produced:
            raise ShardError("the Ray dataset shard yielded no rows")
