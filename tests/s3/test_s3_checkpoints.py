"""Checkpoints in a bucket, without Ray: ``eval``, ``upscale``, ``explain`` and ``export`` read them by URI and
give what they give for the same checkpoint on disk; a damaged one is refused, or passed over on resume as on
disk (names and sizes on the bucket, sha256 once downloaded); every error is one line naming bucket and key."""

from __future__ import annotations

import json
import logging
import socket
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY
from tests.s3.conftest import Bucket
from tests.s3.endpoint import list_keys, upload_folder
from tests.test_explain import textured_image, tiny_classifier
from xswinir.checkpoint import EMA_FILE, MODEL_FILE, STATE_FILE, save_checkpoint, save_weights
from xswinir.cli import main
from xswinir.config import Config, RunConfig, apply_overrides
from xswinir.images import write_image
from xswinir.model import build_swinir
from xswinir.paths import filesystem_and_path
from xswinir.runs import RAY_SNAPSHOT_FILE, prepare_run, verified_checkpoint
from xswinir.texture import save_texture_classifier

NAMES = ["checkpoint_2026-01-01_00-00-02.000000", "checkpoint_2026-01-01_00-00-04.000000"]


def _checkpoint(directory: Path, step: int, classifier: Path | None = None) -> Path:
    """A training checkpoint of the tiny model at ``step`` (weights seeded by it, EMA different from them)."""
    cfg = apply_overrides(Config(), TINY)
    torch.manual_seed(step)
    model, ema = build_swinir(cfg.model), build_swinir(cfg.model)
    directory.mkdir(parents=True)
    save_checkpoint(directory, cfg, model, ema, torch.optim.Adam(model.parameters()), step, classifier)
    return directory


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A run folder on disk (checkpoints at steps 2 and 4, the newest with a texture classifier), a weights file
    and a test image."""
    root = tmp_path_factory.mktemp("local")
    image = textured_image(torch.Generator().manual_seed(0))  # (3, 64, 64)
    write_image(root / "hr" / "texture.png", image)
    save_texture_classifier(tiny_classifier(image), root / "classifier")
    _checkpoint(root / "run" / NAMES[0], 2)
    newest = _checkpoint(root / "run" / NAMES[1], 4, root / "classifier")
    cfg = apply_overrides(Config(), TINY).model
    save_weights(build_swinir(cfg), cfg, root / "tiny.safetensors")
    return {"root": root, "hr": root / "hr", "run": root / "run", "checkpoint": newest,
            "weights": root / "tiny.safetensors"}


def _one_line_error(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err.strip()
    assert ": error: " in err and "\n" not in err and "Traceback" not in err, err
    return err


def _metric_rows(path: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if "time" not in k and "second" not in k}
            for row in json.loads(path.read_text())["images"]]


def _safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata (safetensors writes the metadata in no fixed order: bytes may differ)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    return load_file(path), metadata


def test_every_command_reads_a_checkpoint_from_the_bucket(s3: Bucket, local, tmp_path, capsys):
    upload_folder(s3.fs, local["checkpoint"], s3.path(f"runs/demo/{NAMES[1]}"))
    with s3.fs.open_output_stream(s3.path("models/tiny.safetensors")) as f:
        f.write(local["weights"].read_bytes())
    uri = s3.uri(f"runs/demo/{NAMES[1]}")
    for name, checkpoint in (("disk", str(local["checkpoint"])), ("bucket", uri)):
        out = tmp_path / name
        common = ["--checkpoint", checkpoint, "--device", "cpu"]
        assert main(["eval", "--hr", str(local["hr"]), *common, "--out", str(out / "eval.json")]) == 0
        assert main(["upscale", str(local["hr"]), *common, "--out", str(out / "sr")]) == 0
        # The classifier comes from the checkpoint folder: the download holds its sub-folder too.
        assert main(["explain", str(local["hr"] / "texture.png"), *common, "--patches", "1",
                     "--out", str(out / "explain.png")]) == 0
        assert main(["export", checkpoint, "--format", "safetensors", "--out", str(out / "export.safetensors")]) == 0
    capsys.readouterr()
    disk, bucket = tmp_path / "disk", tmp_path / "bucket"
    assert _metric_rows(bucket / "eval.json") == _metric_rows(disk / "eval.json")
    assert (bucket / "sr" / "texture_x2.png").read_bytes() == (disk / "sr" / "texture_x2.png").read_bytes()
    assert (bucket / "explain.png").stat().st_size > 0
    exported = [_safetensors(folder / "export.safetensors") for folder in (bucket, disk)]
    assert exported[0][1] == exported[1][1] and exported[0][0].keys() == exported[1][0].keys()
    assert all(torch.equal(exported[0][0][k], exported[1][0][k]) for k in exported[1][0])
    # A single weights file in the bucket is downloaded alone.
    assert main(["upscale", str(local["hr"]), "--checkpoint", s3.uri("models/tiny.safetensors"), "--device", "cpu",
                 "--out", str(tmp_path / "file")]) == 0
    assert (tmp_path / "file" / "texture_x2.png").is_file()


def test_trust_fit_reads_a_checkpoint_from_the_bucket(s3: Bucket, local, tmp_path, capsys):
    upload_folder(s3.fs, local["checkpoint"], s3.path(f"runs/trust/{NAMES[1]}"))
    images = tmp_path / "images"
    for seed in (1, 2, 3):  # fitting and calibration need two images at least
        write_image(images / f"t{seed}.png", textured_image(torch.Generator().manual_seed(seed)))
    fitted = {}
    for name, checkpoint in (("disk", str(local["checkpoint"])), ("bucket", s3.uri(f"runs/trust/{NAMES[1]}"))):
        out = tmp_path / f"{name}.json"
        assert main(["trust", "fit", "--checkpoint", checkpoint, "--images", str(images), "--crop", "0",
                     "--device", "cpu", "--out", str(out)]) == 0
        fitted[name] = json.loads(out.read_text())
        assert fitted[name]["report"].pop("checkpoint") == checkpoint  # the URI, not the temporary copy
    assert fitted["bucket"] == fitted["disk"]
    assert main(["trust", "fit", "--checkpoint", s3.uri("runs/trust/missing"), "--images", str(images),
                 "--out", str(tmp_path / "x.json")]) == 2
    assert s3.name in _one_line_error(capsys)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _damage(s3: Bucket, key: str) -> None:
    """Rewrites an object of the bucket with its first half only (a checkpoint cut short while uploading)."""
    with s3.fs.open_input_stream(s3.path(key)) as f:
        data = f.read()
    with s3.fs.open_output_stream(s3.path(key)) as f:
        f.write(data[: len(data) // 2])


def test_errors_are_one_line_naming_bucket_key_and_what_to_check(s3: Bucket, local, tmp_path, monkeypatch, capsys):
    from moto.core.authorization import enable_iam_authentication

    upload_folder(s3.fs, local["checkpoint"], s3.path(f"runs/demo/{NAMES[1]}"))
    uri = s3.uri(f"runs/demo/{NAMES[1]}")
    evaluate = ["eval", "--hr", str(local["hr"]), "--device", "cpu", "--checkpoint"]

    assert main([*evaluate, s3.uri("runs/demo/checkpoint_missing")]) == 2
    err = _one_line_error(capsys)
    assert f"bucket '{s3.name}', key 'runs/demo/checkpoint_missing'" in err and "does not exist" in err

    assert main([*evaluate, f"s3://{s3.name}-missing/runs/demo/x.safetensors"]) == 2
    assert f"bucket '{s3.name}-missing'" in _one_line_error(capsys)

    with enable_iam_authentication():  # the test keys are unknown to the server's IAM
        assert main([*evaluate, uri]) == 2
    err = _one_line_error(capsys)
    assert f"bucket '{s3.name}', key 'runs/demo/{NAMES[1]}'" in err and "check the credentials" in err

    endpoint = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    assert main([*evaluate, uri]) == 2
    err = _one_line_error(capsys)
    assert "NETWORK_CONNECTION" in err and f"check the endpoint (AWS_ENDPOINT_URL={endpoint})" in err
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint.url)

    _damage(s3, f"runs/demo/{NAMES[1]}/{EMA_FILE}")
    assert main([*evaluate, uri]) == 2
    err = _one_line_error(capsys)
    assert f"checkpoint {uri} does not match its manifest.json: {EMA_FILE} has" in err


def test_a_damaged_checkpoint_in_the_bucket_is_passed_over_on_resume(s3: Bucket, local, caplog):
    """As on disk (tests/test_runs.py): the driver skips what fails names and sizes, the worker what fails sha256."""
    upload_folder(s3.fs, local["run"], s3.path("runs/demo"))
    run = RunConfig(name="demo", storage=s3.uri("runs"))
    newest = f"{s3.uri('runs/demo')}/{NAMES[1]}"
    # Ray's snapshot names the newest checkpoint as its latest: it must be set aside once that one is damaged.
    snapshot = {"checkpoint_results": [{"checkpoint_dir_name": name} for name in NAMES],
                "pending_training_results": [], "latest_checkpoint_result": {"checkpoint_dir_name": NAMES[1]}}
    with s3.fs.open_output_stream(s3.path(f"runs/demo/{RAY_SNAPSHOT_FILE}")) as f:
        f.write(json.dumps(snapshot).encode())
    assert prepare_run(run, resume=True) == newest  # intact: the newest, Ray's snapshot kept

    # Same size, one byte changed: the bucket's listing cannot see it, the sha256 after download does.
    with s3.fs.open_input_stream(s3.path(f"runs/demo/{NAMES[1]}/{STATE_FILE}")) as f:
        data = bytearray(f.read())
    data[len(data) // 2] ^= 0x01
    with s3.fs.open_output_stream(s3.path(f"runs/demo/{NAMES[1]}/{STATE_FILE}")) as f:
        f.write(bytes(data))
    assert prepare_run(run, resume=True) == newest
    fs, path = filesystem_and_path(newest)
    with caplog.at_level(logging.WARNING, logger="xswinir.runs"), verified_checkpoint(path, fs) as folder:
        assert torch.load(folder / STATE_FILE, weights_only=True)["step"] == 2
        assert not folder.is_relative_to(local["root"])  # a download, checked by sha256
    assert [r.getMessage() for r in caplog.records][0].startswith(f"skipping checkpoint {path}: {STATE_FILE} does "
                                                                  "not match its sha256")
    caplog.clear()

    _damage(s3, f"runs/demo/{NAMES[1]}/{MODEL_FILE}")  # cut short: the driver sees it by its size
    with caplog.at_level(logging.WARNING, logger="xswinir.runs"):
        assert prepare_run(run, resume=True) == f"{s3.uri('runs/demo')}/{NAMES[0]}"
    assert any(NAMES[1] in r.getMessage() and f"{MODEL_FILE} has" in r.getMessage() for r in caplog.records)
    keys = list_keys(s3.fs, s3.path("runs/demo"))
    assert RAY_SNAPSHOT_FILE not in keys and any(k.startswith("checkpoint_manager_snapshot.set-aside-") for k in keys)
    assert {k.split("/")[0] for k in keys if k.startswith("checkpoint_2026")} == set(NAMES)  # nothing deleted


def test_a_new_run_in_the_bucket_starts_from_step_0_and_refuses_a_missing_resume(s3: Bucket):
    from xswinir.errors import UserError

    assert prepare_run(RunConfig(name="fresh", storage=s3.uri("runs")), resume=False) is None
    with pytest.raises(UserError, match=f"nothing to resume: no run 'fresh' in {s3.uri('runs')}"):
        prepare_run(RunConfig(name="fresh", storage=s3.uri("runs")), resume=True)

