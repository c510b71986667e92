"""Checking, before Ray starts (or any other long work), that the local folders and files a command will write
can be written; and reading and writing one file, local or in a bucket, whole or not at all.

Where those folders are is :mod:`xswinir.paths`; this module only asks the local disk whether a new file can
be created there, so that a read-only storage is one line naming the folder instead of a ``PermissionError``
traceback from pyarrow inside a Ray worker. Remote storage (``s3://``, ``gs://``) is left to pyarrow.
"""

from __future__ import annotations

import contextlib
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from xswinir.atomic import atomic_path, sha256_stream
from xswinir.errors import UserError
from xswinir.paths import filesystem_and_path, is_remote, printable_path, remote_error


class StorageError(UserError):
    """A folder or file that a command must write to (or read) and cannot."""


def check_writable(*folders: str | Path) -> None:
    """Refuses, in one line naming the folder, local folders that cannot be written; URIs are left to pyarrow.

    A folder that does not exist yet is not created (a run folder's existence means something to ``--resume``):
    its nearest existing parent must be a folder that takes a new file. Called before Ray starts, so that a
    read-only storage is not a ``PermissionError`` traceback from pyarrow inside a Ray worker.

    Raises:
        StorageError: a folder, or the parent it would be created in, is not a writable folder.
    """
    for folder in folders:
        if is_remote(folder):
            continue
        path = Path(folder).expanduser().absolute()
        existing = next(p for p in (path, *path.parents) if p.exists() or p == p.parent)
        where = printable_path(path) if existing == path else f"{printable_path(path)} (in {printable_path(existing)})"
        if not existing.is_dir():
            raise StorageError(f"cannot write to {where}: {printable_path(existing)} is not a folder")
        try:
            with tempfile.TemporaryFile(dir=existing, prefix=".xswinir-write-check-"):
                pass
        except OSError as err:
            raise StorageError(f"cannot write to {where}: {err.strerror or err}; choose another folder or fix "
                               "its permissions") from err


def check_output_file(path: str | Path, what: str) -> None:
    """Refuses, in one line naming it, a local output file that cannot be written; URIs are left to pyarrow.

    An existing file is fine (writers replace it once the new one is complete); a folder by that name is not,
    and the folder the file goes in must take a new file (see :func:`check_writable`). Called before the work
    that produces the file, so that a bad path is not a traceback at its end.

    Args:
        what: the option that names the file, for the message (``"--out"``).

    Raises:
        StorageError: ``path`` is a folder, or its folder cannot be written.
    """
    if is_remote(path):
        return
    target = Path(path).expanduser().absolute()
    if target.is_dir():
        raise StorageError(f"{what} {printable_path(target)} is a folder; name the file to write")
    check_writable(target.parent)


def read_file(location: str) -> bytes | None:
    """The bytes of a file, a local path or a URI; None when there is no such file.

    Raises:
        StorageError: the file exists but cannot be read, or the store cannot be reached; one line naming
            the bucket and key and what to check.
    """
    if not is_remote(location):
        path = Path(location)
        return path.read_bytes() if path.is_file() else None
    import pyarrow as pa

    try:
        fs, path = filesystem_and_path(location)
        with fs.open_input_stream(path) as stream:
            return stream.read()
    except FileNotFoundError:
        return None
    except (OSError, pa.ArrowException) as err:
        raise StorageError(remote_error("cannot read", location, err)) from err


class Written(NamedTuple):
    """What :func:`write_file` wrote: the file's size in bytes and its sha256 (hex)."""

    size: int
    sha256: str


def write_file(location: str, render: Callable[[Path], object]) -> Written:
    """Writes a file whole or not at all: ``render(path)`` writes it to a local path first.

    A local file is moved into place once complete (:func:`xswinir.atomic.atomic_path`). A remote one is
    uploaded under a temporary name beside it and then moved onto its name: a rename on a file system, a
    server-side copy on an object store (S3's ``CopyObject`` writes the object whole). An upload cut short
    (Ctrl-C, a lost connection) therefore leaves at most a hidden ``.*.tmp`` object, never half a file under
    the name; a ``render`` that raises leaves the earlier file as it was.

    Args:
        location: the file, a local path or a URI (``s3://bucket/studies/s/study.md``).
        render: writes the file's content to the local path it is given (its suffix is the target's).

    Returns:
        The size and sha256 of what was written.

    Raises:
        StorageError: the upload failed; one line naming the bucket and key and what to check.
    """
    if not is_remote(location):
        with atomic_path(location) as tmp:
            render(tmp)
            return _digest(tmp)
    import pyarrow as pa

    with tempfile.TemporaryDirectory(prefix="xswinir_study_") as folder:
        local = Path(folder, location.rstrip("/").rsplit("/", 1)[-1])
        render(local)
        written, data = _digest(local), local.read_bytes()
    try:
        fs, path = filesystem_and_path(location)
        parent, name = path.rsplit("/", 1)
        tmp = f"{parent}/.{name}.{uuid.uuid4().hex[:12]}.tmp"
        if fs.type_name == "local":  # a file:// URI; an object store has no folders to make
            fs.create_dir(parent)
        try:
            with fs.open_output_stream(tmp) as stream:
                stream.write(data)
            fs.move(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError, pa.ArrowException):
                fs.delete_file(tmp)
            raise
    except (OSError, pa.ArrowException) as err:
        raise StorageError(remote_error("cannot write", location, err)) from err
    return written


def _digest(path: Path) -> Written:
    with path.open("rb") as f:
        return Written(path.stat().st_size, sha256_stream(f))
