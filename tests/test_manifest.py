"""The signed manifest of a sweep's pickled files: a resume is refused, before Ray starts or anything is unpickled,
when a file Tune would unpickle changed, appeared or lost its signature."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import ray

from xswinir.cli import main
from xswinir.tune.manifest import SIGNATURE_FILE, ResumeRefused, verify_signature, write_signature
from xswinir.tune.sweep_config import TEXTURE_WEIGHT


class _Boom:
    """A pickle that leaves a file behind when loaded: what a tampered tuner.pkl could do instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def _saved_experiment(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "tuner.pkl").write_bytes(pickle.dumps({"trainable": "train_trial"}))
    (folder / "experiment_state-2026-01-01_00-00-00.json").write_text('{"trial_data": []}')
    (folder / "t_00000").mkdir()
    (folder / "t_00000" / "params.pkl").write_bytes(pickle.dumps({TEXTURE_WEIGHT: 0.0}))
    (folder / "train").mkdir()
    (folder / "train" / "big_checkpoint.bin").write_bytes(b"not hashed")
    write_signature(str(folder))
    return folder


@pytest.fixture
def own_key(tmp_path, monkeypatch) -> Path:
    """This machine's key in a fresh config folder (``$XSWINIR_SWEEP_KEY`` unset); the folder is returned."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv("XSWINIR_SWEEP_KEY", raising=False)
    return tmp_path / "config"


def test_manifest_accepts_the_saved_sweep_and_refuses_every_change(tmp_path, monkeypatch, own_key):
    exp = _saved_experiment(tmp_path / "sweeps" / "s")
    verify_signature(str(exp))  # as saved: accepted
    assert (own_key / "xswinir" / "sweep.key").stat().st_mode & 0o077 == 0
    (exp / "train" / "big_checkpoint.bin").write_bytes(b"Train checkpoints are safetensors: not Ray's pickles")
    verify_signature(str(exp))

    marker = tmp_path / "pwned"
    for name, change, match in [
        ("pickle", lambda d: (d / "tuner.pkl").write_bytes(pickle.dumps(_Boom(marker))), "tuner.pkl"),
        ("added", lambda d: (d / "searcher-state-2026.pkl").write_bytes(b"x"), "searcher-state-2026.pkl"),
        ("trial", lambda d: (d / "t_00000" / "error.pkl").write_bytes(b"x"), "t_00000/error.pkl"),
        ("state", lambda d: (d / "experiment_state-2026-01-01_00-00-00.json").write_text("{}"), "experiment_state"),
        ("no manifest", lambda d: (d / SIGNATURE_FILE).unlink(), "is missing"),
    ]:
        copy = shutil.copytree(exp, tmp_path / "tampered" / name)
        change(copy)
        with pytest.raises(ResumeRefused, match=match):
            verify_signature(str(copy))
    assert not marker.exists()

    # A manifest rewritten by someone without the key does not pass either.
    forged = tmp_path / "forged"
    monkeypatch.setenv("XSWINIR_SWEEP_KEY", "the attacker's key")
    _saved_experiment(forged)
    monkeypatch.delenv("XSWINIR_SWEEP_KEY")
    with pytest.raises(ResumeRefused, match="not signed with this machine's key"):
        verify_signature(str(forged))


def test_resume_of_a_tampered_sweep_is_refused_before_ray_or_unpickling(tmp_path, capsys, own_key):
    exp = _saved_experiment(tmp_path / "sweeps" / "sweep_demo")
    marker = tmp_path / "pwned"
    (exp / "tuner.pkl").write_bytes(pickle.dumps(_Boom(marker)))
    code = main(["tune", "--config", "sweep_demo", "--storage", str(tmp_path / "sweeps"), "--resume"])
    err = capsys.readouterr().err
    assert code == 2 and "refusing to resume" in err and "tuner.pkl" in err and len(err.strip().splitlines()) == 1
    assert not marker.exists() and not ray.is_initialized()
