"""The lease on a folder in a bucket (``S3LeaseStore``): conditional requests on the local S3 server keep a second
holder out, let one of several racing processes win, and let a stale lease (a killed holder) be taken over."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.s3.conftest import Bucket
from tests.test_lease import RACER
from xswinir.lease import LEASE_FILE, Holder, Lease, LeaseHeldError, LeaseRecord, S3LeaseStore, lease_store
from xswinir.storage import StorageError

HOST = socket.gethostname()


def _holder(s3: Bucket, key: str) -> dict | None:
    path = s3.path(f"{key}/{LEASE_FILE}")
    if s3.fs.get_file_info(path).type.name == "NotFound":
        return None
    with s3.fs.open_input_stream(path) as f:
        return json.loads(f.read())["holder"]


def test_a_second_holder_is_refused_and_the_lease_goes_with_the_first(s3: Bucket):
    folder = s3.uri("runs/n_conc")
    assert isinstance(lease_store(folder), S3LeaseStore)
    with Lease(folder, "xswinir train", hint="choose another run name (--name)"):
        assert _holder(s3, "runs/n_conc")["pid"] == os.getpid()
        with pytest.raises(LeaseHeldError) as refused:
            Lease(folder, "xswinir train", hint="choose another run name (--name)").acquire()
        assert str(refused.value).startswith(f"{folder} is in use by pid {os.getpid()} on host {HOST} (xswinir "
                                             "train, started ")
        assert str(refused.value).endswith("; choose another run name (--name)")
    assert _holder(s3, "runs/n_conc") is None


def test_the_store_operations_are_conditional_on_the_server(s3: Bucket):
    store = S3LeaseStore(s3.uri("runs/a"))
    assert store.read() is None
    version = store.create(b"one")
    assert version is not None and store.create(b"two") is None  # If-None-Match: *
    assert store.replace(b"three", '"not-the-etag"') is None and store.read().body == b"one"
    newer = store.replace(b"three", version)  # If-Match: the ETag read
    assert newer is not None and store.read().body == b"three"
    assert not store.delete(version) and store.delete(newer) and store.read() is None


def test_a_lease_left_by_a_killed_process_is_taken_over(s3: Bucket, caplog):
    folder = s3.uri("runs/crashed")
    child = subprocess.Popen([sys.executable, "-c", (
        "import time; from xswinir.lease import Lease\n"
        f"Lease({folder!r}, 'xswinir train').acquire(); print('held', flush=True); time.sleep(600)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "held\n"
        child.send_signal(signal.SIGKILL)
        child.wait()
    finally:
        child.kill()
        child.wait()
    assert _holder(s3, "runs/crashed")["pid"] == child.pid
    with caplog.at_level(logging.WARNING, "xswinir.lease"), Lease(folder, "xswinir train --resume"):
        assert _holder(s3, "runs/crashed")["pid"] == os.getpid()
    assert f"taking over {folder} from pid {child.pid} on host {HOST}" in caplog.text
    assert "the process is gone" in caplog.text


@pytest.mark.parametrize("stale", [False, True], ids=["free", "stale"])
def test_processes_racing_for_one_lease_in_a_bucket_one_wins(s3: Bucket, tmp_path, stale):
    folder = s3.uri("runs/race")
    if stale:  # a holder on another machine that stopped renewing: every racer tries the same takeover
        record = LeaseRecord(Holder(1, "other-machine", None, "xswinir train", time.time() - 2000, "t"),
                             time.time() - 1000, 120.0)
        with s3.fs.open_output_stream(s3.path(f"runs/race/{LEASE_FILE}")) as f:
            f.write(record.to_bytes())
    go = tmp_path / "go"
    racers = [subprocess.Popen([sys.executable, "-c", RACER, folder, str(go)], stdout=subprocess.PIPE, text=True)
              for _ in range(4)]
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
    assert _holder(s3, "runs/race") is None


def test_a_bucket_that_cannot_be_written_is_one_line(s3: Bucket):
    with pytest.raises(StorageError) as refused:
        Lease("s3://no-such-bucket/runs/n", "xswinir train").acquire()
    message = str(refused.value)
    assert "\n" not in message and message.startswith("cannot take the lease on s3://no-such-bucket/runs/n: ")
    assert "NoSuchBucket" in message
