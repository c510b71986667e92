"""Parquet shards of training images: writing them (``xswinir pack``) and reading them back.

A shard is a Parquet file with one row per image and the columns

========== ========= ===========================================================
image      binary    encoded image bytes: the file as it was on disk, or a PNG sub-image
width      int32     pixels
height     int32     pixels
name       string    path relative to the packed folder (POSIX separators)
sha256     string    hex digest of ``image``
lq         binary    paired shards only (``pack --lq``): the LQ partner's encoded bytes
lq_sha256  string    paired shards only: hex digest of ``lq``
========== ========= ===========================================================

Packing is deterministic: input files are sorted, nothing time-dependent is written, so packing the same
folder twice with the same pyarrow and Pillow gives byte-identical shards. Large images can be cut into
overlapping sub-images at pack time (``sub_image``, as BasicSR's ``extract_subimages.py`` does for DIV2K), so
that training decodes 480-pixel PNGs instead of 2K ones. Shards are read with plain pyarrow
(:class:`ShardImages`) from a local path or any filesystem pyarrow knows (``s3://``, ``gs://``, ...).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
from PIL import Image, ImageOps

from xswinir.errors import UserError
from xswinir.images import ImageReadError, decode_image
from xswinir.lease import Lease
from xswinir.paths import filesystem_and_path, is_remote, printable_path, remote_error
from xswinir.sources import lq_candidates, resolve_image_files

log = logging.getLogger(__name__)

SCHEMA = pa.schema([
    ("image", pa.binary()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("name", pa.string()),
    ("sha256", pa.string()),
])
PAIRED_SCHEMA = SCHEMA.append(pa.field("lq", pa.binary())).append(pa.field("lq_sha256", pa.string()))
SHARD_PATTERN = "shard-{:05d}.parquet"
# Rows per row group: the unit a reader fetches; small enough that one row group of 2K PNGs stays ~100 MB.
ROW_GROUP_ROWS = 32
# Modes a PNG sub-image keeps as they are (16-bit and palette included); others are stored as RGB.
PNG_MODES = ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA")


class ShardError(UserError, ValueError):
    """Shards that cannot be written or read as asked."""


class PairMismatchError(ImageReadError):
    """A paired HR image whose LQ partner is missing or not its size divided by the scale."""


def check_pair_size(gt_size: tuple[int, int], lq_size: tuple[int, int], name: str, scale: int) -> None:
    """Refuses an LQ partner that is not the HR image, modcropped to the scale, divided by the scale.

    Args:
        gt_size: the HR image's ``(H, W)``, before modcrop.
        lq_size: the LQ image's ``(H, W)``.
        name: the HR image, for the message.

    Raises:
        PairMismatchError: the sizes do not agree.
    """
    H, W = gt_size[0] - gt_size[0] % scale, gt_size[1] - gt_size[1] % scale
    if tuple(lq_size) != (H // scale, W // scale):
        raise PairMismatchError(f"{printable_path(name)}: its LQ image is {lq_size[1]}x{lq_size[0]}, not {W}x{H} "
                                f"(after modcrop) / {scale}")


@dataclass
class PackSummary:
    """What :func:`pack_images` did."""

    images: int = 0  # rows written: sub-images when cutting
    files: int = 0  # source files packed
    bytes: int = 0  # encoded image bytes written
    shards: list[Path | str] = field(default_factory=list)  # URIs when packed into a bucket
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (printable name, reason)
    skip_kinds: Counter[str] = field(default_factory=Counter)  # why files were skipped, counted (see _Skip)

    def __str__(self) -> str:
        rows = f"{self.images} images" if self.images == self.files else \
            f"{self.images} sub-images of {self.files} images"
        lines = [f"packed {rows} ({self.bytes / 2**20:.1f} MiB) into {len(self.shards)} shard(s)"]
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} file(s):")
            lines.extend(f"  {name}: {reason}" for name, reason in self.skipped)
        return "\n".join(lines)


def _write_shard(rows: list[dict[str, Any]], path: Path, schema: pa.Schema) -> None:
    table = pa.Table.from_pylist(rows, schema=schema)
    # Images are already compressed: Parquet compression would cost CPU for nothing.
    pq.write_table(table, path, row_group_size=ROW_GROUP_ROWS, compression="none", write_statistics=False)


def sub_image_boxes(width: int, height: int, size: int, step: int) -> list[tuple[int, int, int, int]]:
    """``(left, top, right, bottom)`` of the ``size``-pixel sub-images every ``step`` pixels, row by row.

    As BasicSR's ``extract_subimages`` with ``thresh_size=0``: a last sub-image flush with the right and bottom
    edges covers the rest; a side shorter than ``size`` is kept whole.
    """
    def starts(side: int) -> list[int]:
        if side <= size:
            return [0]
        out = list(range(0, side - size + 1, step))
        if out[-1] + size < side:
            out.append(side - size)
        return out

    return [(x, y, x + min(size, width), y + min(size, height)) for y in starts(height) for x in starts(width)]


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    (image if image.mode in PNG_MODES else image.convert("RGB")).save(buffer, format="PNG", compress_level=3)
    return buffer.getvalue()


def _open_pil(data: bytes) -> Image.Image:
    """The image upright (EXIF orientation applied, as the decoder does), so sub-images match decoded pixels."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return ImageOps.exif_transpose(image)


def _entries(data: bytes, size: tuple[int, int], name: str, lq_data: bytes | None, scale: int,
             sub_image: int | None, sub_step: int) -> list[dict[str, Any]]:
    """The shard rows of one source image, already decoded to ``size`` (H, W): itself, or its sub-images
    (with LQ partners)."""
    if sub_image is None:
        row = {"image": data, "width": size[1], "height": size[0], "name": name}
        return [row | ({"lq": lq_data} if lq_data is not None else {})]
    rows = []
    with _open_pil(data) as image:
        lq_image = _open_pil(lq_data) if lq_data is not None else None
        width, height = image.size
        if lq_image is not None:  # modcrop: sub-images start on the LQ pixel grid
            width, height = width - width % scale, height - height % scale
        stem = Path(name)
        boxes = sub_image_boxes(width, height, sub_image, sub_step)
        for k, (left, top, right, bottom) in enumerate(boxes, start=1):
            row = {"image": _png(image.crop((left, top, right, bottom))), "width": right - left,
                   "height": bottom - top, "name": stem.with_name(f"{stem.stem}_s{k:03d}.png").as_posix()}
            if lq_image is not None:
                row["lq"] = _png(lq_image.crop((left // scale, top // scale, right // scale, bottom // scale)))
            rows.append(row)
        if lq_image is not None:
            lq_image.close()
    return rows


def pack_images(source: str | Path, out: str | Path, shard_size_mb: float = 256.0, overwrite: bool = False,
                progress: bool = True, sub_image: int | None = None, sub_step: int | None = None,
                lq_source: str | Path | None = None, scale: int | None = None, workers: int = 1) -> PackSummary:
    """Packs the images of a source into Parquet shards ``out/shard-00000.parquet, ...``.

    Every file is decoded once to check it (and to record its size); files that are not readable images
    (decompression bombs included) are named in the summary and skipped. The shards are written into a
    temporary sibling of ``out`` and moved in only once all are complete, so a pack that fails leaves any
    earlier shards in ``out`` as they were. The pack holds a lease on ``out`` (:class:`xswinir.lease.Lease`)
    from its first look at the folder to its last write, so two packs into one folder never mix.

    Args:
        source: an image folder, an image file or ``skimage:NAMES`` (see :func:`xswinir.sources.resolve_image_files`).
        out: the output folder; created if missing. A URI (``s3://bucket/shards``): packed locally, then uploaded.
        shard_size_mb: a shard is closed once its encoded images reach this size.
        overwrite: replace existing ``shard-*.parquet`` files in ``out`` instead of refusing.
        progress: show a tqdm progress bar.
        sub_image: cut each image into ``sub_image``-pixel squares (stored as PNG); None: store files as they are.
        sub_step: distance between sub-images; default ``sub_image // 2`` (BasicSR's 480 / 240).
        lq_source: a folder of LQ partners, matched by file stem as ``eval --lr`` matches them; images
            without a partner, or whose partner is not their size / ``scale``, are named and skipped.
        scale: the HR / LQ size ratio; required with ``lq_source``.
        workers: processes that read, check and cut the files (the shards are the same for any number).

    Raises:
        ShardError: ``out`` is a file, or already holds shards and ``overwrite`` is False, or nothing could be
            packed, or the sub-image settings cannot work.
        LeaseHeldError: another live process is packing into ``out``.
        StorageError: ``out`` cannot be written.
        FileNotFoundError: the source names nothing.
    """
    if is_remote(out):
        return _pack_to_remote(source, str(out), overwrite, shard_size_mb=shard_size_mb, progress=progress,
                               sub_image=sub_image, sub_step=sub_step, lq_source=lq_source, scale=scale,
                               workers=workers)
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise ShardError(f"{printable_path(out)} is a file, not a folder for shards")
    if (lq_source is None) != (scale is None):
        raise ShardError("packing LQ partners needs both lq_source (--lq) and scale (--scale)")
    sub_step = sub_step or (sub_image // 2 if sub_image else None)
    if sub_image is not None and not 0 < sub_step <= sub_image:
        raise ShardError(f"the sub-image step must lie in [1, {sub_image}], got {sub_step}")
    if scale is not None and sub_image is not None and (sub_image % scale or sub_step % scale):
        raise ShardError(f"with --lq, the sub-image size and step must be multiples of the scale {scale}")
    files = resolve_image_files(source)
    lq_files = {p.stem: p for p in resolve_image_files(lq_source)} if lq_source is not None else {}
    created = not out.exists()
    try:
        # One pack at a time per folder: two would each replace the other's shards without a word.
        with Lease(out, "xswinir pack", hint="wait for it to end, or pack into another folder"):
            existing = sorted(out.glob("shard-*.parquet"))
            if existing and not overwrite:
                raise ShardError(f"{printable_path(out)} already holds {len(existing)} shard(s); pass --overwrite "
                                 "to replace them")
            return _pack_leased(source, out, files, lq_files, lq_source, scale, shard_size_mb, progress, sub_image,
                                sub_step, workers)
    finally:
        if created:  # a pack that failed leaves no empty folder behind
            with contextlib.suppress(OSError):
                out.rmdir()


def _pack_leased(source: str | Path, out: Path, files: list[Path], lq_files: dict[str, Path],
                 lq_source: str | Path | None, scale: int | None, shard_size_mb: float, progress: bool,
                 sub_image: int | None, sub_step: int | None, workers: int) -> PackSummary:
    """:func:`pack_images` once it holds the lease on ``out``: packs into a temporary sibling, then moves in."""
    root = Path(str(source)).expanduser()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.packing-", dir=out.parent))
    try:
        jobs = []
        for path in files:
            name = path.relative_to(root).as_posix() if root.is_dir() else path.name
            found = [lq_files[s] for s in lq_candidates(name, scale) if s in lq_files] if scale else []
            jobs.append(_Job(path, name, scale, found[0] if found else None, sub_image, sub_step))
        summary = _pack_into(tmp, jobs, scale, shard_size_mb, progress, workers)
        if not summary.images:
            raise ShardError(_nothing_packed(source, lq_source, scale, summary))
        summary.shards = _move_in(tmp, out, summary.shards)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary


def _nothing_packed(source: str | Path, lq_source: str | Path | None, scale: int | None,
                    summary: PackSummary) -> str:
    """The one line for a pack whose every file was skipped: how many for which reason, and the first."""
    phrases = {_Skip.NO_PARTNER: f"without an LQ partner in {printable_path(lq_source or '')}",
               _Skip.WRONG_SIZE: f"whose LQ partner is not their size / {scale}",
               _Skip.UNREADABLE: "not readable"}
    counts = ", ".join(f"{count} {phrases[kind]}" for kind, count in summary.skip_kinds.most_common())
    name, reason = summary.skipped[0]
    return (f"nothing to pack from {printable_path(source)}: all {len(summary.skipped)} file(s) were skipped "
            f"({counts}); first: {name}: {reason}")


@dataclass
class _Job:
    """What packing one source file needs; picklable, for the worker processes."""

    path: Path
    name: str
    scale: int | None  # paired: the HR / LQ ratio
    lq_path: Path | None  # paired: the LQ partner, None when missing
    sub_image: int | None
    sub_step: int | None


@dataclass
class _Skip:
    """Why a source file was not packed."""

    NO_PARTNER = "no partner"
    WRONG_SIZE = "wrong size"
    UNREADABLE = "unreadable"

    reason: str  # the message, without the file's name
    kind: str  # one of the constants above


def _pack_one(job: _Job) -> tuple[str, list[dict[str, Any]] | _Skip]:
    """``(printable name, rows)`` of one source file, or ``(printable name, why)`` to skip it."""
    shown = printable_path(job.name)  # Parquet strings and consoles need UTF-8; file names need not be
    try:
        data = job.path.read_bytes()
        gt = decode_image(data, shown)
        lq_data = None
        if job.scale is not None:
            if job.lq_path is None:
                raise PairMismatchError(f"{shown}: no LQ partner (looked for "
                                        f"{', '.join(lq_candidates(shown, job.scale))})")
            lq_data = job.lq_path.read_bytes()
            lq = decode_image(lq_data, printable_path(job.lq_path.name))
            check_pair_size(tuple(gt.shape[1:]), tuple(lq.shape[1:]), shown, job.scale)
        rows = _entries(data, tuple(gt.shape[1:]), shown, lq_data, job.scale or 1, job.sub_image, job.sub_step)
    except (ImageReadError, OSError, Image.DecompressionBombError) as err:
        # The decoder names bombs as ImageReadError; the PIL error is caught too for the re-opened sub-images.
        kind = _Skip.UNREADABLE
        if isinstance(err, PairMismatchError):
            kind = _Skip.NO_PARTNER if job.lq_path is None else _Skip.WRONG_SIZE
        return shown, _Skip(printable_path(str(err)).removeprefix(f"{shown}: "), kind)
    for row in rows:
        row["sha256"] = hashlib.sha256(row["image"]).hexdigest()
        if "lq" in row:
            row["lq_sha256"] = hashlib.sha256(row["lq"]).hexdigest()
    return shown, rows


def _pack_into(tmp: Path, jobs: list[_Job], scale: int | None, shard_size_mb: float, progress: bool,
               workers: int) -> PackSummary:
    from concurrent.futures import ProcessPoolExecutor

    from tqdm import tqdm

    schema = PAIRED_SCHEMA if scale is not None else SCHEMA
    summary = PackSummary()
    rows: list[dict[str, Any]] = []
    size = 0
    limit = shard_size_mb * 2**20
    pool = ProcessPoolExecutor(workers) if workers > 1 and len(jobs) > 1 else None
    try:
        # map() keeps the input order, so the shards do not depend on the number of workers.
        results = pool.map(_pack_one, jobs) if pool is not None else map(_pack_one, jobs)
        for shown, entries in tqdm(results, total=len(jobs), desc="packing", unit="img", disable=not progress):
            if isinstance(entries, _Skip):
                summary.skipped.append((shown, entries.reason))
                summary.skip_kinds[entries.kind] += 1
                log.warning("skipping %s: %s", shown, entries.reason)
                continue
            summary.files += 1
            for row in entries:
                rows.append(row)
                size += len(row["image"])
                summary.images += 1
                summary.bytes += len(row["image"])
                if size >= limit:
                    summary.shards.append(tmp / SHARD_PATTERN.format(len(summary.shards)))
                    _write_shard(rows, summary.shards[-1], schema)
                    rows, size = [], 0
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    if rows:
        summary.shards.append(tmp / SHARD_PATTERN.format(len(summary.shards)))
        _write_shard(rows, summary.shards[-1], schema)
    return summary


def _move_in(tmp: Path, out: Path, shards: list[Path]) -> list[Path]:
    """Moves the complete new shards from ``tmp`` into ``out``; old shards go only once the new ones are there."""
    new = {p.name for p in shards}
    for path in shards:
        os.replace(path, out / path.name)  # atomic per file, on the same filesystem as out
    for old in out.glob("shard-*.parquet"):
        if old.name not in new:
            old.unlink()
    return [out / p.name for p in shards]


def _pack_to_remote(source: str | Path, out: str, overwrite: bool, **options: Any) -> PackSummary:
    """:func:`pack_images` into a URI: packed into a local temporary folder, then uploaded shard by shard.

    An object appears only once its upload is complete, and the shards of an earlier pack that the new ones do
    not replace are deleted only once every new one is up. Object storage has no lease: two packs into one
    prefix at the same time are not kept apart.
    """
    fs, root = filesystem_and_path(out)
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    except (OSError, pa.ArrowException) as err:
        raise ShardError(remote_error("cannot list", out, err)) from err
    existing = [i.path for i in infos if i.type == pafs.FileType.File
                and i.base_name.startswith("shard-") and i.base_name.endswith(".parquet")]
    if existing and not overwrite:
        raise ShardError(f"{out} already holds {len(existing)} shard(s); pass --overwrite to replace them")
    with tempfile.TemporaryDirectory(prefix="xswinir_pack_") as tmp:
        summary = pack_images(source, Path(tmp, "shards"), **options)
        new = {path.name for path in summary.shards}
        try:
            for path in summary.shards:
                pafs.copy_files(str(path), f"{root}/{path.name}", destination_filesystem=fs)
            for old in existing:
                if old.rsplit("/", 1)[-1] not in new:
                    fs.delete_file(old)
        except (OSError, pa.ArrowException) as err:
            raise ShardError(remote_error("cannot upload shards to", out, err)) from err
    summary.shards = [f"{out.rstrip('/')}/{name}" for name in sorted(new)]
    return summary


def is_shard_source(source: str | Path) -> bool:
    """True for a ``.parquet`` file, a local folder holding ``.parquet`` files, or a URI (``s3://...``)."""
    text = str(source)
    if text.startswith("skimage:"):
        return False
    if is_remote(text) or text.endswith(".parquet"):
        return True
    path = Path(text).expanduser()
    return path.is_dir() and any(path.glob("*.parquet"))


def shard_files(source: str | Path) -> tuple[pafs.FileSystem, list[str]]:
    """The filesystem and sorted ``.parquet`` paths that a shard source names."""
    text = str(source)
    try:
        fs, path = filesystem_and_path(text)
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


def check_shards(source: str | Path) -> list[str]:
    """The shard files of a source, each checked to hold the columns of :data:`SCHEMA` (reads footers only).

    Raises:
        ShardError: a file is unreadable, lacks a column (both named), or the files mix paired and plain rows.
    """
    fs, files = shard_files(source)
    paired = set()
    for path in files:
        try:
            schema = pq.read_schema(path, filesystem=fs)
        except (OSError, pa.ArrowException) as err:
            raise ShardError(f"{printable_path(path)} is not a readable shard: {err}") from err
        missing = [name for name in SCHEMA.names if name not in schema.names]
        if missing:
            raise ShardError(f"{printable_path(path)} is not an xswinir shard: no column "
                             f"{', '.join(repr(m) for m in missing)} (written by `xswinir pack`?)")
        paired.add("lq" in schema.names)
    if len(paired) > 1:
        raise ShardError(f"{source} mixes shards with and without LQ images (`pack --lq`)")
    return files


class ShardImages:
    """All rows of a shard source, read with plain pyarrow and decoded on demand.

    The encoded bytes stay in memory (they are the compressed files); ``load(i)`` decodes one image after
    checking its sha256. Usable wherever :mod:`xswinir.data` takes a list of images, and picklable for
    DataLoader workers (which fork after the bytes are read, so the pages are shared).

    A *damaged* row, one with an empty (null) cell where ``pack`` always writes a value, is listed like any
    other; decoding it raises ``ImageReadError`` naming the row and its shard file, so that it is named and
    skipped like a checksum mismatch. Its ``sizes`` entry is None, so that :class:`xswinir.data.PatchDataset`
    decodes it up front and skips it by name.

    Args:
        source: a ``.parquet`` file, a folder of them or a URI.
        channels: 1 or 3; images are converted on decoding.
        verify_checksums: compare each row's sha256 on decoding (a mismatch raises ``ImageReadError``).
    """

    def __init__(self, source: str | Path, channels: int = 3, verify_checksums: bool = True) -> None:
        fs, _ = shard_files(source)
        files = check_shards(source)
        self.paired = "lq" in pq.read_schema(files[0], filesystem=fs).names
        columns = (PAIRED_SCHEMA if self.paired else SCHEMA).names
        tables = []
        for path in files:
            try:
                tables.append(pq.read_table(path, filesystem=fs, columns=columns))
            except (OSError, pa.ArrowException) as err:
                raise ShardError(f"{printable_path(path)} is not a readable shard: {err}") from err
        table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
        self.source = str(source)
        self.channels = channels
        self.verify_checksums = verify_checksums
        # Which shard file each row came from, for naming a damaged one: (first row, file) per file.
        self._files = [(sum(len(t) for t in tables[:k]), path) for k, path in enumerate(files)]
        names = table.column("name").to_pylist()
        self.names: list[str] = [name if name is not None else f"row {i}" for i, name in enumerate(names)]
        self._recorded = list(zip(table.column("height").to_pylist(), table.column("width").to_pylist(), strict=True))
        # None for a damaged row (any empty cell), so that a reader that trusts the recorded sizes decodes it
        # instead, and skips it by name.
        damaged = [any(row) for row in zip(*(table.column(c).is_null().to_pylist() for c in columns), strict=True)]
        self.sizes: list[tuple[int, int] | None] = [None if bad else size
                                                    for bad, size in zip(damaged, self._recorded, strict=True)]
        self.checksums: list[str | None] = table.column("sha256").to_pylist()
        self._images = table.column("image").combine_chunks()
        if self.paired:
            self.lq_checksums: list[str | None] = table.column("lq_sha256").to_pylist()
            self._lq = table.column("lq").combine_chunks()

    def __len__(self) -> int:
        return len(self.names)

    def data(self, index: int) -> bytes | None:
        """The encoded bytes of image ``index``, as they were packed; None in a damaged row."""
        return self._images[index].as_py()

    def load(self, index: int) -> torch.Tensor:
        """Image ``index`` decoded to float32 ``(channels, H, W)`` in [0, 1]; raises ``ImageReadError``."""
        empty = [column for column, value in (("image", self._images[index].is_valid),
                                              ("width/height", None not in self._recorded[index]),
                                              ("sha256", self.checksums[index] is not None)) if not value]
        return self._decode(index, self.data(index), self.checksums[index], self.names[index], empty)

    def load_lq(self, index: int) -> torch.Tensor:
        """The LQ partner of image ``index`` (paired shards only), as :meth:`load`."""
        empty = [column for column, value in (("lq", self._lq[index].is_valid),
                                              ("lq_sha256", self.lq_checksums[index] is not None)) if not value]
        return self._decode(index, self._lq[index].as_py(), self.lq_checksums[index], f"{self.names[index]} (LQ)",
                            empty)

    def shard_of(self, index: int) -> str:
        """The shard file that holds row ``index``, printable."""
        return printable_path(next(path for first, path in reversed(self._files) if first <= index))

    def _decode(self, index: int, data: bytes | None, checksum: str | None, name: str,
                empty: list[str]) -> torch.Tensor:
        if empty:  # pack never writes an empty cell: the file was damaged, or written by another tool
            raise ImageReadError(f"{printable_path(name)}: damaged shard row (empty {', '.join(empty)} cell) in "
                                 f"{self.shard_of(index)}")
        if self.verify_checksums and hashlib.sha256(data).hexdigest() != checksum:
            raise ImageReadError(f"{name}: sha256 does not match the shard's record (corrupted shard in "
                                 f"{self.source}?)")
        return decode_image(data, name, self.channels)
