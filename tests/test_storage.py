"""Storage: the write check that runs before Ray starts, and one file written whole (local vs remote is
tests/test_paths.py; in a bucket, tests/s3/test_s3_storage.py)."""

from __future__ import annotations

import hashlib
import os

import pytest

from xswinir.config import load_config
from xswinir.storage import StorageError, check_writable, read_file, write_file


def test_a_writable_folder_passes_and_a_missing_one_is_not_created(tmp_path):
    check_writable(tmp_path, tmp_path / "new" / "deeper", "s3://bucket/never-checked")
    assert list(tmp_path.iterdir()) == []  # no probe file left, no folder made


def test_a_file_in_the_way_names_the_folder(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    with pytest.raises(StorageError, match=f"cannot write to {blocker}/runs .*is not a folder"):
        check_writable(blocker / "runs")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_names_the_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(StorageError, match=f"cannot write to {folder}/runs .*Permission denied"):
            check_writable(folder / "runs")
    finally:
        folder.chmod(0o700)


def test_fit_checks_the_storage_before_anything_else(tmp_path, monkeypatch):
    import xswinir.data
    import xswinir.trainer

    def too_far(*args, **kwargs):
        raise AssertionError("fit went past the storage check")

    monkeypatch.setattr(xswinir.data, "check_train_source", too_far)  # fit's next step
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    with pytest.raises(StorageError, match=f"cannot write to {blocker}/runs .*is not a folder"):
        xswinir.trainer.fit(load_config("demo", [f"run.storage={blocker / 'runs'}"]))


def test_local_files_are_moved_into_place(tmp_path):
    target = tmp_path / "a" / "study.md"
    written = write_file(str(target), lambda path: path.write_bytes(b"report"))
    assert target.read_bytes() == b"report" and written.size == 6
    assert written.sha256 == hashlib.sha256(b"report").hexdigest()
    assert read_file(str(tmp_path / "a" / "none.json")) is None
    assert [p.name for p in target.parent.iterdir()] == ["study.md"]
    uri = f"file://{tmp_path / 'b' / 'study.md'}"  # a store that renames: a temporary sibling, then a move
    assert write_file(uri, lambda path: path.write_bytes(b"again")).size == 5
    assert read_file(uri) == b"again" and [p.name for p in (tmp_path / "b").iterdir()] == ["study.md"]
