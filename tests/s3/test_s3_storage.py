"""One file in a bucket, written whole or not at all and read back (xswinir.storage.read_file / write_file)."""

from __future__ import annotations

import hashlib

import pytest

from tests.s3.conftest import Bucket
from tests.s3.endpoint import list_keys
from xswinir.storage import StorageError, read_file, write_file


def test_files_in_a_bucket_are_written_whole_and_read_back(s3: Bucket):
    uri = s3.uri("studies/s/study.md")
    assert read_file(uri) is None  # not there yet: no error, no file
    written = write_file(uri, lambda path: path.write_text("# first\n"))
    assert written == (8, hashlib.sha256(b"# first\n").hexdigest())
    assert read_file(uri) == b"# first\n"

    def half_then_fail(path):
        path.write_text("# sec")
        raise RuntimeError("the plot failed")

    with pytest.raises(RuntimeError, match="the plot failed"):
        write_file(uri, half_then_fail)
    assert read_file(uri) == b"# first\n"  # the earlier file as it was
    assert list_keys(s3.fs, s3.name) == ["studies/s/study.md"]  # no temporary object left behind


def test_a_missing_bucket_is_one_line_naming_bucket_and_key(s3: Bucket):
    with pytest.raises(StorageError) as err:
        write_file("s3://no-such-bucket/studies/s/study.md", lambda path: path.write_text("x"))
    message = str(err.value)
    assert "\n" not in message and "bucket 'no-such-bucket', key 'studies/s/study.md'" in message
    assert "NO_SUCH_BUCKET" in message and "AWS_ENDPOINT_URL=" in message
