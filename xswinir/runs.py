"""Run folders: what a Ray Train run leaves in ``<storage>/<name>``, and where a run starts again.

A run folder holds Ray's checkpoint folders (``checkpoint_<timestamp>``, each one trusted only when its manifest
and its files agree: :func:`xswinir.checkpoint.checkpoint_problem`), the run's logs, and Ray Train V2's run
snapshot (the checkpoints Ray knows). A run *exists* once it has finished a checkpoint; a run that failed before
its first one can simply be run again.

Resuming never deletes anything, and happens in two places:

* the driver (:func:`prepare_run`, before Ray starts) picks the newest checkpoint that passes a names-and-sizes
  check (one warning per newer one skipped) and sets Ray's snapshot aside when it names anything else;
* each worker (:func:`verified_checkpoint`) takes the checkpoint it is given, or the newest older one of the run
  folder that passes, downloaded first from remote storage and checked by sha256 once local.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from xswinir.checkpoint import MANIFEST_FILE, CheckpointError, checkpoint_problem, local_copy
from xswinir.config import RunConfig
from xswinir.errors import UserError
from xswinir.paths import experiment_path, filesystem_and_path, remote_error, storage_path

if TYPE_CHECKING:
    import pyarrow.fs as pafs

log = logging.getLogger(__name__)

# Ray Train V2's run snapshot in the run folder (ray.train.v2._internal.constants): the checkpoints Ray knows.
RAY_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"


def list_checkpoints(run_path: str, filesystem: pafs.FileSystem) -> list[str]:
    """The checkpoint folders of a Ray Train run folder (``checkpoint_<timestamp>``), oldest first."""
    import pyarrow.fs as pafs

    infos = filesystem.get_file_info(pafs.FileSelector(str(run_path).rstrip("/"), allow_not_found=True))
    # Ray names them by time (checkpoint_2026-01-31_12-00-00.123456): name order is time order.
    return sorted(i.path for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_"))


def newest_good_checkpoint(
    candidates: list[str], filesystem: pafs.FileSystem, hashes: bool = True
) -> tuple[str | None, list[tuple[str, str]]]:
    """The newest checkpoint of ``candidates`` (oldest first) that passes :func:`checkpoint_problem`.

    Returns:
        The folder (None if none passes) and the ``(folder, reason)`` of every newer one that did not pass.
    """
    skipped = []
    for path in reversed(candidates):
        problem = checkpoint_problem(path, filesystem, hashes)
        if problem is None:
            return path, skipped
        skipped.append((path, problem))
    return None, skipped


def _run_checkpoints(run: RunConfig) -> tuple[pafs.FileSystem, str, list[str]]:
    """The run folder's filesystem, its path in it and its checkpoint folders (see :func:`list_checkpoints`)."""
    import pyarrow as pa

    location = experiment_path(run.storage, run.name)
    try:
        fs, path = filesystem_and_path(location)
        return fs, path, list_checkpoints(path, fs)
    except (OSError, pa.ArrowException) as err:
        raise UserError(remote_error("cannot list the run folder", location, err)) from err


def _finished(fs: pafs.FileSystem, checkpoints: list[str]) -> list[str]:
    """The checkpoint folders that got as far as their manifest (intact or not)."""
    import pyarrow.fs as pafs

    infos = fs.get_file_info([f"{path}/{MANIFEST_FILE}" for path in checkpoints])
    return [path for path, info in zip(checkpoints, infos, strict=True) if info.type == pafs.FileType.File]


def run_exists(run: RunConfig) -> bool:
    """True once the run has finished a checkpoint: a run that failed before its first one can be rerun."""
    fs, _, checkpoints = _run_checkpoints(run)
    return bool(_finished(fs, checkpoints))


def _ray_snapshot_checkpoints(fs: pafs.FileSystem, run_path: str) -> tuple[set[str], str | None] | None:
    """The checkpoint folder names Ray's run snapshot refers to and its latest; None without a snapshot.

    Raises:
        ValueError: the snapshot is not what Ray 2.60 writes.
    """
    import pyarrow.fs as pafs

    path = f"{run_path}/{RAY_SNAPSHOT_FILE}"
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        state = json.loads(f.read())
    latest = (state.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
    names = {r["checkpoint_dir_name"] for r in state["checkpoint_results"] + state["pending_training_results"]}
    return names | ({latest} if latest else set()), latest


def prepare_ray_snapshot(fs: pafs.FileSystem, run_path: str, resume_from: str | None) -> None:
    """Sets Ray's run snapshot aside unless every checkpoint it names passes and its latest is ``resume_from``.

    Ray refuses to start from a snapshot that names a missing checkpoint, would hand a damaged latest one to
    the workers, and deletes the checkpoints it knows beyond ``run.keep_checkpoints``. Renamed (not deleted),
    the snapshot is out of Ray's sight: Ray starts a new one, the workers start from ``resume_from``, and the
    older checkpoints stay until the user removes them.

    Args:
        resume_from: the name of the checkpoint folder the run starts from; None: from step 0.
    """
    import pyarrow as pa

    try:
        found = _ray_snapshot_checkpoints(fs, run_path)
        if found is None:
            return
        names, latest = found
        reason = None if latest == resume_from else f"its latest checkpoint is {latest}, not {resume_from}"
        for name in sorted(names):
            if reason is None and checkpoint_problem(f"{run_path}/{name}", fs, hashes=False) is not None:
                reason = f"it names {name}, which fails verification"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        reason = f"it is not readable ({type(err).__name__}: {err})"
    if reason is None:
        return
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d_%H-%M-%S")
    aside = f"{run_path}/{RAY_SNAPSHOT_FILE.removesuffix('.json')}.set-aside-{stamp}.json"
    try:
        fs.move(f"{run_path}/{RAY_SNAPSHOT_FILE}", aside)
    except (OSError, pa.ArrowException) as err:
        raise UserError(f"cannot set Ray's run snapshot aside in {run_path} ({err})") from err
    log.info("Ray's run snapshot set aside as %s: %s", aside, reason)


def _no_good_checkpoint(count: int, run_path: str, newest_problem: str) -> CheckpointError:
    return CheckpointError(f"none of the {count} checkpoint(s) in run folder {run_path} passes verification "
                           f"(the newest: {newest_problem}); nothing was deleted")


def prepare_run(run: RunConfig, resume: bool) -> str | None:
    """Checks the run folder against ``resume`` and readies it for Ray; returns the checkpoint to start from.

    With ``resume`` the checkpoints are verified here, before Ray reads them: the newest that passes a
    names-and-sizes check is the start (one warning per newer one skipped), and Ray's run snapshot is set aside
    if it names anything else (:func:`prepare_ray_snapshot`). What a failed run left (an unfinished checkpoint
    folder, logs) stays where it is.

    Returns:
        The checkpoint folder to start from (a local path or a URI, as workers in any folder can read it), or
        None: the run starts from step 0.

    Raises:
        UserError: the run exists and ``resume`` is False; ``resume`` is True and there is no run folder.
        CheckpointError: ``resume`` is True and no finished checkpoint passes verification.
    """
    import pyarrow.fs as pafs

    fs, run_path, checkpoints = _run_checkpoints(run)
    finished = _finished(fs, checkpoints)
    if finished and not resume:
        raise UserError(f"run '{run.name}' already exists in {storage_path(run.storage)}: pass --resume to continue "
                        "it, or choose another run.name")
    resume_from = None
    if resume and finished:
        good, skipped = newest_good_checkpoint(checkpoints, fs, hashes=False)
        for path, problem in skipped:
            log.warning("skipping checkpoint %s: %s", path, problem)
        if good is None:
            raise _no_good_checkpoint(len(checkpoints), run_path, skipped[0][1])
        resume_from = good.rsplit("/", 1)[-1]
    elif resume and fs.get_file_info(run_path).type == pafs.FileType.Directory:
        log.warning("run '%s' has no finished checkpoint: it starts from step 0", run.name)
    elif resume:
        raise UserError(f"nothing to resume: no run '{run.name}' in {storage_path(run.storage)}")
    prepare_ray_snapshot(fs, run_path, resume_from)
    return None if resume_from is None else f"{experiment_path(run.storage, run.name)}/{resume_from}"


@contextlib.contextmanager
def verified_checkpoint(checkpoint: str, filesystem: pafs.FileSystem | None = None, rank: int = 0) -> Iterator[Path]:
    """``checkpoint``, or the newest older checkpoint of its run folder that passes, as a local folder.

    Each candidate is checked on the storage (manifest, names, sizes) and then, once local, by sha256, so what
    the caller loads is what was saved. Rank 0 logs one warning per skipped checkpoint; nothing is deleted.

    Args:
        checkpoint: a checkpoint folder inside ``filesystem`` (local when None), e.g. Ray's latest.
        rank: the worker's rank: only rank 0 warns.

    Yields:
        The local folder, valid inside the ``with`` block (a download is removed after it).

    Raises:
        CheckpointError: neither ``checkpoint`` nor any older checkpoint of its run folder passes.
    """
    import pyarrow.fs as pafs

    fs = filesystem or pafs.LocalFileSystem()
    checkpoint = str(checkpoint).rstrip("/")
    run_path = checkpoint.rsplit("/", 1)[0]
    older = [p for p in list_checkpoints(run_path, fs) if p < checkpoint]
    problems = []
    for path in [checkpoint, *reversed(older)]:
        problem = checkpoint_problem(path, fs, hashes=False)
        if problem is None:
            with local_copy(path, fs) as directory:
                problem = checkpoint_problem(directory)
                if problem is None:
                    yield directory
                    return
        if rank == 0:
            log.warning("skipping checkpoint %s: %s", path, problem)
        problems.append(problem)
    raise _no_good_checkpoint(len(problems), run_path, problems[0])
