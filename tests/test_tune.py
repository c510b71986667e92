"""Sweeps: search-space parsing and checks (no Ray), and real Ray Tune + Optuna sweeps of a tiny model."""

from __future__ import annotations

import math
import os
import signal

import pyarrow.parquet as pq
import pytest
import yaml

from tune.search_space import Domain, check_search_space, parse_search_space, to_optuna, to_tune
from tune.sweep import (
    BEST_CONFIG_FILE,
    PLOT_FILES,
    TEXTURE_WEIGHT,
    TRIALS_FILE,
    BaselineFirst,
    SweepConfig,
    TrialRow,
    format_table,
    load_sweep_config,
    param_importances,
    run_sweep,
)
from xswinir.config import ConfigError, config_fields, load_config
from xswinir.errors import UserError
from xswinir.metrics import VAL_PSNR_Y


def test_shipped_sweep_keys_are_config_fields():
    sweep = load_sweep_config("sweep_demo")
    fields = set(config_fields())
    assert sweep.search and set(sweep.search) <= fields
    assert TEXTURE_WEIGHT in sweep.search and sweep.search[TEXTURE_WEIGHT].type == "loguniform"
    assert sweep.baseline and sweep.num_samples == 4 and sweep.metric == VAL_PSNR_Y
    for override in sweep.overrides:
        assert override.split("=", 1)[0] in fields


def test_unknown_search_key_is_refused_with_a_hint():
    with pytest.raises(ConfigError, match="did you mean 'loss.texture_weight'"):
        parse_search_space({"loss.texture_weigth": {"type": "loguniform", "low": 0.01, "high": 1}})


@pytest.mark.parametrize("spec, message", [
    ({"type": "loguniform", "low": 0, "high": 1}, "low > 0"),
    ({"type": "uniform", "low": 1, "high": 1}, "low < high"),
    ({"type": "choice", "values": []}, "non-empty"),
    ({"type": "gauss", "low": 0, "high": 1}, "unknown"),
    ({"type": "int", "low": 1.5, "high": 3}, "integer"),
    ({"type": "choice", "values": [1], "low": 0}, "not `low`"),
    ({"low": 0, "high": 1}, "needs a `type`"),
    ({"type": "uniform", "low": 0, "high": 1, "step": 2}, "unknown domain keys"),
])
def test_bad_domains(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_search_space({"train.lr": spec})


def test_domain_values_are_checked_against_the_config():
    base = load_config("demo")  # gt_size 64
    check_search_space(base, parse_search_space({"texture.patch_size": {"type": "choice", "values": [16, 32]}}))
    with pytest.raises(ConfigError, match="widest filter"):
        check_search_space(base, parse_search_space({"texture.patch_size": {"type": "choice", "values": [8, 16]}}))
    with pytest.raises(ConfigError, match="texture.patch_size=24"):
        check_search_space(base, parse_search_space({"texture.patch_size": {"type": "choice", "values": [16, 24]}}))
    with pytest.raises(ConfigError, match="train.batch_size"):
        check_search_space(base, parse_search_space({"train.batch_size": {"type": "choice", "values": ["big"]}}))


def test_tune_and_optuna_domains_agree():
    space = parse_search_space({
        "loss.texture_weight": {"type": "loguniform", "low": 0.01, "high": 1.0},
        "texture.patch_size": {"type": "choice", "values": [8, 16]},
        "texture.top_k": {"type": "int", "low": 2, "high": 8},
        "train.lr": {"type": "uniform", "low": 1e-4, "high": 1e-3},
    })
    from ray.tune.search.optuna import OptunaSearch

    # OptunaSearch's own conversion of the Tune domains is what the sweep samples from.
    assert OptunaSearch.convert_search_space(to_tune(space)) == to_optuna(space)


def test_sweep_yaml_errors(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"base": "demo", "search": {"train.lr": {"type": "uniform", "low": 1e-4,
                                                                               "high": 1e-3}}}))
    with pytest.raises(ConfigError, match="baseline: true needs loss.texture_weight"):
        load_sweep_config(path)
    path.write_text(yaml.safe_dump({"base": "demo", "samples": 3, "search": {}}))
    with pytest.raises(ConfigError, match="unknown sweep keys"):
        load_sweep_config(path)
    path.write_text(yaml.safe_dump({"base": "demo", "baseline": False, "overrides": ["train.nope=1"],
                                    "search": {"train.lr": {"type": "uniform", "low": 1e-4, "high": 1e-3}}}))
    with pytest.raises(ConfigError, match="nope"):
        load_sweep_config(path)


def _row(trial_id: str, lam: float, p: int, best: float, order: int, lr: float = 1e-3) -> TrialRow:
    return TrialRow(trial_id=trial_id, order=order, baseline=lam == 0, texture_weight=lam, patch_size=p,
                    params={TEXTURE_WEIGHT: lam, "texture.patch_size": p, "train.lr": lr}, best=best, final=best,
                    steps=10, status="completed", error=None, history_step=[10], history_metric=[best])


def test_table_says_whether_the_texture_term_helps():
    sweep = SweepConfig(search={TEXTURE_WEIGHT: Domain("loguniform", 0.01, 1.0)})
    rows = [_row("t_00000", 0.0, 16, 30.0, 0), _row("t_00001", 0.1, 8, 30.5, 1), _row("t_00002", 0.5, 16, 29.0, 2)]
    table = format_table(rows, sweep)
    assert "t_00000 (baseline)" in table
    assert "texture term beats the baseline at step 10" in table and "+0.5000" in table
    rows[1].best, rows[1].history_metric = 29.5, [29.5]
    assert "does not beat the baseline" in format_table(rows, sweep)


def test_baseline_comparison_uses_the_same_step_count():
    sweep = SweepConfig(search={TEXTURE_WEIGHT: Domain("loguniform", 0.01, 1.0)})
    base = _row("t_00000", 0.0, 16, 30.0, 0)
    base.history_step, base.history_metric = [20, 40, 60], [18.0, 25.0, 30.0]
    stopped = _row("t_00001", 0.1, 16, 18.5, 1)  # stopped by ASHA after its first validation
    stopped.history_step, stopped.history_metric = [20], [18.5]
    table = format_table([base, stopped], sweep)
    assert "beats the baseline at step 20: 18.5000" in table and "vs λ=0 18.0000" in table


def test_importance_ranks_the_key_that_moves_the_metric():
    space = {TEXTURE_WEIGHT: Domain("loguniform", 0.01, 1.0), "train.lr": Domain("uniform", 1e-4, 1e-3)}
    # PSNR rises with log λ; the learning rate is noise.
    rows = [_row(f"t_{i:05d}", lam, 16, 31.0 - 2 * math.log10(lam) * -1, i, lr)
            for i, (lam, lr) in enumerate([(0.01, 5e-4), (0.03, 2e-4), (0.1, 9e-4), (0.3, 4e-4), (1.0, 6e-4)])]
    importances, method = param_importances(rows, space, "max", seed=0)
    assert importances[TEXTURE_WEIGHT] > importances.get("train.lr", 0.0), (importances, method)
    assert math.isclose(sum(importances.values()), 1.0, rel_tol=1e-6)


def test_importance_falls_back_to_rank_correlation(monkeypatch):
    import optuna

    def unavailable(*args, **kwargs):
        raise ImportError("no evaluator")

    monkeypatch.setattr(optuna.importance, "get_param_importances", unavailable)
    space = {TEXTURE_WEIGHT: Domain("loguniform", 0.01, 1.0), "train.lr": Domain("uniform", 1e-4, 1e-3)}
    # PSNR rises monotonically with λ (|rho| = 1) and is unrelated to the learning rate's order.
    pairs = [(0.01, 5e-4), (0.03, 2e-4), (0.1, 9e-4), (0.3, 4e-4), (1.0, 6e-4)]
    rows = [_row(f"t_{i:05d}", lam, 16, 30.0 + i, i, lr) for i, (lam, lr) in enumerate(pairs)]
    importances, method = param_importances(rows, space, "max", seed=0)
    assert method == "|Spearman rank correlation|"
    assert importances[TEXTURE_WEIGHT] > importances["train.lr"]
    assert math.isclose(sum(importances.values()), 1.0, rel_tol=1e-6)


def test_baseline_first_keeps_lambda_zero_away_from_optuna():
    from ray.tune.search.optuna import OptunaSearch

    space = parse_search_space({TEXTURE_WEIGHT: {"type": "loguniform", "low": 0.01, "high": 1.0},
                                "texture.patch_size": {"type": "choice", "values": [16, 32]}})
    inner = OptunaSearch(space=to_tune(space), metric=VAL_PSNR_Y, mode="max", seed=0)
    searcher = BaselineFirst(inner, {TEXTURE_WEIGHT: 0.0})
    assert searcher.suggest("a") == {TEXTURE_WEIGHT: 0.0}
    proposal = searcher.suggest("b")
    assert 0.01 <= proposal[TEXTURE_WEIGHT] <= 1.0 and proposal["texture.patch_size"] in (16, 32)
    searcher.on_trial_result("a", {VAL_PSNR_Y: 30.0, "training_iteration": 1})
    searcher.on_trial_complete("a", {VAL_PSNR_Y: 30.0})
    searcher.on_trial_complete("b", {VAL_PSNR_Y: 29.0})
    # Optuna's study holds only the trial it proposed; the baseline never entered its TPE model.
    values = [t.params[TEXTURE_WEIGHT] for t in inner._ot_study.trials]
    assert values == [proposal[TEXTURE_WEIGHT]]
    # The wrapper's state travels through Tune's get_state/set_state: a restored sweep re-issues no baseline.
    fresh = BaselineFirst(inner, {TEXTURE_WEIGHT: 0.0})
    fresh.set_state(searcher.get_state())
    assert fresh.suggest("c")[TEXTURE_WEIGHT] > 0


def test_seeded_tpe_proposes_the_same_sweep():
    from ray.tune.search.optuna import OptunaSearch

    space = to_tune(parse_search_space({TEXTURE_WEIGHT: {"type": "loguniform", "low": 0.01, "high": 1.0}}))
    runs = []
    for _ in range(2):
        searcher = BaselineFirst(OptunaSearch(space=space, metric=VAL_PSNR_Y, mode="max", seed=3), None)
        runs.append([searcher.suggest(f"t{i}")[TEXTURE_WEIGHT] for i in range(3)])
    assert runs[0] == runs[1]


# ----- real sweeps: Ray Tune + Optuna + Ray Train on 2 CPUs -----

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


@pytest.fixture(scope="module")
def local_ray():
    """A fresh local Ray for this module: RAY_ADDRESS=local keeps ray.init() off other clusters on the host."""
    import ray

    old = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = "local"
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    yield
    ray.shutdown()
    if old is None:
        os.environ.pop("RAY_ADDRESS", None)
    else:
        os.environ["RAY_ADDRESS"] = old


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
    best = load_config(out / BEST_CONFIG_FILE)
    assert best.loss.texture_weight == summary.best.texture_weight
    assert best.model.embed_dim == 12  # the sweep's overrides are in it


@pytest.mark.integration
def test_sweep_interrupted_then_resumed_runs_baseline_and_exports(tmp_path, local_ray):
    """One sweep of 4 tiny trials, stopped by Ctrl-C after its first finished trial, then resumed to the end.

    One sweep instead of two keeps the file under ~4 minutes on 2 cores.
    """
    from ray.tune import Callback

    marker = tmp_path / "interrupted"

    class InterruptAfterFirstTrial(Callback):
        """Ctrl-C as a user would press it, once, when the first trial has finished.

        Tune saves the callbacks with the experiment and restores them, hence the marker file.
        """

        def on_trial_complete(self, iteration, trials, trial, **info):
            if not marker.exists():
                marker.touch()
                os.kill(os.getpid(), signal.SIGINT)

    sweep = _tiny_sweep(tmp_path, "tiny", num_samples=4)
    first = run_sweep(sweep, callbacks=[InterruptAfterFirstTrial()])
    done_before = {r.trial_id for r in first.rows if r.status in ("completed", "stopped early")}
    assert 1 <= len(done_before) < sweep.num_samples and not first.finished, [r.status for r in first.rows]
    with pytest.raises(UserError, match="already exists"):
        run_sweep(sweep)
    resumed = run_sweep(sweep, resume=True)
    assert resumed.finished
    assert done_before <= {r.trial_id for r in resumed.rows}
    _check_outputs(resumed, sweep)
