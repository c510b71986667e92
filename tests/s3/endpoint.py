"""A real S3 endpoint for the tests: moto's server on 127.0.0.1, reached as users reach theirs.

The server speaks the S3 REST protocol over HTTP on a free local port; nothing leaves the machine and no cloud
account is needed. Clients find it the standard way, through ``AWS_ENDPOINT_URL`` and the key variables
(:attr:`S3Endpoint.env`), so the code under test runs its real path: pyarrow's S3 filesystem, Ray's storage.
Used by ``tests/s3/conftest.py`` and by the Ray tests in ``tests/integration/test_s3_ray.py``, which pass
:attr:`S3Endpoint.env` to the processes they start.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs
import pytest

# Dummy keys (moto accepts any unless told to check them); region as S3-compatible stores default it.
KEYS = {"AWS_ACCESS_KEY_ID": "xswinir-test-key", "AWS_SECRET_ACCESS_KEY": "xswinir-test-secret"}
REGION = "us-east-1"
# Variables that would point the client elsewhere than the test server, or make it wait on a cloud service.
CLEARED = ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_ROLE_ARN",
           "AWS_WEB_IDENTITY_TOKEN_FILE")

_bucket_numbers = itertools.count()


@dataclass(frozen=True)
class S3Endpoint:
    """A running S3 server: its URL, the environment that points clients at it, and bucket helpers."""

    url: str  # http://127.0.0.1:PORT

    @property
    def env(self) -> dict[str, str]:
        """The standard AWS variables for this server; a process given them reaches it (``CLEARED`` unset)."""
        return {"AWS_ENDPOINT_URL": self.url, "AWS_DEFAULT_REGION": REGION, **KEYS,
                # Never ask an instance-metadata service for credentials: there is none, and asking waits.
                "AWS_EC2_METADATA_DISABLED": "true",
                "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"}

    def filesystem(self) -> pafs.S3FileSystem:
        """An S3 filesystem of its own on this server (may create buckets): to set up and inspect tests."""
        scheme, host = self.url.split("://")
        return pafs.S3FileSystem(access_key=KEYS["AWS_ACCESS_KEY_ID"], secret_key=KEYS["AWS_SECRET_ACCESS_KEY"],
                                 region=REGION, scheme=scheme, endpoint_override=host, allow_bucket_creation=True)

    def new_bucket(self, prefix: str = "xswinir") -> str:
        """Creates an empty bucket with a name no other test uses and returns the name."""
        name = f"{prefix}-{next(_bucket_numbers)}"
        self.filesystem().create_dir(name)
        return name


@contextlib.contextmanager
def moto_server() -> Iterator[S3Endpoint]:
    """Runs moto's S3 server on 127.0.0.1 at a free port (a thread of this process) until the block ends."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one access-log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield S3Endpoint(f"http://{host}:{port}")
    finally:
        server.stop()


def upload_folder(fs: pafs.FileSystem, local: Path, remote: str) -> None:
    """Copies a local folder (recursively) to ``remote`` (``bucket/key``) in ``fs``."""
    pafs.copy_files(str(local), remote, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def list_keys(fs: pafs.FileSystem, remote: str) -> list[str]:
    """Every object below ``remote`` (``bucket/key``), as paths relative to it, sorted."""
    infos = fs.get_file_info(pafs.FileSelector(remote, recursive=True, allow_not_found=True))
    return sorted(i.path.removeprefix(remote.rstrip("/") + "/") for i in infos if i.type == pafs.FileType.File)


def point_at(endpoint: S3Endpoint, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Sets this process's AWS variables to ``endpoint`` (``CLEARED`` unset) for the test; returns the whole
    environment, for the processes the test starts (a Ray started from here inherits it)."""
    for name in CLEARED:
        monkeypatch.delenv(name, raising=False)
    for name, value in endpoint.env.items():
        monkeypatch.setenv(name, value)
    return dict(os.environ)
