"""A sweep's results from its trial rows, without Ray: the end-of-sweep table, the verdict against the λ = 0
baseline, and the exported files."""

from __future__ import annotations

import pyarrow.parquet as pq

from xswinir.config import load_config
from xswinir.tune.results import BEST_CONFIG_FILE, TRIALS_FILE, format_table, write_exports
from xswinir.tune.search_space import Domain
from xswinir.tune.sweep_config import TEXTURE_WEIGHT, SweepConfig
from xswinir.tune.trials import TrialRow


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


def test_exports_are_complete_files_and_best_config_trains(tmp_path):
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
