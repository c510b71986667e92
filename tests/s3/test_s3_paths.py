"""Reaching a bucket: the endpoint, region and keys from the standard AWS variables, locations printed with their
scheme, and pyarrow's errors turned into one line naming bucket, key and what to check."""

from __future__ import annotations

import pyarrow.fs as pafs
import pytest

from tests.s3.conftest import Bucket
from xswinir.paths import bucket_and_key, filesystem_and_path, location_of, remote_error


def test_a_uri_reaches_the_endpoint_of_the_aws_variables(s3: Bucket, monkeypatch):
    fs, path = filesystem_and_path(s3.uri("data/a.txt"))
    assert isinstance(fs, pafs.S3FileSystem) and path == s3.path("data/a.txt") and fs.region == "us-east-1"
    with fs.open_output_stream(path) as f:
        f.write(b"written through the variables")
    with s3.fs.open_input_stream(s3.path("data/a.txt")) as f:  # the server has it
        assert f.read() == b"written through the variables"
    # The S3-specific endpoint wins over the general one (as in the AWS SDKs); the region is taken as given.
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3.endpoint.url)
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    fs, path = filesystem_and_path(s3.uri("data/a.txt") + "/")
    assert path == s3.path("data/a.txt") and fs.region == "eu-west-3"
    assert fs.get_file_info(path).size == len(b"written through the variables")


def test_locations_keep_their_scheme(s3: Bucket, tmp_path):
    uri = s3.uri("runs/demo/checkpoint_2026-01-01_00-00-02.000000")
    assert location_of(*filesystem_and_path(uri)) == uri  # what Ray hands back, as the user can paste it
    assert location_of(*filesystem_and_path(tmp_path)) == tmp_path.as_posix()
    assert bucket_and_key(uri) == (s3.name, "runs/demo/checkpoint_2026-01-01_00-00-02.000000")
    assert bucket_and_key(f"s3://{s3.name}/") == (s3.name, "")


def _error(fn) -> OSError:
    with pytest.raises(OSError) as raised:
        fn()
    return raised.value


def test_pyarrow_errors_become_one_line_with_bucket_key_and_what_to_check(s3: Bucket, monkeypatch):
    from moto.core.authorization import enable_iam_authentication

    fs, path = filesystem_and_path(s3.uri("data/a.txt"))
    missing_bucket = _error(lambda: fs.get_file_info(pafs.FileSelector(f"{s3.name}-missing/data")))
    message = remote_error("cannot list", f"s3://{s3.name}-missing/data", missing_bucket)
    assert message.startswith(f"cannot list s3://{s3.name}-missing/data (bucket '{s3.name}-missing', key 'data'): "
                              "NO_SUCH_BUCKET during ListObjectsV2 (The specified bucket does not exist); check the "
                              f"bucket name and the endpoint (AWS_ENDPOINT_URL={s3.endpoint.url})")
    with enable_iam_authentication():  # the test keys are unknown to the server
        bad_keys = _error(lambda: fs.open_output_stream(path).close())
    message = remote_error("cannot write", s3.uri("data/a.txt"), bad_keys)
    assert "INVALID_ACCESS_KEY_ID during CreateMultipartUpload" in message and "check the credentials" in message
    assert "Request ID" not in message
    missing_key = _error(lambda: fs.open_input_stream(s3.path("data/none")))
    assert remote_error("cannot read", s3.uri("data/none"), missing_key) == \
        f"cannot read {s3.uri('data/none')} (bucket '{s3.name}', key 'data/none'): it does not exist"
    for message in (remote_error("x", s3.uri("k"), err) for err in (missing_bucket, bad_keys, missing_key)):
        assert "\n" not in message
