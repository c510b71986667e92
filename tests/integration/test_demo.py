"""The README's first command, shortened: training, evaluation against bicubic and the explanation picture, run
as users run it (its own process, its own local Ray) and as quiet as promised: our progress, results and
timings on the console, Ray's own logs in the run's log folder."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT
from xswinir.cli import main
from xswinir.metrics import VAL_PSNR_BICUBIC_Y, VAL_PSNR_Y

pytestmark = pytest.mark.integration

# What Ray prints when its logs reach the console: start-up lines, worker prefixes, Ray Train's report dumps.
RAY_NOISE = ("Started a local Ray instance", "(RayTrainWorker", "(TrainController", "TrainingReport(",
             "Checkpoint successfully created", "PreemptionWatcher", "Token authentication")


def test_demo_runs_end_to_end_quietly(tmp_path, capsys):
    args = ["demo", "--out", str(tmp_path), "--set", "train.total_steps=4", "--set", "train.val_every=4",
            "--set", "texture.classifier.num_pairs=256", "--set", "texture.classifier.steps=50",
            "--set", "data.val=skimage:coins"]
    # Reports would wait 2 s each on the Train controller's default polling.
    env = {**os.environ, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}
    done = subprocess.run([sys.executable, "-m", "xswinir", *args], capture_output=True, text=True, timeout=600,
                          cwd=REPO_ROOT, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    out, err = done.stdout, done.stderr
    assert "[3/3] explanation picture" in out and "Y-PSNR bicubic" in out
    assert re.search(r"^time: .+ in all: Ray start-up \d+ s, training .+ \(4 steps .+\), evaluation \d+ s, "
                     r"explanation \d+ s$", out, re.M), out
    # Not a terminal: progress as plain lines, never a redrawn bar; nothing of Ray's own.
    assert "\r" not in err and "train: step 4/4 (100%)" in err, err
    assert not [noise for noise in RAY_NOISE if noise in out + err], out + err
    ray_logs = tmp_path / "logs" / "ray"
    assert ray_logs.is_symlink() and "Started a local Ray instance" in (ray_logs / "driver.log").read_text()
    assert any(ray_logs.glob("worker-*.out")) and f"Ray's logs        {ray_logs}" in out

    report = json.loads((tmp_path / "eval.json").read_text())
    assert [row["image"] for row in report["images"]] == ["coins"]
    assert report["mean"][VAL_PSNR_Y] > 10 and report["mean"][VAL_PSNR_BICUBIC_Y] > 20
    assert (tmp_path / "explain.png").stat().st_size > 10_000
    assert (tmp_path / "explain.html").is_file()
    assert (tmp_path / "logs" / "training_curves.png").is_file()
    # A second demo into the same folder must not silently destroy the first (refused before Ray starts).
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
