"""Hostile output paths: a file where a folder goes, a folder where a file goes, a path under a file, a folder
that cannot be written, a path that does not exist yet.

Property-based (hypothesis, as the other ``test_hostile_*`` files): for every command option that names
something to write (``pack OUT``, ``export --out``, ``eval --save-lq``, ``eval --out``, and the run folder that
``train``, ``tune`` and ``study`` lease), each kind of path is either written or refused in one line that names
it, before any work, and never with a traceback.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from xswinir.checkpoint import save_weights
from xswinir.cli import main
from xswinir.config import MODEL_PRESETS
from xswinir.lease import LEASE_FILE, Lease
from xswinir.model import build_swinir
from xswinir.storage import StorageError


def _unwritable_folder(root: Path) -> Path | None:
    """A folder that refuses new files to this process: a read-only one, or for root (who may write anywhere)
    one of the kernel's; None where there is none."""
    if os.geteuid() != 0:
        folder = root / "read-only"
        folder.mkdir(exist_ok=True)
        folder.chmod(0o500)
        return folder
    folder = Path("/sys/kernel")
    try:
        with tempfile.TemporaryFile(dir=folder):
            return None
    except OSError:
        return folder


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path | None]:
    root = tmp_path_factory.mktemp("outputs")
    torch.manual_seed(0)
    cfg = MODEL_PRESETS["tiny-x2"]
    save_weights(build_swinir(cfg), cfg, root / "model.safetensors")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(images / name)
    yield {"root": root, "model": root / "model.safetensors", "images": images,
           "unwritable": _unwritable_folder(root)}
    if os.geteuid() != 0:
        (root / "read-only").chmod(0o700)


@pytest.fixture(autouse=True)
def console_logging():
    """Each ``main`` call sets up logging on the stderr of the moment (capsys's), not a closed earlier one."""
    saved = logging.root.handlers[:]
    logging.root.handlers.clear()
    yield
    logging.root.handlers[:] = saved


KINDS = ("file", "folder", "under_file", "missing", "unwritable")


def _path(parts: dict, kind: str, name: str) -> Path:
    """An output path of ``kind`` (see :data:`KINDS`); a new one per call."""
    base = parts["root"] / os.urandom(6).hex()
    base.mkdir()
    if kind == "file":
        (base / name).write_text("a user's file")
        return base / name
    if kind == "folder":
        (base / name).mkdir()
        return base / name
    if kind == "under_file":
        (base / "file").write_text("a user's file")
        return base / "file" / name
    if kind == "missing":
        return base / "new" / "deeper" / name
    return parts["unwritable"] / os.urandom(6).hex() / name


def _run(capsys: pytest.CaptureFixture, argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err, captured.err
    return code, captured.out, captured.err.strip()


def _refusal(err: str, command: str) -> str:
    """The one error line of a refused command."""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"xswinir {command}: error: "), err
    return lines[0]


def _expect_refused(kind: str, path: Path, err: str, command: str, file_wanted: bool) -> None:
    line = _refusal(err, command)
    if kind == "under_file":
        assert f"cannot write to {path.parent}" in line and f"{path.parent} is not a folder" in line, line
    elif kind == "unwritable":
        assert f"cannot write to {path.parent}" in line and "ermission denied" in line, line
    elif kind == "folder" and file_wanted:
        assert f"{path} is a folder" in line, line
    else:  # a file where a folder goes
        assert str(path) in line and "is a file" in line or "is not a folder" in line, line


_SETTINGS = settings(max_examples=15, deadline=None, derandomize=True,
                     suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
_KIND = st.sampled_from(KINDS)
_NAME = st.sampled_from(["out", "x2 results", "caf\xe9", "o.d"])


def _skip_without_unwritable(parts: dict, kind: str) -> None:
    if kind == "unwritable" and parts["unwritable"] is None:
        pytest.skip("no folder here refuses this process a new file")


@_SETTINGS
@given(kind=_KIND, name=_NAME)
def test_property_pack_out(parts, capsys, kind, name) -> None:
    _skip_without_unwritable(parts, kind)
    out = _path(parts, kind, name)
    code, stdout, err = _run(capsys, ["pack", str(parts["images"]), str(out), "--no-progress", "--workers", "1"])
    if kind in ("folder", "missing"):
        assert code == 0 and sorted(p.name for p in out.iterdir()) == ["shard-00000.parquet"]
        return
    assert code == 2
    _expect_refused(kind, out, err, "pack", file_wanted=False)
    if kind == "file":
        assert out.read_text() == "a user's file"


@_SETTINGS
@given(kind=_KIND, name=_NAME, fmt=st.sampled_from(["safetensors", "official"]))
def test_property_export_out(parts, capsys, kind, name, fmt) -> None:
    _skip_without_unwritable(parts, kind)
    out = _path(parts, kind, name)
    code, stdout, err = _run(capsys, ["export", str(parts["model"]), "--format", fmt, "--out", str(out)])
    if kind in ("file", "missing"):  # an existing file is replaced, once the new one is complete
        assert code == 0 and out.stat().st_size > 1000 and f"wrote {out}" in stdout
        return
    assert code == 2
    _expect_refused(kind, out, err, "export", file_wanted=True)


@_SETTINGS
@given(kind=_KIND, name=_NAME)
def test_property_eval_save_lq(parts, capsys, kind, name) -> None:
    _skip_without_unwritable(parts, kind)
    out = _path(parts, kind, name)
    code, stdout, err = _run(capsys, ["eval", "--hr", str(parts["images"]), "--scale", "2", "--bicubic",
                                      "--save-lq", str(out)])
    if kind in ("folder", "missing"):
        assert code == 0 and sorted(p.name for p in out.iterdir()) == ["a.png", "b.png"]
        return
    assert code == 2
    _expect_refused(kind, out, err, "eval", file_wanted=False)
    assert "average" not in stdout  # refused before any image was measured


@_SETTINGS
@given(kind=_KIND, name=st.sampled_from(["results.csv", "x2 results.json"]))
def test_property_eval_results_out(parts, capsys, kind, name) -> None:
    _skip_without_unwritable(parts, kind)
    out = _path(parts, kind, name)
    code, stdout, err = _run(capsys, ["eval", "--hr", str(parts["images"]), "--scale", "2", "--bicubic",
                                      "--out", str(out)])
    if kind in ("file", "missing"):
        assert code == 0 and f"wrote {out}" in stdout
        return
    assert code == 2
    _expect_refused(kind, out, err, "eval", file_wanted=True)
    assert "average" not in stdout


@_SETTINGS
@given(kind=_KIND, name=_NAME)
def test_property_leased_run_folder(parts, kind, name) -> None:
    """The run folder of ``train``, ``tune`` and ``study``, and ``pack``'s: leased, or refused in one line."""
    _skip_without_unwritable(parts, kind)
    folder = _path(parts, kind, name)
    if kind in ("folder", "missing"):
        with Lease(folder, "xswinir train"):
            assert (folder / LEASE_FILE).is_file()
        assert not (folder / LEASE_FILE).exists()
        return
    with pytest.raises(StorageError) as refused:
        Lease(folder, "xswinir train").acquire()
    message = str(refused.value)
    assert "\n" not in message and message.startswith("cannot write to ")
    if kind == "file":
        assert message == f"cannot write to {folder}: {folder} is not a folder"


# The other cases issue 23 found: messages that named the wrong problem, and a failure line that quoted a
# worker's traceback. Each asserts the whole line the user reads.


def test_a_checkpoint_that_does_not_exist_is_named_so(parts, capsys) -> None:
    image = parts["images"] / "a.png"
    missing = parts["root"] / "no-such-checkpoint"
    code, _, err = _run(capsys, ["explain", str(image), "--checkpoint", str(missing), "--out",
                                 str(parts["root"] / "explain.png")])
    assert code == 2 and _refusal(err, "explain") == f"xswinir explain: error: checkpoint {missing} does not exist"
    code, _, err = _run(capsys, ["trust", "fit", "--checkpoint", str(missing), "--out",
                                 str(parts["root"] / "trust.json")])
    assert code == 2 and _refusal(err, "trust") == f"xswinir trust: error: checkpoint {missing} does not exist"


class _Payload:
    """Runs code when unpickled: what a malicious checkpoint carries."""

    def __reduce__(self):
        return (print, ("this ran",))


def test_a_pickle_checkpoint_is_refused_with_a_safe_way_to_convert_it(parts, capsys) -> None:
    path = parts["root"] / "pickled.pth"
    torch.save({"params": build_swinir(MODEL_PRESETS["tiny-x2"]).state_dict(), "extra": _Payload()}, path)
    for argv in (["eval", "--hr", str(parts["images"]), "--checkpoint", str(path), "--preset", "tiny-x2"],
                 ["export", str(path), "--preset", "tiny-x2", "--format", "safetensors", "--out",
                  str(parts["root"] / "converted.safetensors")]):
        code, out, err = _run(capsys, argv)
        line = _refusal(err, argv[0])
        assert code == 2 and "this ran" not in out
        assert "weights_only" not in line and "pickle" in line
        assert f"{path} holds Python objects besides tensors" in line
        assert "xswinir export clean.pth --format safetensors" in line


def test_a_long_plain_list_is_not_called_nested_aliases(tmp_path) -> None:
    from xswinir.config import ConfigError
    from xswinir.tune.study import load_study_config

    path = tmp_path / "study.yaml"
    path.write_text("base: demo\narms: {lambda0: [loss.texture_weight=0]}\nseeds: [" +
                    ", ".join(str(i) for i in range(100_000)) + "]\n")
    with pytest.raises(ConfigError) as refused:
        load_study_config(path)
    message = str(refused.value)
    assert "alias" not in message and "\n" not in message
    assert message == f"{path}: the document holds 100,010 values, more than the 10,000 values a config file may hold"


def test_a_worker_failure_is_one_line_naming_what_failed_and_the_full_log(tmp_path) -> None:
    from ray.train import ControllerError, WorkerGroupError

    from xswinir.data import DataError
    from xswinir.trainer import failure_message

    logs = tmp_path / "logs"
    (logs / "ray").mkdir(parents=True)
    traceback = "Traceback (most recent call last):\n  File \"trainer.py\", line 1\nRuntimeError: boom"
    crash = WorkerGroupError(traceback, {1: RuntimeError("boom\nmore detail"), 0: RuntimeError("boom")})
    assert failure_message(crash, logs) == (f"training failed on worker 0 (and 1 more): RuntimeError: boom (full log: "
                                            f"{logs / 'ray'})")
    rule = "t1.png: its LQ image is 10x10, not 40x40 (after modcrop) / 2"  # a file changed during the run
    changed = WorkerGroupError(traceback, {0: DataError(rule)})
    remote = tmp_path / "remote"  # no local Ray logs linked: the run joined a cluster
    assert failure_message(changed, remote) == f"{rule} (worker 0; full log: the Ray cluster's session logs)"
    stuck = ControllerError(TimeoutError("the worker group did not start in 60 s"))
    assert failure_message(stuck, logs) == ("training failed on Ray Train's controller: TimeoutError: the worker "
                                            f"group did not start in 60 s (full log: {logs / 'ray'})")
