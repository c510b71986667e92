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

import hashlib
import io
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
from PIL import Image, ImageOps

from xswinir.errors import UserError
from xswinir.images import ImageReadError, decode_image, lq_candidates, printable_path, resolve_image_files
from xswinir.storage import is_remote

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


@dataclass
class PackSummary:
    """What :func:`pack_images` did."""

    images: int = 0  # rows written: sub-images when cutting
    files: int = 0  # source files packed
    bytes: int = 0  # encoded image bytes written
    shards: list[Path] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (printable name, reason)

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


def _check_pair(gt: torch.Tensor, lq: torch.Tensor, name: str, scale: int) -> None:
    H, W = gt.shape[1] - gt.shape[1] % scale, gt.shape[2] - gt.shape[2] % scale
    if tuple(lq.shape[1:]) != (H // scale, W // scale):
        raise ImageReadError(f"{name}: its LQ image is {lq.shape[2]}x{lq.shape[1]}, not {W}x{H} (after modcrop) "
                             f"/ {scale}")


def pack_images(source: str | Path, out: str | Path, shard_size_mb: float = 256.0, overwrite: bool = False,
                progress: bool = True, sub_image: int | None = None, sub_step: int | None = None,
                lq_source: str | Path | None = None, scale: int | None = None, workers: int = 1) -> PackSummary:
    """Packs the images of a source into Parquet shards ``out/shard-00000.parquet, ...``.

    Every file is decoded once to check it (and to record its size); files that are not readable images
    (decompression bombs included) are named in the summary and skipped. The shards are written into a
    temporary sibling of ``out`` and moved in only once all are complete, so a pack that fails leaves any
    earlier shards in ``out`` as they were.

    Args:
        source: an image folder, an image file or ``skimage:NAMES`` (see :func:`xswinir.images.resolve_image_files`).
        out: the output folder; created if missing.
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
        FileNotFoundError: the source names nothing.
    """
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise ShardError(f"{printable_path(out)} is a file, not a folder for shards")
    existing = sorted(out.glob("shard-*.parquet")) if out.is_dir() else []
    if existing and not overwrite:
        raise ShardError(f"{printable_path(out)} already holds {len(existing)} shard(s); pass --overwrite to "
                         "replace them")
    if (lq_source is None) != (scale is None):
        raise ShardError("packing LQ partners needs both lq_source (--lq) and scale (--scale)")
    sub_step = sub_step or (sub_image // 2 if sub_image else None)
    if sub_image is not None and not 0 < sub_step <= sub_image:
        raise ShardError(f"the sub-image step must lie in [1, {sub_image}], got {sub_step}")
    if scale is not None and sub_image is not None and (sub_image % scale or sub_step % scale):
        raise ShardError(f"with --lq, the sub-image size and step must be multiples of the scale {scale}")
    files = resolve_image_files(source)
    lq_files = {p.stem: p for p in resolve_image_files(lq_source)} if lq_source is not None else {}
    root = Path(str(source)).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.packing-", dir=out.parent))
    try:
        jobs = []
        for path in files:
            name = path.relative_to(root).as_posix() if root.is_dir() else path.name
            found = [lq_files[s] for s in lq_candidates(name, scale) if s in lq_files] if scale else []
            jobs.append(_Job(path, name, scale, found[0] if found else None, sub_image, sub_step))
        summary = _pack_into(tmp, jobs, scale, shard_size_mb, progress, workers)
        if not summary.images:
            raise ShardError(f"no readable images in {printable_path(source)}; skipped {len(summary.skipped)} "
                             "file(s)")
        summary.shards = _move_in(tmp, out, summary.shards)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary


@dataclass
class _Job:
    """What packing one source file needs; picklable, for the worker processes."""

    path: Path
    name: str
    scale: int | None  # paired: the HR / LQ ratio
    lq_path: Path | None  # paired: the LQ partner, None when missing
    sub_image: int | None
    sub_step: int | None


def _pack_one(job: _Job) -> tuple[str, list[dict[str, Any]] | str]:
    """``(printable name, rows)`` of one source file, or ``(printable name, reason)`` to skip it."""
    shown = printable_path(job.name)  # Parquet strings and consoles need UTF-8; file names need not be
    try:
        data = job.path.read_bytes()
        gt = decode_image(data, shown)
        lq_data = None
        if job.scale is not None:
            if job.lq_path is None:
                raise ImageReadError(f"{shown}: no LQ partner (looked for "
                                     f"{', '.join(lq_candidates(shown, job.scale))})")
            lq_data = job.lq_path.read_bytes()
            _check_pair(gt, decode_image(lq_data, printable_path(job.lq_path.name)), shown, job.scale)
        rows = _entries(data, tuple(gt.shape[1:]), shown, lq_data, job.scale or 1, job.sub_image, job.sub_step)
    except (ImageReadError, OSError, Image.DecompressionBombError) as err:
        # The decoder names bombs as ImageReadError; the PIL error is caught too for the re-opened sub-images.
        return shown, printable_path(str(err)).removeprefix(f"{shown}: ")
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
            if isinstance(entries, str):
                summary.skipped.append((shown, entries))
                log.warning("skipping %s: %s", shown, entries)
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
    if not out.exists():
        os.replace(tmp, out)  # one rename: out appears complete or not at all
        return [out / p.name for p in shards]
    new = {p.name for p in shards}
    for path in shards:
        os.replace(path, out / path.name)  # atomic per file, on the same filesystem as out
    for old in out.glob("shard-*.parquet"):
        if old.name not in new:
            old.unlink()
    return [out / p.name for p in shards]


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
        if is_remote(text):
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
        self.names: list[str] = table.column("name").to_pylist()
        self.sizes: list[tuple[int, int]] = list(zip(table.column("height").to_pylist(),
                                                     table.column("width").to_pylist(), strict=True))
        self.checksums: list[str] = table.column("sha256").to_pylist()
        self._images = table.column("image").combine_chunks()
        if self.paired:
            self.lq_checksums: list[str] = table.column("lq_sha256").to_pylist()
            self._lq = table.column("lq").combine_chunks()

    def __len__(self) -> int:
        return len(self.names)

    def data(self, index: int) -> bytes:
        """The encoded bytes of image ``index``, as they were packed."""
        return self._images[index].as_py()

    def load(self, index: int) -> torch.Tensor:
        """Image ``index`` decoded to float32 ``(channels, H, W)`` in [0, 1]; raises ``ImageReadError``."""
        return self._decode(self.data(index), self.checksums[index], self.names[index])

    def load_lq(self, index: int) -> torch.Tensor:
        """The LQ partner of image ``index`` (paired shards only), as :meth:`load`."""
        return self._decode(self._lq[index].as_py(), self.lq_checksums[index], f"{self.names[index]} (LQ)")

    def _decode(self, data: bytes, checksum: str, name: str) -> torch.Tensor:
        if self.verify_checksums and hashlib.sha256(data).hexdigest() != checksum:
            raise ImageReadError(f"{name}: sha256 does not match the shard's record (corrupted shard in "
                                 f"{self.source}?)")
        return decode_image(data, name, self.channels)
