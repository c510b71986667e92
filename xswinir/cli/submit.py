"""``xswinir submit``: run an ``xswinir`` command (train, tune, ...) as a Ray Job on a cluster.

The job's entrypoint is ``xswinir <ARGS>``, run on the cluster's head node with the uploaded working
directory as its current folder. That folder is a temporary copy that Ray deletes when the job ends, so a
relative ``--storage`` is made absolute here, before submitting.

Token authentication: Ray 2.59+ clusters may require a token, but the job client only sends one when
``RAY_AUTH_MODE=token`` is set. When that variable is unset and a token is available (``RAY_AUTH_TOKEN``,
``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``), this command sets it for itself; a head without
authentication ignores the header.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from xswinir.config import read_yaml_mapping
from xswinir.errors import UserError
from xswinir.paths import is_remote

HELP = "submit a training run or a sweep to a Ray cluster as a Ray Job (`xswinir submit --address URL -- train ...`)"

# Options of `xswinir train` / `xswinir tune` whose value is a storage location.
_STORAGE_OPTIONS = ("--storage",)
_STORAGE_KEY = "run.storage"
_TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class SubmitError(UserError):
    """The cluster cannot be reached, refuses the job, or the arguments cannot make a job."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address", default=os.environ.get("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:8265"),
        help="the cluster's dashboard / job server (default: $RAY_API_SERVER_ADDRESS or %(default)s)",
    )
    parser.add_argument("--working-dir", default=".", help="folder uploaded as the job's working directory")
    parser.add_argument(
        "--runtime-env", default=None,
        help="YAML runtime environment (e.g. cluster/runtime_env.yaml); its working_dir is replaced by --working-dir",
    )
    parser.add_argument("--no-wait", action="store_true", help="print the job id and return; do not follow the logs")
    parser.add_argument("--submission-id", default=None, help="job id to use (default: one that Ray makes up)")
    parser.add_argument(
        "--entrypoint-num-gpus", type=float, default=None,
        help="GPUs reserved for the entrypoint itself; only if it must run on a GPU node (Train workers get their own)",
    )
    parser.add_argument(
        "job_command", nargs=argparse.REMAINDER, metavar="-- COMMAND ...",
        help="after `--`: the xswinir command the job runs, e.g. `-- train --config demo --storage s3://b/runs`",
    )


def _absolute_storage(value: str, base: Path) -> str:
    """A local storage path as an absolute one; URIs (``s3://``, ``gs://``) unchanged."""
    if is_remote(value):
        return value
    return str((base / Path(value).expanduser()).resolve())


def build_entrypoint(command: list[str], cwd: Path | None = None) -> tuple[str, bool]:
    """The job's shell command for ``xswinir <command>``, with local storage paths made absolute.

    Args:
        command: the xswinir arguments, e.g. ``["train", "--config", "demo", "--storage", "runs"]``.
        cwd: the folder relative storage paths are relative to (default: the current one).

    Returns:
        The entrypoint string and whether a storage location was given at all.
    """
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise SubmitError("no command to submit: give it after `--`, e.g. `xswinir submit -- train --config demo`")
    if command[0] == "submit":
        raise SubmitError("a job cannot itself run `xswinir submit`")
    base = (cwd or Path.cwd()).resolve()
    args = list(command)
    has_storage = False
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in _STORAGE_OPTIONS and i + 1 < len(args):
            args[i + 1] = _absolute_storage(args[i + 1], base)
            has_storage = True
            i += 1
        elif any(arg.startswith(opt + "=") for opt in _STORAGE_OPTIONS):
            opt, value = arg.split("=", 1)
            args[i] = f"{opt}={_absolute_storage(value, base)}"
            has_storage = True
        elif arg == "--set" and i + 1 < len(args) and args[i + 1].startswith(_STORAGE_KEY + "="):
            value = args[i + 1].split("=", 1)[1]
            args[i + 1] = f"{_STORAGE_KEY}={_absolute_storage(value, base)}"
            has_storage = True
            i += 1
        i += 1
    return shlex.join(["xswinir", *args]), has_storage


def load_runtime_env(path: str | None, working_dir: str) -> dict[str, Any]:
    """The runtime environment from the YAML file (if any) with ``working_dir`` set to an absolute path."""
    env: dict[str, Any] = {}
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise SubmitError(f"runtime environment file {file} does not exist")
        env = read_yaml_mapping(file, SubmitError, "a mapping (working_dir, env_vars, excludes, ...)")
    folder = Path(working_dir).expanduser().resolve()
    if not folder.is_dir():
        raise SubmitError(f"working directory {folder} does not exist")
    env["working_dir"] = str(folder)
    return env


def _enable_token_auth_if_available() -> None:
    """Makes the job client send the cluster token when one is at hand (see the module docstring)."""
    if "RAY_AUTH_MODE" in os.environ:
        return  # the user chose; "disabled" must stay disabled
    token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    if os.environ.get("RAY_AUTH_TOKEN") or token_file.is_file():
        os.environ["RAY_AUTH_MODE"] = "token"


def connect(address: str):
    """A ``JobSubmissionClient`` for the address, or a one-line :class:`SubmitError`."""
    _enable_token_auth_if_available()
    import requests
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except AuthenticationError as err:
        raise SubmitError(f"the Ray job server at {address} wants a token: {err}; {_AUTH_HINT}") from err
    except (ConnectionError, requests.exceptions.RequestException) as err:
        raise SubmitError(
            f"cannot reach the Ray job server at {address} ({err}); is the cluster up and the dashboard port "
            "forwarded (`ray dashboard cluster/aws-gpu.yaml`)?"
        ) from err
    except RuntimeError as err:  # a 404 from something that is not a Ray dashboard, or a Ray older than 1.9
        raise SubmitError(f"{address} is not a usable Ray job server: {err}") from err


_AUTH_HINT = (
    "if the cluster uses token authentication, copy its token (`ray get-auth-token` on the head) to "
    "~/.ray/auth_token or RAY_AUTH_TOKEN and set RAY_AUTH_MODE=token"
)


async def _follow(client, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        print(lines, end="", flush=True)


def follow_job(client, job_id: str) -> str:
    """Prints the job's logs until it ends; returns its final status (``SUCCEEDED``, ``FAILED``, ``STOPPED``)."""
    asyncio.run(_follow(client, job_id))
    # The log stream closes when the job ends; the status may lag the stream by a moment.
    for _ in range(60):
        status = str(client.get_job_status(job_id).value)
        if status in _TERMINAL:
            return status
        time.sleep(0.5)
    return status


def run(args: argparse.Namespace) -> int:
    entrypoint, has_storage = build_entrypoint(args.job_command)
    runtime_env = load_runtime_env(args.runtime_env, args.working_dir)
    client = connect(args.address)
    if not has_storage:
        print(
            "xswinir submit: note: no --storage given; the run is written to the config's run.storage on the "
            "cluster (relative paths land in the job's temporary working directory)", file=sys.stderr,
        )
    try:
        job_id = client.submit_job(
            entrypoint=entrypoint, runtime_env=runtime_env, submission_id=args.submission_id,
            entrypoint_num_gpus=args.entrypoint_num_gpus,
        )
    except RuntimeError as err:
        raise SubmitError(f"the job server at {args.address} refused the job: {err}") from err
    print(f"submitted job {job_id}: {entrypoint}")
    print(f"  logs:   ray job logs -f {job_id} --address {args.address}")
    print(f"  status: ray job status {job_id} --address {args.address}")
    print(f"  stop:   ray job stop {job_id} --address {args.address}")
    if args.no_wait:
        return 0
    try:
        status = follow_job(client, job_id)
    except KeyboardInterrupt:
        print(f"\nstopped following; job {job_id} keeps running (stop it with `ray job stop {job_id}`)")
        return 130
    print(f"job {job_id} {status}")
    if status != "SUCCEEDED":
        info = client.get_job_info(job_id)
        if info.message:
            print(f"  {info.message}", file=sys.stderr)
        return 1
    return 0
