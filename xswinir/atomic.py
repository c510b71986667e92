"""Files that appear complete or not at all: write a temporary sibling, then ``os.replace`` it into place.

A reader never sees half a file, and a run killed mid-write (or a writer that raises) leaves the previous
version untouched: replacing an existing file only happens once the new one is whole. The temporary name
starts with a dot and ends in ``.tmp`` plus the target's suffix, so image writers that infer the format
from the suffix still work and folder scans (``*.png``) skip it while hidden.

Whether a file read later is still the one written is told by its digest, :func:`sha256_stream`, which the
checkpoint manifest and the sweep's signature both record.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol


def _fsync(path: Path) -> None:
    # The data must be on disk before the rename is, or a crash can leave an empty file under the final name.
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; moved onto ``path`` when the block ends without error.

    The parent folder is created. On an exception the temporary file is removed and ``path`` is unchanged.

    Example:
        >>> with atomic_path("out/result.png") as tmp:  # doctest: +SKIP
        ...     image.save(tmp, format="PNG")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp{path.suffix}")
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Writes ``data`` to ``path`` atomically (see :func:`atomic_path`); returns ``path``."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "xb") as handle:
        handle.write(data)
    return path


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Writes ``text`` to ``path`` atomically (see :func:`atomic_path`); returns ``path``."""
    return atomic_write_bytes(path, text.encode(encoding))


class _Readable(Protocol):
    """What :func:`sha256_stream` reads: an open binary file or a pyarrow ``NativeFile``."""

    def read(self, size: int = ..., /) -> bytes: ...


def sha256_stream(stream: _Readable) -> str:
    """The hex sha256 of everything left in a binary stream (a local file or a pyarrow input stream), read
    in 1 MiB chunks so that a checkpoint of any size is hashed in constant memory."""
    digest = hashlib.sha256()
    while chunk := stream.read(1 << 20):
        digest.update(chunk)
    return digest.hexdigest()
