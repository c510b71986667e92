"""Storage: the write check that runs before Ray starts (local vs remote is tests/test_paths.py)."""

from __future__ import annotations

import os

import pytest

from xswinir.config import load_config
from xswinir.storage import StorageError, check_writable


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
