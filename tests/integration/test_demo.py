"""The README's first command, shortened: training, evaluation against bicubic, the trust model and the explanation
picture and page, run as users run it (its own process, its own local Ray) and as quiet as promised: our progress,
results and timings on the console, Ray's own logs in the run's log folder."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT
from xswinir.cli import main
from xswinir.images import read_image
from xswinir.metrics import VAL_PSNR_BICUBIC_Y, VAL_PSNR_Y
from xswinir.trust import load_trust

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
    assert "[3/3] trust model and explanation picture" in out and "Y-PSNR bicubic" in out
    assert re.search(r"^time: .+ in all: Ray start-up \d+ s, training .+ \(4 steps .+\), evaluation \d+ s, "
                     r"trust model \d+ s, explanation \d+ s$", out, re.M), out
    # Not a terminal: progress as plain lines, never a redrawn bar; nothing of Ray's own.
    assert "\r" not in err and "train: step 4/4 (100%)" in err, err
    assert not [noise for noise in RAY_NOISE if noise in out + err], out + err
    ray_logs = tmp_path / "logs" / "ray"
    assert ray_logs.is_symlink() and "Started a local Ray instance" in (ray_logs / "driver.log").read_text()
    assert any(ray_logs.glob("worker-*.out")) and f"Ray's logs        {ray_logs}" in out

    report = json.loads((tmp_path / "eval.json").read_text())
    assert [row["image"] for row in report["images"]] == ["coins"]
    assert report["mean"][VAL_PSNR_Y] > 10 and report["mean"][VAL_PSNR_BICUBIC_Y] > 20
    # The trust model: fitted on the training images (skimage:train) only, never on the validation image.
    trust_file = tmp_path / "trust.json"
    coverage = re.search(rf"^trust model written to {re.escape(str(trust_file))}: fitted on 6 images of skimage:train "
                         r"\(160 px crops\), its 90% bound covers ([\d.]+)% of the 200 patches of 2 calibration "
                         r"images$", out, re.M)
    assert coverage and 0 <= float(coverage.group(1)) <= 100, out
    trust = load_trust(trust_file)
    assert trust.report["images"] == "skimage:train" and trust.report["fit_images"] == 6
    assert trust.report["calibration_coverage"] == pytest.approx(float(coverage.group(1)) / 100, abs=1e-3)
    assert f"trust model       {trust_file}" in out
    picture = read_image(tmp_path / "explain.png")
    assert picture.shape[-1] >= 2530 and picture.std() > 0.05  # 23 inches at 110 dpi: the trust panel's 4 more
    page = re.search(r'<script type="application/json" id="page-data">(.*?)</script>',
                     (tmp_path / "explain.html").read_text(), re.S)
    payload = json.loads(page.group(1))
    assert payload["hasTrust"] and payload["hasError"]  # expected error and bound, and the measured error
    assert all(p["trust"] is not None and p["bound"] is not None for p in payload["patches"])
    assert (tmp_path / "logs" / "training_curves.png").is_file()
    # A second demo into the same folder must not silently destroy the first (refused before Ray starts).
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
