"""Where runs live: local folders or remote URIs (``s3://``, ``gs://``, ...), and the paths derived from them.

The one place that decides whether a storage string is remote, so that the trainer, the sweep, the study and
job submission agree on it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from xswinir.config import RunConfig


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
