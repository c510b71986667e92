"""The lease on an output folder: one holder, refused in one line; stale leases (dead process, no renewal, a
damaged file, a reused pid) taken over with a warning; renewal; a lost lease noticed; races between processes
won by one."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from xswinir.errors import UserError
from xswinir.lease import (
    LEASE_FILE,
    Holder,
    Lease,
    LeaseHeldError,
    LeaseRecord,
    LocalLeaseStore,
    S3LeaseStore,
    lease_store,
)
from xswinir.storage import StorageError

HOST = socket.gethostname()


def write_record(folder: Path, pid: int, host: str = HOST, renewed_ago: float = 0.0, stale_after: float = 120.0,
                 process_start: int | None = None, command: str = "xswinir train") -> Path:
    """A lease file as another holder would have left it."""
    folder.mkdir(parents=True, exist_ok=True)
    now = time.time()
    holder = Holder(pid, host, process_start, command, now - renewed_ago - 5, "other-token")
    (folder / LEASE_FILE).write_bytes(LeaseRecord(holder, now - renewed_ago, stale_after).to_bytes())
    return folder / LEASE_FILE


def holder_of(folder: Path) -> dict:
    return json.loads((folder / LEASE_FILE).read_text())["holder"]


def test_one_holder_a_second_is_refused_in_one_line_and_the_lease_goes_with_the_holder(tmp_path):
    folder = tmp_path / "runs" / "n_conc"
    with Lease(folder, "xswinir train", hint="choose another --name") as lease:
        assert lease.held and holder_of(folder)["pid"] == os.getpid()
        with pytest.raises(LeaseHeldError) as refused:
            Lease(folder, "xswinir train").acquire()
        message = str(refused.value)
        assert isinstance(refused.value, UserError) and "\n" not in message
        assert message.startswith(f"{folder} is in use by pid {os.getpid()} on host {HOST} (xswinir train, started ")
        assert message.endswith("renewed 0 s ago); wait for it to end, or choose another folder")
    assert not (folder / LEASE_FILE).exists()
    with Lease(folder, "xswinir train"):  # free again
        pass
    assert sorted(p.name for p in folder.iterdir()) == []  # nothing left behind, no lock file either


def test_a_lease_left_by_a_killed_process_is_taken_over_with_a_warning(tmp_path, caplog):
    folder = tmp_path / "run"
    child = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from xswinir.lease import Lease\n"
        f"lease = Lease({str(folder)!r}, 'xswinir train'); lease.acquire(); print('held', flush=True); "
        "time.sleep(600)")], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "held\n"
        with pytest.raises(LeaseHeldError, match=f"in use by pid {child.pid} "):
            Lease(folder, "xswinir train").acquire()
        child.send_signal(signal.SIGKILL)  # kill -9: no cleanup runs
        child.wait()
        assert holder_of(folder)["pid"] == child.pid  # left behind
        with caplog.at_level(logging.WARNING, "xswinir.lease"), Lease(folder, "xswinir train --resume"):
            assert holder_of(folder)["pid"] == os.getpid()
    finally:
        child.kill()
        child.wait()
    assert f"taking over {folder} from pid {child.pid} on host {HOST}" in caplog.text
    assert "the process is gone" in caplog.text


def test_an_unreaped_zombie_holder_counts_as_gone(tmp_path):
    folder = tmp_path / "run"
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        write_record(folder, child.pid)
        with pytest.raises(LeaseHeldError):
            Lease(folder, "xswinir pack").acquire()
        child.send_signal(signal.SIGKILL)
        deadline = time.time() + 30
        while Path(f"/proc/{child.pid}/stat").exists() and b") Z" not in Path(f"/proc/{child.pid}/stat").read_bytes():
            assert time.time() < deadline
            time.sleep(0.01)
        with Lease(folder, "xswinir pack"):  # the zombie is not reaped yet: still taken over
            pass
    finally:
        child.kill()
        child.wait()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="process start times come from /proc")
def test_a_reused_pid_is_not_mistaken_for_the_holder(tmp_path, caplog):
    folder = tmp_path / "run"
    write_record(folder, os.getpid(), process_start=1)  # our pid, but a process that started at boot
    with caplog.at_level(logging.WARNING, "xswinir.lease"), Lease(folder, "xswinir train"):
        pass
    assert "the process is gone" in caplog.text


def test_a_holder_on_another_host_is_judged_by_its_renewals(tmp_path, caplog):
    folder = tmp_path / "run"
    write_record(folder, 1, host="other-machine", renewed_ago=30, stale_after=120)
    with pytest.raises(LeaseHeldError, match="in use by pid 1 on host other-machine .*renewed 30 s ago"):
        Lease(folder, "xswinir train").acquire()
    write_record(folder, 1, host="other-machine", renewed_ago=300, stale_after=120)
    with caplog.at_level(logging.WARNING, "xswinir.lease"), Lease(folder, "xswinir train"):
        assert holder_of(folder)["host"] == HOST
    assert "it was last renewed 300 s ago (stale after 120 s)" in caplog.text


def test_a_damaged_lease_file_is_held_while_fresh_and_taken_over_when_old(tmp_path, caplog):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / LEASE_FILE).write_text('{"holder": {"pid"')  # cut short by a crash while being written
    with pytest.raises(LeaseHeldError, match="in use by a process whose lease file cannot be read"):
        Lease(folder, "xswinir train").acquire()
    os.utime(folder / LEASE_FILE, (time.time() - 1000, time.time() - 1000))
    with caplog.at_level(logging.WARNING, "xswinir.lease"), Lease(folder, "xswinir train"):
        pass
    assert "its lease file cannot be read and is 1000 s old" in caplog.text


def test_the_holder_renews_and_notices_when_its_lease_is_taken(tmp_path, caplog):
    folder = tmp_path / "run"
    with Lease(folder, "xswinir train", renew_every=0.05, stale_after=1.0) as lease:
        first = json.loads((folder / LEASE_FILE).read_text())["renewed"]
        deadline = time.time() + 30
        while json.loads((folder / LEASE_FILE).read_text())["renewed"] == first:
            assert time.time() < deadline, "never renewed"
            time.sleep(0.02)
        with caplog.at_level(logging.ERROR, "xswinir.lease"):
            write_record(folder, 1, host="other-machine")  # another process took it over meanwhile
            deadline = time.time() + 30
            while not lease.lost:
                assert time.time() < deadline, "the loss was never noticed"
                time.sleep(0.02)
    assert holder_of(folder)["host"] == "other-machine"  # release leaves the new holder's lease alone
    assert f"lost the lease on {folder} (now held by pid 1 on host other-machine" in caplog.text


def test_folders_that_cannot_hold_a_lease(tmp_path, caplog):
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    with pytest.raises(StorageError, match=f"cannot write to {blocker}: {blocker} is not a folder"):
        Lease(blocker, "xswinir pack").acquire()
    with pytest.raises(StorageError, match=f"cannot write to {blocker}/run .*is not a folder"):
        Lease(blocker / "run", "xswinir pack").acquire()
    assert isinstance(lease_store("s3://bucket/runs/n"), S3LeaseStore)  # tests/s3/test_s3_lease.py takes it
    assert lease_store("gs://bucket/runs/n") is None
    with caplog.at_level(logging.WARNING, "xswinir.lease"), Lease("gs://bucket/runs/n", "xswinir train") as lease:
        assert not lease.held
    assert ("gs://bucket/runs/n is written without a lease, so make sure no other process writes it at the same "
            "time: leases on gs:// storage are not implemented (only local disks and S3)") in caplog.text
    with pytest.raises(ValueError, match="renew_every"):
        Lease(tmp_path, "x", renew_every=5, stale_after=5)


def test_the_store_operations_are_conditional(tmp_path):
    store = LocalLeaseStore(tmp_path / "run")
    assert store.read() is None
    version = store.create(b"one")
    assert version is not None and store.create(b"two") is None
    assert store.replace(b"three", "not-the-version") is None and store.read().body == b"one"
    newer = store.replace(b"three", version)
    assert newer is not None and store.read().body == b"three"
    assert not store.delete(version) and store.delete(newer) and store.read() is None


# A process that takes the lease once the go file appears and holds it for 3 s (also tests/s3's racer).
RACER = """
import sys, time
from pathlib import Path
from xswinir.lease import Lease, LeaseHeldError
folder, go = sys.argv[1], Path(sys.argv[2])
print("ready", flush=True)
while not go.exists():
    time.sleep(0.001)
try:
    lease = Lease(folder, "racer")
    lease.acquire()
except LeaseHeldError as err:
    print("refused", err, flush=True)
else:
    print("won", flush=True)
    time.sleep(3)  # hold it while the others try
    lease.release()
"""


@pytest.mark.parametrize("stale", [False, True], ids=["free", "stale"])
def test_processes_racing_for_one_lease_one_wins(tmp_path, stale):
    folder = tmp_path / "run"
    if stale:  # every racer sees a dead holder and tries the same takeover: the replace lets one through
        write_record(folder, 1, host="other-machine", renewed_ago=1000)
    go = tmp_path / "go"
    racers = [subprocess.Popen([sys.executable, "-c", RACER, str(folder), str(go)], stdout=subprocess.PIPE,
                               text=True) for _ in range(4)]
    try:
        assert [r.stdout.readline() for r in racers] == ["ready\n"] * 4
        go.touch()
        outcomes = [r.communicate(timeout=120)[0] for r in racers]
    finally:
        for r in racers:
            r.kill()
            r.wait()
    assert sum(o.startswith("won") for o in outcomes) == 1, outcomes
    assert sum(o.startswith("refused") for o in outcomes) == 3, outcomes
    assert not (folder / LEASE_FILE).exists()


def test_a_body_that_fails_leaves_no_empty_folder_it_made(tmp_path: Path) -> None:
    """A run refused before it wrote anything (a bad init_from, say) leaves the storage as it found it."""
    folder = tmp_path / "runs" / "new"
    with pytest.raises(ValueError), Lease(folder, "xswinir train"):
        assert (folder / LEASE_FILE).is_file()
        raise ValueError("refused before any write")
    assert not (tmp_path / "runs").exists()
    kept = tmp_path / "kept"
    with pytest.raises(ValueError), Lease(kept, "xswinir train"):
        (kept / "checkpoint").mkdir()  # something was written: the folder stays, the lease goes
        raise ValueError("failed later")
    assert [p.name for p in kept.iterdir()] == ["checkpoint"]
