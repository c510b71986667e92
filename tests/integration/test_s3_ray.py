"""Training with everything in a bucket, on real Ray: shards packed into it, checkpoints written to it, a worker
killed and the run restarted from it (downloaded and sha256-checked), ending bit for bit where the uninterrupted
run ends; the checkpoint on the final line is pasted into ``xswinir eval``.

The bucket is a local S3 server (``tests/s3/endpoint.py``). The run is ``xswinir train`` in a process of its own,
as users start it: its local Ray gets the AWS variables from it (the shared Ray of these tests was started
without them). The uninterrupted run it is compared with trains on the shared Ray from the same shards on disk.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator

import pytest
import torch

from tests.s3.endpoint import CLEARED, S3Endpoint, list_keys, moto_server
from xswinir.cli import main
from xswinir.config import load_config
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


def _aws_env(endpoint: S3Endpoint, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Points this process at the server and returns the environment for the processes it starts."""
    for name in CLEARED:
        monkeypatch.delenv(name, raising=False)
    for name, value in endpoint.env.items():
        monkeypatch.setenv(name, value)
    return {**os.environ, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}


def _model_weights(checkpoint: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from xswinir.checkpoint import MODEL_FILE, local_checkpoint

    with local_checkpoint(checkpoint) as folder:
        return load_file(folder / MODEL_FILE)


def test_train_from_a_bucket_survives_a_killed_worker_bit_for_bit(ray_local, endpoint, tmp_path, monkeypatch,
                                                                   capsys):
    from xswinir.trainer import FAILURE_ENV, fit

    env = _aws_env(endpoint, monkeypatch)
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
