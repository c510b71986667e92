"""Atomic files: the old file stays until the new one is complete; the digest that tells a file is unchanged."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from xswinir.atomic import atomic_path, atomic_write_text, sha256_stream


def test_atomic_writes_keep_the_old_file_until_the_new_one_is_complete(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "report.csv"
    atomic_write_text(target, "old\n")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half of the new")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old\n" and os.listdir(target.parent) == ["report.csv"]
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".") and tmp.suffix == ".csv"
        tmp.write_text("new\n")
        assert target.read_text() == "old\n"  # not replaced before the block ends
    assert target.read_text() == "new\n" and os.listdir(target.parent) == ["report.csv"]


@pytest.mark.parametrize("size", [0, 1, (1 << 20) - 1, 1 << 20, (1 << 20) * 2 + 3])  # chunk edges of 1 MiB
def test_sha256_stream_of_files_and_pyarrow_streams(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    expected = hashlib.sha256(data).hexdigest()
    assert sha256_stream(io.BytesIO(data)) == expected
    (tmp_path / "f.bin").write_bytes(data)
    with open(tmp_path / "f.bin", "rb") as f:
        assert sha256_stream(f) == expected
    with pafs.LocalFileSystem().open_input_stream(str(tmp_path / "f.bin")) as f:  # what S3 and GCS hand back
        assert sha256_stream(f) == expected
