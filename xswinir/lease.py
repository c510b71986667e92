"""One owner per output folder: a lease that refuses a second writer, and that a dead holder cannot keep.

``train``, ``tune``, ``study`` and ``pack`` write a folder that only one process may write at a time: two
trainings under one run name would interleave their checkpoints and metrics, two packs would replace each
other's shards. Each takes a :class:`Lease` on its folder before writing; a second process is refused in one
line that names the holder (:class:`LeaseHeldError`, exit status 2).

The lease is a small JSON file in the folder, :data:`LEASE_FILE`: the holder's process id, host, start time
and a random token, and the time it was last renewed. A background thread renews it every ``renew_every``
seconds while the holder runs; the holder removes it when it ends, also after an error or Ctrl-C. A process
killed outright (``kill -9``, a lost machine) leaves it behind, and it is *stale*, taken over with a warning by
the next process, when

* its host is this host and the holder process is gone (known at once: ``--resume`` after a crash needs no
  flag), or
* it has not been renewed for ``stale_after`` seconds (a holder on another machine, whose process this host
  cannot see).

Every change goes through four operations of a :class:`LeaseStore`, chosen so that object storage can do them
as atomically as a local disk:

========================= ===================================== ============================================
operation                 local disk (:class:`LocalLeaseStore`)  S3
========================= ===================================== ============================================
create if absent          ``open(O_CREAT | O_EXCL)``             ``PutObject`` with ``If-None-Match: *``
read (body, version)      read; version = sha256 of the body     ``GetObject``; version = the ETag
replace if still version  compare and replace under ``flock``    ``PutObject`` with ``If-Match: <ETag>``
delete if still version   compare and unlink under ``flock``     ``DeleteObject`` with ``If-Match: <ETag>``
========================= ===================================== ============================================

Two drivers on two machines therefore cannot both win a lease, nor both take over one stale lease: the
create, and the replace that a takeover is, succeed for one of them only (S3 answers the loser 412). The S3
store (:class:`S3LeaseStore`) sends these requests with boto3, since pyarrow's S3 filesystem sends no
conditional writes; it reaches the store the AWS variables name, as :func:`xswinir.paths.s3_filesystem` does.
Other object stores (``gs://``), and S3 without boto3 installed, are written without a lease, with a warning.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from xswinir.atomic import atomic_write_bytes
from xswinir.errors import UserError
from xswinir.paths import DEFAULT_S3_REGION, bucket_and_key, is_remote, printable_path, s3_endpoint
from xswinir.storage import StorageError, check_writable

try:  # POSIX; elsewhere the O_EXCL create alone keeps two writers apart, and a takeover may race
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

log = logging.getLogger(__name__)

LEASE_FILE = ".xswinir-lease.json"
# A holder renews every 15 s; 8 missed renewals make its lease stale. Long enough for a suspended laptop's
# clock jump or a stalled NFS write to pass, short enough that a resume after a lost machine waits 2 minutes.
RENEW_EVERY_S = 15.0
STALE_AFTER_S = 120.0
# A create and a takeover can each lose a race to another process; after this many, something keeps changing
# the lease and the caller is told so rather than looping.
ACQUIRE_ATTEMPTS = 5


class LeaseHeldError(UserError):
    """Another live process holds the lease on the folder (the message names it)."""


@dataclass(frozen=True)
class Holder:
    """Who holds a lease.

    Attributes:
        pid: the holder's process id on ``host``.
        host: the holder's host name.
        process_start: the process's start time in clock ticks since boot (Linux ``/proc/<pid>/stat``), so
            that a new process that reuses the pid is not taken for the holder; None where unknown.
        command: what the holder is doing (``"xswinir train"``), for the messages.
        started: when the holder took the lease, seconds since the epoch.
        token: random, unique to this lease: a holder recognises its own lease by it.
    """

    pid: int
    host: str
    process_start: int | None
    command: str
    started: float
    token: str

    def describe(self, renewed: float, now: float) -> str:
        """``pid 4242 on host box (xswinir train, started 2026-01-02 10:11:12 UTC, renewed 3 s ago)``."""
        started = datetime.fromtimestamp(self.started, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        return (f"pid {self.pid} on host {self.host} ({self.command}, started {started}, renewed "
                f"{max(0.0, now - renewed):.0f} s ago)")


@dataclass(frozen=True)
class LeaseRecord:
    """The lease file's content: its holder, when it was last renewed, and how old it may grow."""

    holder: Holder
    renewed: float  # seconds since the epoch, by the holder's clock
    stale_after: float  # seconds without renewal after which anyone may take the lease over

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> LeaseRecord | None:
        """The record, or None for a lease file that is not one (cut short by a crash while being written)."""
        try:
            raw: dict[str, Any] = json.loads(data)
            return cls(Holder(**raw["holder"]), float(raw["renewed"]), float(raw["stale_after"]))
        except (ValueError, TypeError, KeyError, AttributeError):
            return None


class Stored(NamedTuple):
    """A lease as a store holds it: its bytes, a version tag for the conditional operations, when written."""

    body: bytes
    version: str
    modified: float  # seconds since the epoch, by the store's clock


class LeaseStore(Protocol):
    """Where a lease lives; every method is atomic against other processes and machines (see the module doc)."""

    where: str  # the folder, printable, for messages

    def create(self, body: bytes) -> str | None:
        """Writes the lease if there is none and returns its version; None when there is one."""
        ...

    def read(self) -> Stored | None:
        """The lease, or None when there is none."""
        ...

    def replace(self, body: bytes, version: str) -> str | None:
        """Replaces the lease if it is still ``version`` and returns the new version; None when it changed
        or went."""
        ...

    def delete(self, version: str) -> bool:
        """Removes the lease if it is still ``version``; False when it changed or went."""
        ...


class LocalLeaseStore:
    """A lease in a local folder: created with ``O_CREAT | O_EXCL``; read, replaced and deleted while holding
    an exclusive ``flock`` on the folder itself, so that a compare-and-replace is one step for other processes.

    Locking the folder (not a lock file beside the lease) leaves nothing behind when the lease goes. Where
    the filesystem refuses ``flock`` (some network filesystems) the create stays atomic and the lock is skipped.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder).expanduser().absolute()
        self.path = self.folder / LEASE_FILE
        self.where = printable_path(self.folder)
        self._made: list[Path] = []  # folders the create made, deepest first: removed again if left empty

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            fd = os.open(self.folder, os.O_RDONLY)
        except FileNotFoundError:  # no folder, no lease in it: nothing to keep apart
            yield
            return
        try:
            if fcntl is not None:
                with contextlib.suppress(OSError):
                    fcntl.flock(fd, fcntl.LOCK_EX)  # released when fd is closed
            yield
        finally:
            os.close(fd)

    def _read(self) -> Stored | None:
        try:
            with open(self.path, "rb") as handle:
                body = handle.read()
                modified = os.fstat(handle.fileno()).st_mtime
        except FileNotFoundError:
            return None
        return Stored(body, hashlib.sha256(body).hexdigest(), modified)

    def create(self, body: bytes) -> str | None:
        missing = [f for f in (self.folder, *self.folder.parents) if not f.exists()]
        self.folder.mkdir(parents=True, exist_ok=True)
        self._made = self._made or missing
        with self._locked():
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return None
            try:
                os.write(fd, body)
                os.fsync(fd)  # on disk before anyone is told they hold it
            finally:
                os.close(fd)
            return hashlib.sha256(body).hexdigest()

    def read(self) -> Stored | None:
        with self._locked():
            return self._read()

    def replace(self, body: bytes, version: str) -> str | None:
        with self._locked():
            current = self._read()
            if current is None or current.version != version:
                return None
            atomic_write_bytes(self.path, body)  # a reader without the lock never sees half a lease
            return hashlib.sha256(body).hexdigest()

    def delete(self, version: str) -> bool:
        with self._locked():
            current = self._read()
            if current is None or current.version != version:
                return False
            self.path.unlink()
            return True

    def remove_made_folders(self) -> None:
        """Removes the folders the create made, if they are empty: a run refused before it wrote anything
        leaves no empty run folder behind (rmdir fails on a non-empty one, which then stays)."""
        for folder in self._made:
            try:
                folder.rmdir()
            except OSError:
                break
        self._made = []


# S3's answers that mean "not this version" rather than a failure: a conditional request lost (412, or 409 for a
# concurrent one), or the lease gone meanwhile; and, for a read, "no lease".
_LOST_RACE = ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "404", "412", "409")
_NO_LEASE = ("NoSuchKey", "404")
_NOT_THIS_VERSION = object()


class S3LeaseStore:
    """A lease as an S3 object, ``<folder>/.xswinir-lease.json``, changed only by conditional requests.

    ``PutObject`` with ``If-None-Match: *`` creates it only where there is none, ``PutObject`` and
    ``DeleteObject`` with ``If-Match: <ETag>`` change it only while it is the version read; the store answers
    412 (Precondition Failed) or 409 (a concurrent conditional request) to the loser, which is told "no" here.

    Args:
        folder: ``s3://bucket/prefix``.
    """

    def __init__(self, folder: str) -> None:
        import boto3  # only for leases on S3: pyarrow's S3 filesystem sends no conditional requests

        self.where = folder.rstrip("/")
        self.bucket, prefix = bucket_and_key(folder)
        self.key = f"{prefix}/{LEASE_FILE}" if prefix else LEASE_FILE
        endpoint = s3_endpoint()
        if endpoint is not None and "://" not in endpoint:  # a bare "minio:9000": https, as the SDKs take it
            endpoint = f"https://{endpoint}"
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        self._client = boto3.client("s3", endpoint_url=endpoint,
                                    region_name=region or (DEFAULT_S3_REGION if endpoint else None))

    def _request(self, doing: str, send: Callable[[], Any], not_this_version: tuple[str, ...]) -> Any:
        """``send()``'s answer, or ``_NOT_THIS_VERSION`` where the store answers one of the codes
        ``not_this_version`` ("not this version": a lost race, or no lease), not a failure.

        Raises:
            OSError: any other answer, or no answer, with what was being done and the store's reason.
        """
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return send()
        except ClientError as err:
            error = getattr(err, "response", {}).get("Error", {})
            if error.get("Code") in not_this_version:
                return _NOT_THIS_VERSION
            reason = f"{error.get('Code')} ({error.get('Message')})" if error else str(err)
        except BotoCoreError as err:
            reason = str(err)
        raise OSError(f"{doing} s3://{self.bucket}/{self.key}: {reason}")

    def create(self, body: bytes) -> str | None:
        answer = self._request("cannot write the lease", lambda: self._client.put_object(
            Bucket=self.bucket, Key=self.key, Body=body, IfNoneMatch="*"), _LOST_RACE)
        return None if answer is _NOT_THIS_VERSION else answer["ETag"]

    def read(self) -> Stored | None:
        answer = self._request("cannot read the lease", lambda: self._client.get_object(
            Bucket=self.bucket, Key=self.key), _NO_LEASE)
        if answer is _NOT_THIS_VERSION:
            return None
        return Stored(answer["Body"].read(), answer["ETag"], answer["LastModified"].timestamp())

    def replace(self, body: bytes, version: str) -> str | None:
        answer = self._request("cannot write the lease", lambda: self._client.put_object(
            Bucket=self.bucket, Key=self.key, Body=body, IfMatch=version), _LOST_RACE)
        return None if answer is _NOT_THIS_VERSION else answer["ETag"]

    def delete(self, version: str) -> bool:
        answer = self._request("cannot remove the lease", lambda: self._client.delete_object(
            Bucket=self.bucket, Key=self.key, IfMatch=version), _LOST_RACE)
        return answer is not _NOT_THIS_VERSION


def lease_store(folder: str | Path) -> LeaseStore | None:
    """The store for a lease on ``folder``: local, or S3 for ``s3://``; None where there is none (another
    object store, or S3 without boto3): the folder is then written without a lease (see :func:`no_store_reason`).
    """
    if not is_remote(folder):
        return LocalLeaseStore(folder)
    if str(folder).startswith("s3://"):
        try:
            return S3LeaseStore(str(folder))
        except ImportError:
            return None
    return None


def no_store_reason(folder: str | Path) -> str:
    """Why :func:`lease_store` has no store for ``folder``, for the warning."""
    if str(folder).startswith("s3://"):
        return "leases on S3 need boto3 (pip install boto3)"
    return f"leases on {str(folder).split('://', 1)[0]}:// storage are not implemented (only local disks and S3)"


def _process_start(pid: int) -> int | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux), or None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            fields = handle.read().rsplit(b")", 1)[1].split()  # after "(command name)", which may hold spaces
        return int(fields[19])  # field 22 of proc(5), counted from field 3
    except (OSError, IndexError, ValueError):
        return None


def _process_gone(pid: int, process_start: int | None) -> bool:
    """True when process ``pid`` of this host no longer runs: no such process, a zombie, or another process
    that reuses the pid (its start time differs)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, and another user's
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            state = handle.read().rsplit(b")", 1)[1].split()[0]
        if state in (b"Z", b"X"):  # killed but not yet reaped by its parent
            return True
    except (OSError, IndexError):
        pass
    now = _process_start(pid)
    return process_start is not None and now is not None and now != process_start


def stale_reason(record: LeaseRecord | None, modified: float, now: float, host: str) -> str | None:
    """Why a lease may be taken over, or None while its holder may still be writing.

    Args:
        record: the lease (None: a lease file that cannot be read, judged by its age alone).
        modified: when the store last wrote the lease, seconds since the epoch.
        now: the time now, seconds since the epoch.
        host: this host's name.
    """
    if record is None:
        age = now - modified
        return f"its lease file cannot be read and is {age:.0f} s old" if age > STALE_AFTER_S else None
    holder = record.holder
    if holder.host == host and _process_gone(holder.pid, holder.process_start):
        return "the process is gone"
    age = now - record.renewed
    if age > record.stale_after:
        return f"it was last renewed {age:.0f} s ago (stale after {record.stale_after:.0f} s)"
    return None


class Lease:
    """A lease on an output folder for as long as the ``with`` block runs (see the module doc).

    Args:
        folder: the folder (created if missing); a URI is written without a lease, with a warning.
        command: what the holder does, for the messages (``"xswinir train"``).
        hint: what a refused process should do instead, appended to its error.
        renew_every: seconds between renewals.
        stale_after: seconds without renewal after which the lease may be taken over; written into the lease,
            so every reader applies the holder's own figure.
        store: where the lease lives; default :func:`lease_store` of ``folder``.

    Raises:
        LeaseHeldError: on entering, when a live process holds the lease.
        StorageError: the folder cannot be written.

    Example:
        >>> with Lease("runs/n_conc", "xswinir train"):  # doctest: +SKIP
        ...     fit(cfg)
    """

    def __init__(self, folder: str | Path, command: str, hint: str = "wait for it to end, or choose another folder",
                 renew_every: float = RENEW_EVERY_S, stale_after: float = STALE_AFTER_S,
                 store: LeaseStore | None = None) -> None:
        if not 0 < renew_every < stale_after:
            raise ValueError(f"renew_every must lie in (0, stale_after={stale_after}), got {renew_every}")
        self.folder = folder
        self.command = command
        self.hint = hint
        self.renew_every = renew_every
        self.stale_after = stale_after
        self.store = store if store is not None else lease_store(folder)
        self.host = socket.gethostname()
        self.lost = False  # set when another process took the lease over while this one still ran
        self._version: str | None = None
        self._holder: Holder | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # the renewal thread and release() never change the lease at once

    @property
    def held(self) -> bool:
        """True between a successful acquire and the release."""
        return self._version is not None

    def _record(self, now: float) -> bytes:
        assert self._holder is not None
        return LeaseRecord(self._holder, now, self.stale_after).to_bytes()

    def acquire(self) -> None:
        """Takes the lease: creates it, or takes a stale one over with a warning; starts the renewal thread.

        Raises:
            LeaseHeldError: a live process holds it.
            StorageError: the folder cannot be written.
        """
        if self.store is None:
            log.warning("%s is written without a lease, so make sure no other process writes it at the same "
                        "time: %s", printable_path(self.folder), no_store_reason(self.folder))
            return
        if isinstance(self.store, LocalLeaseStore):
            check_writable(self.store.folder)  # one line naming the folder, not an OSError from the create
        try:
            self._acquire()
        except OSError as err:  # the store cannot be reached or written (S3: a bucket, its keys, the network)
            raise StorageError(f"cannot take the lease on {self.store.where}: {err}") from err

    def _acquire(self) -> None:
        assert self.store is not None
        now = time.time()
        self._holder = Holder(os.getpid(), self.host, _process_start(os.getpid()), self.command, now,
                              uuid.uuid4().hex)
        for _ in range(ACQUIRE_ATTEMPTS):
            version = self.store.create(self._record(time.time()))
            if version is not None:
                self._taken(version)
                return
            stored = self.store.read()
            if stored is None:
                continue  # released between our create and our read: try the create again
            record = LeaseRecord.from_bytes(stored.body)
            now = time.time()
            reason = stale_reason(record, stored.modified, now, self.host)
            holder = record.holder.describe(record.renewed, now) if record is not None else \
                "a process whose lease file cannot be read"
            if reason is None:
                raise LeaseHeldError(f"{self.store.where} is in use by {holder}; {self.hint}")
            version = self.store.replace(self._record(now), stored.version)
            if version is not None:
                log.warning("taking over %s from %s: %s", self.store.where, holder, reason)
                self._taken(version)
                return
            # Another process changed the lease between our read and our replace (took it over, or renewed it).
        raise LeaseHeldError(f"{self.store.where}: its lease kept changing during {ACQUIRE_ATTEMPTS} attempts to "
                             f"take it (several processes starting at once?); {self.hint}")

    def _taken(self, version: str) -> None:
        self._version = version
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew_loop, name="xswinir-lease", daemon=True)
        self._thread.start()

    def renew(self) -> bool:
        """Writes a new renewal time into the lease; False (and :attr:`lost` set) when it is no longer ours."""
        with self._lock:
            if self._version is None or self.lost:
                return False
            assert self.store is not None and self._holder is not None
            version = self.store.replace(self._record(time.time()), self._version)
            if version is None:
                stored = self.store.read()
                record = LeaseRecord.from_bytes(stored.body) if stored is not None else None
                if record is not None and record.holder.token == self._holder.token:
                    # Ours, from a renewal whose answer was lost (a storage error after the write): go on from it.
                    version = self.store.replace(self._record(time.time()), stored.version)
            if version is not None:
                self._version = version
                return True
            self.lost = True
            now = time.time()
            now_held = f"now held by {record.holder.describe(record.renewed, now)}" if record is not None else \
                "it was removed"
            log.error("lost the lease on %s (%s): another process may be writing this folder", self.store.where,
                      now_held)
            return False

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.renew_every):
            try:
                if not self.renew():
                    return
            except OSError as err:  # a passing storage error: the next renewal may succeed
                log.warning("could not renew the lease on %s: %s", self.store.where, err)

    def release(self) -> None:
        """Stops renewing and removes the lease if it is still ours; never raises for a lease already gone."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._lock:
            if self._version is not None and not self.lost:
                try:
                    self.store.delete(self._version)
                except OSError as err:  # the work is done; a left-over lease is taken over as stale later
                    log.warning("could not remove the lease on %s: %s", self.store.where, err)
            self._version = None

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        self.release()
        if exc_type is not None and isinstance(self.store, LocalLeaseStore):
            self.store.remove_made_folders()
