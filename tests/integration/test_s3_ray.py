"""Training with everything in a bucket, on real Ray: shards packed into it, checkpoints written to it, a worker
killed and the run restarted from it (downloaded and sha256-checked), ending bit for bit where the uninterrupted
run ends; the checkpoint on the final line is pasted into ``xswinir eval``. In the slow tier, a sweep with its
storage in the bucket, interrupted, refused when tampered with, then resumed.

The bucket is a local S3 server (``tests/s3/endpoint.py``). The run is ``xswinir train`` in a process of its own,
as users start it: its local Ray gets the AWS variables from it (the shared Ray of these tests was started
without them). The uninterrupted run it is compared with trains on the shared Ray from the same shards on disk.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator

import pytest
import torch
import yaml

from tests.s3.endpoint import S3Endpoint, list_keys, moto_server, point_at
from xswinir.cli import main
from xswinir.config import RunConfig, load_config
from xswinir.images import read_image, write_image
from xswinir.sources import resolve_image_files
from xswinir.training_log import METRICS_FILE, read_metrics

pytestmark = pytest.mark.integration

TINY = [
    "model.depths=[1]", "model.num_heads=[2]", "model.embed_dim=12", "model.window_size=4", "data.gt_size=32",
    "data.loader_workers=0", "data.val=skimage:coins", "train.batch_size=4", "train.log_every=2",
    "train.total_steps=4", "train.val_every=2", "loss.texture_weight=0", "run.progress=false",
    "run.num_workers=1", "run.keep_checkpoints=5",
]


@pytest.fixture(scope="module")
def endpoint() -> Iterator[S3Endpoint]:
    with moto_server() as server:
        yield server


def _model_weights(checkpoint: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from xswinir.checkpoint import MODEL_FILE, local_checkpoint

    with local_checkpoint(checkpoint) as folder:
        return load_file(folder / MODEL_FILE)


@pytest.mark.slow  # 1.5 min: .ci/run's second pass runs it; the default tier keeps S3 through tests/s3
def test_train_from_a_bucket_survives_a_killed_worker_bit_for_bit(ray_local, endpoint, tmp_path, monkeypatch,
                                                                   capsys):
    from xswinir.trainer import FAILURE_ENV, fit

    env = {**point_at(endpoint, monkeypatch), "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}
    bucket = endpoint.new_bucket()
    for path in resolve_image_files("skimage:astronaut,coffee,chelsea"):
        write_image(tmp_path / "hr" / f"{path.stem}.png", read_image(path)[:, :96, :96])
    shards = f"s3://{bucket}/shards"
    assert main(["pack", str(tmp_path / "hr"), shards, "--no-progress", "--workers", "1"]) == 0
    assert main(["pack", str(tmp_path / "hr"), str(tmp_path / "shards"), "--no-progress", "--workers", "1"]) == 0

    args = [sys.executable, "-m", "xswinir", "train", "--config", "demo"]
    for item in (*TINY, f"data.train={shards}", f"run.storage=s3://{bucket}/runs", "run.name=killed",
                 f"run.log_dir={tmp_path / 'logs'}"):
        args += ["--set", item]
    done = subprocess.run(args, env={**env, FAILURE_ENV: "3"}, capture_output=True, text=True, timeout=600,
                          start_new_session=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "logs" / ".failure_injected").exists()  # rank 0 did fail at step 3
    assert [r["step"] for r in read_metrics(tmp_path / "logs" / METRICS_FILE) if "train/loss" in r] == [2, 4]
    printed = re.search(r"^checkpoint: (\S+)$", done.stdout, re.MULTILINE)
    assert printed is not None and printed[1].startswith(f"s3://{bucket}/runs/killed/checkpoint_"), done.stdout
    keys = list_keys(endpoint.filesystem(), f"{bucket}/runs/killed")
    assert len({key.split("/")[0] for key in keys if "/" in key}) == 2  # steps 2 and 4, both in the bucket

    # The same run, never interrupted, from the same shards on disk, on the shared Ray.
    monkeypatch.delenv(FAILURE_ENV, raising=False)
    cfg = load_config("demo", [*TINY, f"data.train={tmp_path / 'shards'}", f"run.storage={tmp_path / 'runs'}",
                               "run.name=straight", f"run.log_dir={tmp_path / 'straight'}"])
    straight = fit(cfg)
    expected = _model_weights(straight.checkpoint.path)
    resumed = _model_weights(printed[1])
    assert resumed.keys() == expected.keys() and all(torch.equal(resumed[k], expected[k]) for k in expected)

    # The printed location is the next command's input as it stands.
    capsys.readouterr()
    assert main(["eval", "--hr", "skimage:coins", "--checkpoint", printed[1], "--device", "cpu"]) == 0
    assert f"checkpoint {printed[1]}, x2" in capsys.readouterr().out


@pytest.fixture
def ray_with_aws(endpoint, monkeypatch, ray_start_retrying):
    """A fresh local Ray started from this process with the AWS variables set, stopped after the test.

    Tune runs in this process, so its Ray must see the bucket: the shared ``ray_local`` was started without the
    variables, and is shut down here as ``test_sweep_ray.own_ray`` does. Started as a sweep starts it
    (``init_ray``), with one more try if Ray times out starting on the busy machine.
    """
    import ray

    from xswinir.trainer import init_ray

    ray.shutdown()
    point_at(endpoint, monkeypatch)
    monkeypatch.setenv("RAY_ADDRESS", "local")
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    # What run_trials sets before it starts a local Ray, which inherits it; here Ray starts before run_trials.
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "180")
    ray_start_retrying(lambda: init_ray(RunConfig()))
    yield
    ray.shutdown()


# 1-4 minutes on 2 cores: three tiny trials one after the other (a classifier trained on the fly), over two Tune runs.
@pytest.mark.slow
def test_sweep_in_a_bucket_interrupted_then_resumed(ray_with_aws, endpoint, tmp_path, monkeypatch):
    from tests.integration.interrupt import CtrlCAtFirstFinishedTrial
    from xswinir.errors import UserError
    from xswinir.tune.manifest import SIGNATURE_FILE, ResumeRefused, verify_signature
    from xswinir.tune.results import TRIALS_FILE
    from xswinir.tune.sweep import run_sweep
    from xswinir.tune.sweep_config import TEXTURE_WEIGHT, load_sweep_config

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))  # the manifest's key
    monkeypatch.delenv("XSWINIR_SWEEP_KEY", raising=False)
    bucket = endpoint.new_bucket()
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "name": "tiny", "base": "demo", "num_samples": 3, "max_concurrent": 1, "seed": 0,
        "overrides": [
            "model.depths=[1]", "model.num_heads=[2]", "model.embed_dim=12", "data.gt_size=32",
            "texture.region_size=64", "texture.classifier.num_pairs=256", "texture.classifier.steps=20",
            "train.batch_size=2", "train.total_steps=4", "train.val_every=2", "train.warmup_steps=0",
            "data.val_max_images=1", "run.cpus_per_worker=0.5",
        ],
        "search": {TEXTURE_WEIGHT: {"type": "loguniform", "low": 0.01, "high": 1.0}},
        "scheduler": {"type": "none"},
        "storage": f"s3://{bucket}/sweeps",
    }))
    sweep = load_sweep_config(config)
    marker = tmp_path / "interrupted"

    first = run_sweep(sweep, callbacks=[CtrlCAtFirstFinishedTrial(marker)])
    # One trial at a time and no early stopping: the trial whose end set off the Ctrl-C is the one completed.
    done = {r.trial_id: r.status for r in first.rows if r.status != "unfinished"}
    assert not first.finished and done == {marker.read_text(): "completed"}, [r.status for r in first.rows]
    with pytest.raises(UserError, match="already exists"):
        run_sweep(sweep)
    exp = f"s3://{bucket}/sweeps/tiny"
    verify_signature(exp)  # signed in the bucket by the interrupted driver

    # One changed pickle in the bucket: the resume is refused before anything is unpickled.
    fs = endpoint.filesystem()
    with fs.open_input_stream(f"{bucket}/sweeps/tiny/tuner.pkl") as f:
        original = f.read()
    with fs.open_output_stream(f"{bucket}/sweeps/tiny/tuner.pkl") as f:
        f.write(original + b"\n")
    with pytest.raises(ResumeRefused, match="tuner.pkl"):
        run_sweep(sweep, resume=True)
    with fs.open_output_stream(f"{bucket}/sweeps/tiny/tuner.pkl") as f:
        f.write(original)

    resumed = run_sweep(sweep, resume=True)
    assert resumed.finished and len(resumed.rows) == 3
    assert all(r.status == "completed" for r in resumed.rows), [r.status for r in resumed.rows]
    verify_signature(exp)  # re-signed after the resumed run
    keys = list_keys(fs, f"{bucket}/sweeps/tiny")
    assert TRIALS_FILE in keys and SIGNATURE_FILE in keys  # the results were uploaded beside the experiment
    assert all(r.best is not None and r.steps == 4 for r in resumed.rows)
    assert sum(r.baseline for r in resumed.rows) == 1  # the lambda = 0 baseline ran
