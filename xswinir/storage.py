"""Where runs live: local folders or remote URIs (``s3://``, ``gs://``, ...), and the paths derived from them.

The one place that decides whether a storage string is remote, so that the trainer, the sweep, the study and
job submission agree on it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from xswinir.config import RunConfig
from xswinir.errors import UserError


class StorageError(UserError):
    """A local folder that a run or sweep must write to and cannot."""


def is_remote(storage: str | Path) -> bool:
    """True for a URI such as ``s3://bucket/runs``, False for a local path."""
    return "://" in str(storage)


def storage_path(run: RunConfig) -> str:
    """The run's storage as Ray wants it: URIs as they are, local paths absolute."""
    if is_remote(run.storage):
        return run.storage
    return str(Path(run.storage).expanduser().resolve())


def log_dir(run: RunConfig) -> Path:
    """The run's local log folder (metrics, curves, Ray's logs): under the storage, or ``./xswinir_logs``."""
    if run.log_dir is not None:
        return Path(run.log_dir).expanduser().resolve()
    if is_remote(run.storage):
        return Path("xswinir_logs", run.name).resolve()
    return Path(storage_path(run)) / run.name / "logs"


def classifier_cache(run: RunConfig) -> Path:
    """Where texture classifiers trained on the fly are kept: ``<storage>/classifiers``, or a temp folder."""
    if is_remote(run.storage):
        return Path(tempfile.gettempdir(), "xswinir_classifiers")
    return Path(storage_path(run)) / "classifiers"


def check_writable(*folders: str | Path) -> None:
    """Refuses, in one line naming the folder, local folders that cannot be written; URIs are left to pyarrow.

    A folder that does not exist yet is not created (a run folder's existence means something to ``--resume``):
    its nearest existing parent must be a folder that takes a new file. Called before Ray starts, so that a
    read-only storage is not a ``PermissionError`` traceback from pyarrow inside a Ray worker.

    Raises:
        StorageError: a folder, or the parent it would be created in, is not a writable folder.
    """
    from xswinir.images import printable_path

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
