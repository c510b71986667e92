"""Where files are: printable paths, local paths versus URIs, and the folders of runs, sweeps and studies.

The bottom of the project: it imports no other module of it, so that the config, the image codec, the
checkpoints and the sweeps can all agree on these answers without importing each other. Plain values in,
plain values out; nothing here creates a folder or touches remote storage (``pyarrow`` is imported only
when :func:`filesystem_and_path` is called, which keeps it off the command line's start-up path).

A storage string is either a local path (``runs``, ``~/runs``, ``C:\\runs``) or a URI (``s3://bucket/runs``,
``gs://bucket/runs``, ``file:///tmp/runs``); :func:`is_remote` is the one place that tells them apart.

S3 and S3-compatible stores (MinIO, Ceph, Cloudflare R2, GCS's interoperability endpoint) are reached through the
standard variables of the AWS SDKs and CLI: ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (the store's URL; unset
for AWS itself), ``AWS_REGION`` or ``AWS_DEFAULT_REGION``, and ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` /
``AWS_SESSION_TOKEN`` (unset: the SDK's own chain, a profile or an instance role). :func:`remote_error` turns
a failed call into one line naming the bucket and key and what to check.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    import pyarrow.fs as pafs


def printable_path(path: str | Path | bytes) -> str:
    """A path as it can always be printed: bytes that are not valid UTF-8 appear as ``\\xNN`` escapes.

    POSIX file names are bytes; Python keeps undecodable ones as lone surrogates, which a UTF-8 console or log
    file refuses with ``UnicodeEncodeError``. Every message that names a user's file goes through this.
    """
    raw = path if isinstance(path, bytes) else os.fsencode(str(path))
    return raw.decode("utf-8", errors="backslashreplace")


def is_remote(location: str | Path) -> bool:
    """True for a URI such as ``s3://bucket/runs`` (``file://`` included), False for a local path."""
    return "://" in str(location)


def filesystem_and_path(location: str | Path) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and the path inside it of a local path or a URI (``s3://``, ``gs://``, ``file://``).

    Local paths come back absolute, with ``~`` expanded and POSIX separators, as pyarrow's local filesystem
    names its files.
    """
    import pyarrow.fs as pafs

    text = str(location)
    # A URI with options (s3://bucket/key?endpoint_override=...) says itself how to reach its store.
    if text.startswith("s3://") and "?" not in text and s3_endpoint() is not None:
        return s3_filesystem(), text.removeprefix("s3://").rstrip("/")
    if is_remote(text):
        return pafs.FileSystem.from_uri(text)
    return pafs.LocalFileSystem(), Path(text).expanduser().resolve().as_posix()


def storage_path(storage: str) -> str:
    """A storage as Ray wants it: URIs as they are, local paths absolute (Tune trials change directory)."""
    if is_remote(storage):
        return storage
    return str(Path(storage).expanduser().resolve())


def experiment_path(storage: str, name: str) -> str:
    """The folder ``<storage>/<name>`` of a training run, a sweep or a study: a URI, or an absolute local path."""
    if is_remote(storage):
        return f"{storage.rstrip('/')}/{name}"
    return str(Path(storage_path(storage), name))


def log_dir(storage: str, name: str, chosen: str | None = None) -> Path:
    """A run's local log folder (metrics, curves, Ray's logs).

    Args:
        storage: the run's storage (``run.storage``).
        name: the run's name (``run.name``).
        chosen: the folder the user asked for (``run.log_dir``), if any; it wins.

    Returns:
        ``chosen``, else ``<storage>/<name>/logs`` for local storage, else ``./xswinir_logs/<name>`` (logs are
        written by local processes, so a remote storage gets a local folder), always absolute.
    """
    if chosen is not None:
        return Path(chosen).expanduser().resolve()
    if is_remote(storage):
        return Path("xswinir_logs", name).resolve()
    return Path(storage_path(storage)) / name / "logs"


def classifier_cache(storage: str) -> Path:
    """Where texture classifiers trained on the fly are kept: ``<storage>/classifiers``, or a temp folder.

    The classifier is trained and read by local processes, so a remote storage gets a local temp folder.
    """
    if is_remote(storage):
        return Path(tempfile.gettempdir(), "xswinir_classifiers")
    return Path(storage_path(storage)) / "classifiers"


# The S3-specific variable wins over the general one, as in the AWS SDKs and CLI.
S3_ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
# What S3-compatible stores answer to when no region is set (MinIO's and moto's default, AWS's first region).
DEFAULT_S3_REGION = "us-east-1"


def s3_endpoint() -> str | None:
    """The S3 endpoint URL the AWS variables name (``http://127.0.0.1:9000``), or None for AWS itself."""
    return next((os.environ[name] for name in S3_ENDPOINT_VARIABLES if os.environ.get(name)), None)


def s3_filesystem() -> pafs.S3FileSystem:
    """pyarrow's S3 filesystem for the endpoint, region and keys in the AWS variables (see the module docstring).

    Read here rather than left to pyarrow, whose ``S3FileSystem()`` ignores the endpoint variables: every
    process that reads or writes a bucket (the CLI, Ray's workers, the loader processes) reaches the same store.
    Keys that are not set are left to the SDK's chain (a profile, an instance or pod role).
    """
    import pyarrow.fs as pafs

    endpoint = s3_endpoint()
    scheme = host = None
    if endpoint is not None:  # "http://127.0.0.1:9000", or a bare "minio:9000" (https, as the SDKs take it)
        parts = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        scheme, host = parts.scheme, parts.netloc
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    keys = {"access_key": key, "secret_key": secret, "session_token": os.environ.get("AWS_SESSION_TOKEN") or None}
    return pafs.S3FileSystem(
        **(keys if key and secret else {}),
        region=region or (DEFAULT_S3_REGION if endpoint else None),
        scheme=scheme,
        endpoint_override=host,
    )


def bucket_and_key(location: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``; the key is empty for the bucket itself."""
    bucket, _, key = location.split("://", 1)[-1].partition("/")
    return bucket, key.split("?", 1)[0].rstrip("/")


def location_of(filesystem: pafs.FileSystem, path: str) -> str:
    """A path inside a pyarrow filesystem as the user writes it: ``s3://bucket/key``, ``gs://...``, or local.

    Ray hands back checkpoints as a filesystem and a path without its scheme (``bucket/runs/...``); printed as
    this, a location can be pasted into the next command.
    """
    scheme = {"s3": "s3", "gcs": "gs", "hdfs": "hdfs"}.get(filesystem.type_name)
    return f"{scheme}://{path.lstrip('/')}" if scheme else path


# pyarrow's S3 messages: "When reading information for key 'a/b' in bucket 'c': AWS Error ACCESS_DENIED during
# HeadObject operation: ..." (what it did, then the AWS error code and the store's words).
_AWS_ERROR = re.compile(r"AWS Error (\w+)(?: \(HTTP status (\d+)\))?(?: during (\w+) operation)?:? ?(.*)")
_CREDENTIALS = ("ACCESS_DENIED", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH", "EXPIRED_TOKEN")


def _what_to_check(code: str | None) -> str:
    """What to check for an AWS error code; the endpoint is named as the variables give it."""
    name = next((n for n in S3_ENDPOINT_VARIABLES if os.environ.get(n)), None)
    endpoint = f"{name}={os.environ[name]}" if name else "none set in AWS_ENDPOINT_URL, so AWS itself"
    credentials = "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY/AWS_SESSION_TOKEN or the profile"
    if code == "NETWORK_CONNECTION":
        return f"check the endpoint ({endpoint})"
    if code in _CREDENTIALS:
        return f"check the credentials ({credentials}) and the bucket's permissions for them"
    if code == "NO_SUCH_BUCKET":
        return f"check the bucket name and the endpoint ({endpoint})"
    return f"check the endpoint ({endpoint}), the credentials and the bucket's permissions"


def remote_error(doing: str, location: str, err: BaseException) -> str:
    """One line for a failed call on remote storage: what failed, the bucket and key, why, and what to check.

    Args:
        doing: what was being done, e.g. ``"cannot read the checkpoint"``.
        location: the URI the user gave (``s3://bucket/key``).
        err: pyarrow's error (``OSError`` or ``ArrowException``).

    Returns:
        e.g. ``cannot read the checkpoint s3://b/k (bucket 'b', key 'k'): ACCESS_DENIED during HeadObject; check
        the credentials (...) and the bucket's permissions for them``.
    """
    text = " ".join(str(err).split())  # pyarrow's messages may span lines; the CLI prints one
    text = re.sub(r" \(Request ID: [^)]*\)", "", text)
    found = _AWS_ERROR.search(text)
    code = None
    if isinstance(err, FileNotFoundError):
        reason = "it does not exist"
    elif found is not None:
        code, status, operation, detail = found.groups()
        if code == "UNKNOWN" and status in ("401", "403"):
            code = "ACCESS_DENIED"
        reason = code + (f" during {operation}" if operation else "")
        if detail and detail != "No response body.":
            reason += f" ({detail.rstrip('.')})"
    else:
        reason = text or type(err).__name__
    if not location.startswith("s3://"):
        return f"{doing} {location}: {reason}"
    bucket, key = bucket_and_key(location)
    message = f"{doing} {location} (bucket '{bucket}', key '{key}'): {reason}"
    return message if isinstance(err, FileNotFoundError) else f"{message}; {_what_to_check(code)}"
