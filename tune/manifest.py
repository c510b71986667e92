"""A signed list of the files Ray unpickles when a sweep or study resumes, checked before it does.

``Tuner.restore`` unpickles ``tuner.pkl`` (the trainable, the search algorithm, the callbacks), the
``searcher-state-*.pkl`` files, the cloudpickled fields inside ``experiment_state-*.json`` and each trial's
``params.pkl`` and ``error.pkl``. Whoever can write to the sweep's storage could therefore run code on the
machine that resumes it. So when the driver leaves a sweep (finished, interrupted, or failed), it records the
sha256 of every such file in ``xswinir_manifest.json`` (:data:`SIGNATURE_FILE`, written by
:func:`write_signature`) together with an HMAC-SHA256 over that list, keyed by
a secret that never goes to the storage: ``$XSWINIR_SWEEP_KEY``, or else ``~/.config/xswinir/sweep.key``
(created on first use, readable only by its owner). ``--resume`` first checks (:func:`verify_signature`) that
the same files, with the same digests, are there and that the list was signed with this key; anything else is
refused before Ray starts. The manifest cannot be forged without the key, so the boundary is the key, not the folder.

A driver killed outright (SIGKILL, a lost node) writes no manifest: such a sweep cannot be resumed, only
restarted under another name.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING

from xswinir.atomic import sha256_stream
from xswinir.errors import UserError
from xswinir.paths import filesystem_and_path
from xswinir.storage import write_file

if TYPE_CHECKING:
    import pyarrow.fs as pafs

# Not a checkpoint's manifest.json (xswinir.checkpoint): this one is signed, and lists only what Ray unpickles.
SIGNATURE_FILE = "xswinir_manifest.json"
KEY_ENV = "XSWINIR_SWEEP_KEY"
# Folders of an experiment that Ray never unpickles: our Train runs (safetensors, JSON) and the texture classifiers.
_SKIPPED_DIRS = ("train", "classifiers")


class ResumeRefused(UserError):
    """The sweep folder does not match what our driver left there: resuming could run someone else's code."""


def key_file() -> Path:
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "xswinir" / "sweep.key"


def _key(create: bool) -> bytes:
    if os.environ.get(KEY_ENV):
        return os.environ[KEY_ENV].encode()
    path = key_file()
    if not path.is_file():
        if not create:
            raise ResumeRefused(f"no key to check the sweep's manifest with: set {KEY_ENV} to the key of the "
                                f"machine that ran it, or copy its {key_file()}")
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another sweep created it a moment ago
            return path.read_bytes().strip()
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return path.read_bytes().strip()


def restorable_files(exp_path: str) -> dict[str, str]:
    """sha256 by relative path of every file in the experiment that Ray may unpickle on restore."""
    import pyarrow.fs as pafs

    fs, root = filesystem_and_path(exp_path)
    digests = {}
    for top in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
        if top.type == pafs.FileType.File and _restorable(top.base_name):
            digests[top.base_name] = _file_sha256(fs, top.path)
        elif top.type == pafs.FileType.Directory and top.base_name not in _SKIPPED_DIRS:
            for inner in fs.get_file_info(pafs.FileSelector(top.path)):
                if inner.type == pafs.FileType.File and inner.base_name.endswith(".pkl"):
                    digests[f"{top.base_name}/{inner.base_name}"] = _file_sha256(fs, inner.path)
    return digests


def _restorable(name: str) -> bool:
    # Pickles, and Ray's JSON state (experiment_state-*, basic-variant-state-*: cloudpickled fields inside);
    # not our own exports such as study_summary.json, which are rewritten after the manifest.
    return name.endswith(".pkl") or (name.endswith(".json") and "state" in name)


def _file_sha256(fs: pafs.FileSystem, path: str) -> str:
    with fs.open_input_stream(path) as f:
        return sha256_stream(f)


def _signature(files: dict[str, str], key: bytes) -> str:
    payload = json.dumps(files, sort_keys=True).encode()
    return hmac.new(key, payload, hashlib.sha256).hexdigest()


def write_signature(exp_path: str) -> None:
    """Records (and signs) the digests of the experiment's restorable files; call when the driver leaves it."""
    files = restorable_files(exp_path)
    if not files:
        return
    text = json.dumps({"files": files, "hmac_sha256": _signature(files, _key(create=True))}, indent=1)
    write_file(f"{exp_path.rstrip('/')}/{SIGNATURE_FILE}", lambda path: path.write_text(text))


def verify_signature(exp_path: str) -> None:
    """Raises :class:`ResumeRefused` unless the restorable files are exactly those our driver signed.

    Reads only the manifest and hashes files; nothing is unpickled, and Ray need not be running.
    """
    fs, root = filesystem_and_path(exp_path)
    where = f"{exp_path}/{SIGNATURE_FILE}"
    try:
        with fs.open_input_stream(f"{root}/{SIGNATURE_FILE}") as f:
            manifest = json.loads(f.read())
        signed, signature = dict(manifest["files"]), str(manifest["hmac_sha256"])
    except FileNotFoundError as err:
        raise ResumeRefused(f"refusing to resume: {where} is missing (the sweep was not left by an xswinir driver, "
                            "or its driver was killed); start it again under another name") from err
    except (ValueError, KeyError, TypeError) as err:
        raise ResumeRefused(f"refusing to resume: {where} is not a manifest xswinir wrote ({err})") from err
    if not hmac.compare_digest(signature, _signature(signed, _key(create=False))):
        raise ResumeRefused(f"refusing to resume: {where} was not signed with this machine's key "
                            f"({KEY_ENV} or {key_file()})")
    present = restorable_files(exp_path)
    changed = sorted(name for name in signed.keys() | present.keys() if signed.get(name) != present.get(name))
    if changed:
        raise ResumeRefused(f"refusing to resume: {len(changed)} file(s) Ray would unpickle changed since the sweep "
                            f"was saved ({', '.join(changed[:3])}{', ...' if len(changed) > 3 else ''}); "
                            "someone else wrote to its storage")
