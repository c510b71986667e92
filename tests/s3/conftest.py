"""Fixtures of the S3 tests: one local S3 server for the session, a fresh bucket and the AWS variables per test."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow.fs as pafs
import pytest

from tests.s3.endpoint import S3Endpoint, moto_server, point_at


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Endpoint]:
    with moto_server() as endpoint:
        yield endpoint


@dataclass(frozen=True)
class Bucket:
    """An empty bucket on the test server; the process's AWS variables point at the server."""

    name: str
    endpoint: S3Endpoint
    fs: pafs.S3FileSystem  # the test's own view of the server, independent of the code under test

    def uri(self, key: str = "") -> str:
        return f"s3://{self.name}/{key}".rstrip("/")

    def path(self, key: str) -> str:
        """``bucket/key``: the path of ``key`` inside :attr:`fs`."""
        return f"{self.name}/{key}"


@pytest.fixture
def s3(s3_server: S3Endpoint, monkeypatch: pytest.MonkeyPatch) -> Bucket:
    """A new bucket, with ``AWS_ENDPOINT_URL``, the keys and the region set for this test only."""
    point_at(s3_server, monkeypatch)
    return Bucket(s3_server.new_bucket(), s3_server, s3_server.filesystem())
