"""``xswinir submit`` against a real Ray head that the tests start with ``ray start --head`` (their own cluster,
not the shared local Ray): a job followed to success, a failing job, ``--no-wait``, and a training job."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

CLUSTER = REPO_ROOT / "cluster"
pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes_under(marker: str) -> list[int]:
    """PIDs whose command line names ``marker`` (our head's temp dir), read from /proc."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            pids.append(int(entry.name))
    return pids


def _kill_processes_under(marker: str) -> None:
    """Ends the processes of our own head (found by its temp dir): the GCS, raylet, dashboard and workers.

    `ray stop` would end every Ray instance on the machine, other people's included.
    """
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = _processes_under(marker)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + 10
        while pids and time.time() < deadline:
            pids = [pid for pid in pids if Path(f"/proc/{pid}").exists() and not _is_zombie(pid)]
            time.sleep(0.2)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


@pytest.fixture(scope="module")
def ray_head():
    """A throwaway Ray head on free ports with its own temp dir and authentication off; yields its job URL."""
    # A short path: Ray's unix sockets live under it and socket paths are limited to ~107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="xsub", dir="/tmp")
    ports = {name: _free_port() for name in (
        "port", "dashboard-port", "ray-client-server-port", "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port",
    )}
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    cmd = ["ray", "start", "--head", "--num-cpus=2", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
           "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}", "--disable-usage-stats",
           *(f"--{name}={port}" for name, port in ports.items())]
    try:
        subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, timeout=180)
        address = f"http://127.0.0.1:{ports['dashboard-port']}"
        yield address, env
    finally:
        _kill_processes_under(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _start_submit(address: str, env: dict, *command: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "xswinir", "submit", "--address", address, "--runtime-env",
         str(CLUSTER / "runtime_env.yaml"), "--working-dir", str(REPO_ROOT), "--", *command],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT,
    )


def _finish(proc: subprocess.Popen, timeout: float = 300) -> subprocess.CompletedProcess:
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def _submit(address: str, env: dict, *command: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return _finish(_start_submit(address, env, *command), timeout)


def test_job_succeeds_and_failure_exits_nonzero(ray_head):
    address, env = ray_head
    # Both jobs at once: each spends most of its time waiting for the job server and a fresh Python.
    ok, bad = _start_submit(address, env, "--help"), _start_submit(address, env, "no-such-command")
    ok, bad = _finish(ok), _finish(bad)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert re.search(r"submitted job (\S+)", ok.stdout)
    assert "ray job logs -f" in ok.stdout and "SUCCEEDED" in ok.stdout
    assert "usage: xswinir" in ok.stdout  # the job's own output, followed to the end
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "FAILED" in bad.stdout


def test_no_wait_returns_the_job_id(ray_head):
    address, env = ray_head
    proc = subprocess.run(
        [sys.executable, "-m", "xswinir", "submit", "--address", address, "--no-wait", "--submission-id",
         "xswinir-test-nowait", "--", "--help"],
        env=env, capture_output=True, text=True, timeout=120, cwd=REPO_ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    assert "submitted job xswinir-test-nowait" in proc.stdout
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    deadline = time.time() + 120
    while str(client.get_job_status("xswinir-test-nowait").value) not in ("SUCCEEDED", "FAILED", "STOPPED"):
        assert time.time() < deadline
        time.sleep(1)
    assert str(client.get_job_status("xswinir-test-nowait").value) == "SUCCEEDED"


# About a minute on 2 cores; the default run keeps a real job through the two tests above.
@pytest.mark.slow
def test_tiny_training_job_writes_a_checkpoint(ray_head, tmp_path):
    address, env = ray_head
    storage = tmp_path / "runs"
    proc = _submit(
        address, env, "train", "--config", "demo", "--storage", str(storage), "--set", "train.total_steps=4",
        "--set", "train.val_every=2", "--set", "run.name=submitted", timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    checkpoints = sorted((storage / "submitted").glob("checkpoint_*"))
    assert checkpoints, f"no checkpoint under {storage / 'submitted'}: {list(storage.rglob('*'))[:20]}"
