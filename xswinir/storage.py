"""Checking, before Ray starts (or any other long work), that the local folders and files a command will write
can be written.

Where those folders are is :mod:`xswinir.paths`; this module only asks the local disk whether a new file can
be created there, so that a read-only storage is one line naming the folder instead of a ``PermissionError``
traceback from pyarrow inside a Ray worker. Remote storage (``s3://``, ``gs://``) is left to pyarrow.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from xswinir.errors import UserError
from xswinir.paths import is_remote, printable_path


class StorageError(UserError):
    """A local folder that a run or sweep must write to and cannot."""


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
