"""Sweeps without Ray: search spaces, the sweep YAML, the results table, importances, the searcher wrapper,
the resume manifest and the packaging of tune/ (the real Ray sweep: tests/integration/test_sweep_ray.py)."""

from __future__ import annotations

import math
import pickle
import shutil
from pathlib import Path

import pytest
import yaml

from xswinir.config import ConfigError, config_fields, load_config
from xswinir.metrics import VAL_PSNR_Y
from xswinir.tune.manifest import SIGNATURE_FILE, ResumeRefused, verify_signature, write_signature
from xswinir.tune.plots import param_importances
from xswinir.tune.results import format_table
from xswinir.tune.search_space import Domain, check_search_space, parse_search_space, to_optuna, to_tune
from xswinir.tune.sweep import BaselineFirst
from xswinir.tune.sweep_config import TEXTURE_WEIGHT, SweepConfig, load_sweep_config
from xswinir.tune.trials import TrialRow

REPO = Path(__file__).resolve().parents[1]


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
    with pytest.raises(ConfigError, match="unknown config key 'samples'; did you mean 'num_samples'"):
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


def test_sweep_metrics_are_what_validation_reports():
    """The metrics a sweep accepts are keys of the dict train_loop_per_worker reports at every validation."""
    import torch

    from xswinir.config import MODEL_PRESETS
    from xswinir.evaluation import ValidationSet, validate
    from xswinir.model import build_swinir
    from xswinir.tune.sweep_config import SWEEP_METRICS

    gt = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    val = ValidationSet(["a"], [gt], [torch.nn.functional.avg_pool2d(gt, 2)])
    reported = validate(build_swinir(MODEL_PRESETS["tiny-x2"]), val, scale=2, tile=None)
    assert set(SWEEP_METRICS) <= set(reported)


def test_tune_folder_installs_as_xswinir_tune_only():
    """pyproject maps tune/ to xswinir.tune and lists every package: no top-level `tune`, nothing left out."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["package-dir"] == {"xswinir.tune": "tune"}
    on_disk = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "xswinir").rglob("__init__.py")}
    assert set(setuptools["packages"]) == on_disk | {"xswinir.tune"}
    import xswinir.tune.sweep

    assert Path(xswinir.tune.sweep.__file__).parent == REPO / "tune"


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


def test_manifest_accepts_the_saved_sweep_and_refuses_every_change(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv("XSWINIR_SWEEP_KEY", raising=False)
    exp = _saved_experiment(tmp_path / "sweeps" / "s")
    verify_signature(str(exp))  # as saved: accepted
    assert (tmp_path / "config" / "xswinir" / "sweep.key").stat().st_mode & 0o077 == 0
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


def test_resume_of_a_tampered_sweep_is_refused_before_ray_or_unpickling(tmp_path, monkeypatch, capsys):
    import ray

    from xswinir.cli import main

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv("XSWINIR_SWEEP_KEY", raising=False)
    exp = _saved_experiment(tmp_path / "sweeps" / "sweep_demo")
    marker = tmp_path / "pwned"
    (exp / "tuner.pkl").write_bytes(pickle.dumps(_Boom(marker)))
    code = main(["tune", "--config", "sweep_demo", "--storage", str(tmp_path / "sweeps"), "--resume"])
    err = capsys.readouterr().err
    assert code == 2 and "refusing to resume" in err and "tuner.pkl" in err and len(err.strip().splitlines()) == 1
    assert not marker.exists() and not ray.is_initialized()


def test_exports_are_complete_files_and_best_config_trains(tmp_path):
    import pyarrow.parquet as pq

    from xswinir.tune.results import BEST_CONFIG_FILE, TRIALS_FILE, write_exports

    sweep = SweepConfig(name="s", storage=str(tmp_path), search={
        TEXTURE_WEIGHT: Domain("loguniform", 0.01, 1.0), "texture.patch_size": Domain("choice", values=(16, 32)),
        "train.lr": Domain("uniform", 1e-4, 1e-3)})
    # One texture trial: importance.png says "too few trials" instead of fitting fANOVA's forest (seconds).
    rows = [_row("t_00000", 0.0, 16, 30.0, 0), _row("t_00001", 0.1, 32, 30.5, 1, lr=2e-4)]
    summary = write_exports(rows, sweep, load_config("demo"), tmp_path / "s")
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == sorted(
        [TRIALS_FILE, BEST_CONFIG_FILE, "history.png", "lambda_psnr.png", "importance.png"])  # no temporaries
    table = pq.read_table(tmp_path / "s" / TRIALS_FILE).to_pylist()
    assert [r["trial_id"] for r in table] == ["t_00000", "t_00001"] and table[0]["baseline"]
    best = load_config(summary.files["best_config"])
    assert summary.best.trial_id == "t_00001" and best.loss.texture_weight == 0.1 and best.texture.patch_size == 32
