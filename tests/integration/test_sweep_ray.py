"""A real sweep: Ray Tune + Optuna + Ray Train on 2 CPUs, interrupted, refused when tampered, then resumed."""

from __future__ import annotations

import os
import shutil

import pyarrow.parquet as pq
import pytest
import yaml

from tests.integration.interrupt import CtrlCAtFirstFinishedTrial, finish_or_wait
from xswinir.config import RunConfig, load_config
from xswinir.errors import UserError
from xswinir.metrics import VAL_PSNR_Y
from xswinir.trainer import init_ray
from xswinir.tune.launch import run_trials
from xswinir.tune.manifest import SIGNATURE_FILE, ResumeRefused, verify_signature
from xswinir.tune.plots import PLOT_FILES
from xswinir.tune.results import BEST_CONFIG_FILE, TRIALS_FILE
from xswinir.tune.sweep import run_sweep, trial_dirname
from xswinir.tune.sweep_config import TEXTURE_WEIGHT, SweepConfig, load_sweep_config
from xswinir.tune.trials import collect_trials

pytestmark = pytest.mark.integration


def _tiny_sweep(tmp_path, name: str, num_samples: int) -> SweepConfig:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "name": name, "base": "demo", "num_samples": num_samples, "max_concurrent": 2, "seed": 0,
        "overrides": [
            "model.depths=[1]", "model.num_heads=[2]", "model.embed_dim=12", "data.gt_size=32",
            "texture.region_size=64", "texture.classifier.num_pairs=256", "texture.classifier.steps=20",
            "train.batch_size=2", "train.total_steps=4", "train.val_every=2", "train.warmup_steps=0",
            "data.val_max_images=1", "run.cpus_per_worker=0.5",
        ],
        "search": {
            TEXTURE_WEIGHT: {"type": "loguniform", "low": 0.01, "high": 1.0},
            "texture.patch_size": {"type": "choice", "values": [16, 32]},
        },
        "scheduler": {"type": "asha", "grace_period": 2, "reduction_factor": 2},
        "storage": str(tmp_path / "sweeps"),
    }))
    return load_sweep_config(path)


def _check_outputs(summary, sweep: SweepConfig) -> None:
    out = summary.files["trials"].parent
    table = pq.read_table(out / TRIALS_FILE).to_pylist()
    assert len(table) == sweep.num_samples
    baselines = [r for r in table if r["baseline"]]
    assert len(baselines) == 1 and baselines[0][TEXTURE_WEIGHT] == 0.0 and baselines[0]["order"] == 0
    assert all(r[TEXTURE_WEIGHT] > 0 for r in table if not r["baseline"])
    assert all(r[f"best {VAL_PSNR_Y}"] is not None and r["status"] != "error" for r in table), table
    for name in PLOT_FILES:
        assert (out / name).stat().st_size > 1000
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name]  # every export moved into place
    best = load_config(out / BEST_CONFIG_FILE)
    assert best.loss.texture_weight == summary.best.texture_weight
    assert best.model.embed_dim == 12  # the sweep's overrides are in it


@pytest.fixture(scope="module")
def own_ray(ray_start_retrying):
    """A fresh local Ray (with its dashboard) for the sweep alone, stopped when the module ends.

    Not the shared ``ray_local``: trials that ASHA stops leave their placement groups behind on a Ray without
    its dashboard, and the two-worker training tests that follow then wait 180 s for CPUs that never free up
    (seen 2026-11-28). Started here as a sweep starts it (``init_ray``), but with one more try if Ray times out
    starting on the busy machine.
    """
    import ray

    ray.shutdown()  # an earlier test's shared Ray, if any: init_ray must start this module's own
    old = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = "local"
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    # What run_trials sets before it starts a local Ray, which inherits it; here Ray starts before run_trials.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "180")
    ray_start_retrying(lambda: init_ray(RunConfig()))
    yield
    ray.shutdown()
    if old is None:
        os.environ.pop("RAY_ADDRESS", None)
    else:
        os.environ["RAY_ADDRESS"] = old


@pytest.mark.slow  # 30-60 s on 2 cores: most of it is Ray starting (the sweep below reuses it)
def test_an_interrupted_experiment_reports_what_its_resume_runs(tmp_path, own_ray, monkeypatch):
    """Ctrl-C when one trial has finished and the other runs: the results say one finished (as the saved
    state that a resume reads does), not two (as Tune's in-memory trials say once it stopped them); the resume
    runs the other trial only."""
    from ray import tune

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))  # the manifest's key
    monkeypatch.delenv("XSWINIR_SWEEP_KEY", raising=False)
    release = tmp_path / "release"
    space = {"finish": tune.grid_search([True, False]), "started": str(tmp_path / "started"), "release": str(release)}
    experiment = str(tmp_path / "experiments" / "drill")
    marker = tmp_path / "interrupted"

    first = run_trials(finish_or_wait, {}, experiment, RunConfig(), resume=False, param_space=space,
                       tune_config=tune.TuneConfig(max_concurrent_trials=2, trial_dirname_creator=trial_dirname),
                       callbacks=[CtrlCAtFirstFinishedTrial(marker)])
    # The trial that finished; the other was running (it had reported) when the Ctrl-C came.
    assert len(first) == 2 and first.num_terminated == 1 and all(r.metrics for r in first), [r.metrics for r in first]
    done = next(r for r in first if r.config["finish"]).metrics["trial_id"]
    assert marker.read_text() == done
    # As a sweep's table: the finished trial, at step 1 of 4, reads as one ASHA stopped early (though the sweep
    # was interrupted); the other as unfinished.
    sweep = _tiny_sweep(tmp_path, "drill", num_samples=3)
    rows = collect_trials(first, sweep, sweep.base_config())
    assert {r.trial_id: r.status for r in rows} == {
        r.metrics["trial_id"]: "stopped early" if r.metrics["trial_id"] == done else "unfinished" for r in first}

    release.touch()
    resumed = run_trials(finish_or_wait, {}, experiment, RunConfig(), resume=True)
    assert len(resumed) == 2 and resumed.num_terminated == 2 and resumed.num_errors == 0
    again = next(r for r in resumed if r.config["finish"])
    assert len(again.metrics_dataframe) == 1  # finished before the Ctrl-C: not run again


# The Ctrl-C lands when a trial finishes; which trial finishes first (the searched one run to the end, or stopped
# early by ASHA at step 2 because the baseline reached step 2 first) depends on timing, and both must pass.
@pytest.mark.slow  # 2-4 minutes on 2 cores
def test_sweep_interrupted_then_resumed_runs_baseline_and_exports(tmp_path, own_ray, monkeypatch):
    """One sweep of 3 tiny trials (the λ = 0 baseline and two searched), stopped by Ctrl-C after its first finished
    trial, then resumed to the end.

    One sweep instead of two keeps the file under ~4 minutes on 2 cores.
    """
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))  # the manifest's key
    monkeypatch.delenv("XSWINIR_SWEEP_KEY", raising=False)
    marker = tmp_path / "interrupted"

    sweep = _tiny_sweep(tmp_path, "tiny", num_samples=3)
    first = run_sweep(sweep, callbacks=[CtrlCAtFirstFinishedTrial(marker)])
    done_before = {r.trial_id for r in first.rows if r.status in ("completed", "stopped early")}
    # Exactly the trial whose end set off the Ctrl-C is done; the one it cut short is unfinished.
    assert done_before == {marker.read_text()}, [(r.trial_id, r.status, r.steps) for r in first.rows]
    assert not first.finished and len(first.rows) < sweep.num_samples
    with pytest.raises(UserError, match="already exists"):
        run_sweep(sweep)

    # The interrupted driver signed what Ray will unpickle; a copy with one changed pickle is refused.
    exp = tmp_path / "sweeps" / "tiny"
    assert (exp / SIGNATURE_FILE).is_file() and (exp / "tuner.pkl").is_file()
    verify_signature(str(exp))
    copy = shutil.copytree(exp, tmp_path / "copied" / "tiny")
    (copy / "tuner.pkl").write_bytes((copy / "tuner.pkl").read_bytes() + b"\n")
    with pytest.raises(ResumeRefused, match="tuner.pkl"):
        run_sweep(load_sweep_config(tmp_path / "tiny.yaml", storage=str(tmp_path / "copied")), resume=True)

    resumed = run_sweep(sweep, resume=True)
    assert resumed.finished
    assert done_before <= {r.trial_id for r in resumed.rows}
    _check_outputs(resumed, sweep)
    verify_signature(str(exp))  # re-signed after the resumed run
