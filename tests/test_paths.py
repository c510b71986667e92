"""Paths: local paths versus URIs, pyarrow filesystems, printable names, and the folders of runs and sweeps."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from xswinir.paths import (
    classifier_cache,
    experiment_path,
    filesystem_and_path,
    is_remote,
    log_dir,
    printable_path,
    storage_path,
)


@pytest.mark.parametrize("location", ["s3://bucket/key", "s3://bucket", "gs://bucket/runs/", "file:///tmp/runs",
                                      "hdfs://namenode:8020/runs"])
def test_uris_are_remote(location: str) -> None:
    assert is_remote(location)


@pytest.mark.parametrize("location", ["runs", "./runs", "/abs/runs", "~/runs", "/a:b", "bucket:key", "C:\\runs",
                                      "C:/runs/sweep", "\\\\server\\share\\runs", "D:relative", Path("/tmp/x"), "",
                                      # Path() folds "//": a URI must travel as a string to stay one.
                                      Path("s3://bucket/key")])
def test_local_paths_and_windows_paths_are_not_remote(location: str | Path) -> None:
    assert not is_remote(location)


def test_filesystem_and_path_of_a_local_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "a.txt").write_text("x")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    for given in ("runs", tmp_path / "runs", "~/runs", "runs/../runs"):
        fs, path = filesystem_and_path(given)
        assert isinstance(fs, pafs.LocalFileSystem) and path == (tmp_path / "runs").resolve().as_posix()
    fs, path = filesystem_and_path("runs")
    assert [i.base_name for i in fs.get_file_info(pafs.FileSelector(path))] == ["a.txt"]


def test_filesystem_and_path_of_a_file_uri(tmp_path: Path) -> None:
    fs, path = filesystem_and_path(f"file://{tmp_path}")
    assert isinstance(fs, pafs.LocalFileSystem) and Path(path) == tmp_path
    assert fs.get_file_info(path).type == pafs.FileType.Directory


def test_printable_path_escapes_bytes_that_are_not_utf8() -> None:
    raw = b"caf\xe9 \xff photo.png"
    expected = "caf\\xe9 \\xff photo.png"
    assert printable_path(raw) == expected
    assert printable_path(os.fsdecode(raw)) == expected  # a POSIX name Python holds with lone surrogates
    assert printable_path(Path("/data") / os.fsdecode(raw)) == f"/data/{expected}"
    assert printable_path("café.png") == "café.png"  # valid UTF-8 is kept as it is
    printable_path(os.fsdecode(raw)).encode("utf-8")  # never a UnicodeEncodeError


def test_storage_and_experiment_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert storage_path("s3://bucket/runs/") == "s3://bucket/runs/"
    assert storage_path("runs") == str(tmp_path / "runs")
    assert experiment_path("s3://bucket/runs/", "sweep") == "s3://bucket/runs/sweep"
    assert experiment_path("gs://bucket", "sweep") == "gs://bucket/sweep"
    assert experiment_path("runs", "sweep") == str(tmp_path / "runs" / "sweep")
    assert experiment_path(str(tmp_path / "runs") + "/", "sweep") == str(tmp_path / "runs" / "sweep")
    assert experiment_path("/", "sweep") == "/sweep"


def test_log_dir_and_classifier_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert log_dir("runs", "r1") == tmp_path / "runs" / "r1" / "logs"
    assert log_dir("s3://bucket/runs", "r1") == tmp_path / "xswinir_logs" / "r1"  # logs are written locally
    assert log_dir("s3://bucket/runs", "r1", "~/logs") == tmp_path / "home" / "logs"  # the user's choice wins
    assert log_dir("runs", "r1", "logs") == tmp_path / "logs"
    assert classifier_cache("runs") == tmp_path / "runs" / "classifiers"
    assert classifier_cache("gs://bucket/runs") == Path(tempfile.gettempdir(), "xswinir_classifiers")


def test_paths_is_the_bottom_and_light() -> None:
    """Importing it loads no other module of the project, nor torch or pyarrow (the CLI starts through it)."""
    code = ("import sys, xswinir.paths; print(sorted(m for m in sys.modules if m.startswith(('xswinir.', 'torch', "
            "'pyarrow')) and m != 'xswinir.paths'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
