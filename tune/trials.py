"""The trials of a sweep as plain rows: one :class:`TrialRow` per trial, read once from Tune's ``ResultGrid``.

Everything after (the table, Parquet, the plots, the baseline verdict) works on these rows, so it is
testable without Ray.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xswinir.config import Config, apply_overrides
from xswinir.tune.sweep_config import TEXTURE_WEIGHT, SweepConfig


@dataclass
class TrialRow:
    """One trial's outcome, a row of ``trials.parquet``."""

    trial_id: str
    order: int  # 0 = the first trial started
    baseline: bool
    texture_weight: float
    patch_size: int
    params: dict[str, Any]  # the sampled values by dotted key (the baseline: {loss.texture_weight: 0})
    best: float | None  # best reported metric
    final: float | None
    steps: int
    status: str  # completed | stopped early (ASHA) | error | unfinished (the sweep was interrupted)
    error: str | None
    history_step: list[int]
    history_metric: list[float]


def collect_trials(grid, sweep: SweepConfig, base: Config) -> list[TrialRow]:
    """Rows from a Tune ``ResultGrid``, in the order the trials were created (the baseline first)."""
    rows = []
    # Tune's own trial states tell an unfinished trial (an interrupted sweep) from one ASHA stopped: the grid
    # is the saved experiment state (xswinir.tune.launch.saved_results), where a trial the Ctrl-C cut short
    # is not TERMINATED.
    analysis = getattr(grid, "_experiment_analysis", None)
    states = {t.trial_id: t.status for t in getattr(analysis, "trials", None) or []}
    for result in grid:
        trial_id = Path(result.path).name
        df = result.metrics_dataframe
        steps_hist: list[int] = []
        metric_hist: list[float] = []
        if df is not None and sweep.metric in df.columns:
            df = df.dropna(subset=[sweep.metric])
            metric_hist = [float(v) for v in df[sweep.metric]]
            steps_hist = [int(v) for v in df["step"]] if "step" in df.columns else list(range(1, len(df) + 1))
        params = {k: v for k, v in (result.config or {}).items() if k in sweep.search or k == TEXTURE_WEIGHT}
        cfg = apply_overrides(base, params)
        finite = [v for v in metric_hist if math.isfinite(v)]
        best = (max(finite) if sweep.mode == "max" else min(finite)) if finite else None
        steps = steps_hist[-1] if steps_hist else 0
        if result.error is not None:
            status = "error"
        elif states.get(trial_id, "TERMINATED") != "TERMINATED" or not steps_hist:
            status = "unfinished"
        elif steps < base.train.total_steps:
            status = "stopped early"
        else:
            status = "completed"
        rows.append(TrialRow(
            trial_id=trial_id, order=0, baseline=not cfg.texture_enabled and sweep.baseline,
            texture_weight=cfg.loss.texture_weight, patch_size=cfg.texture.patch_size, params=params,
            best=best, final=metric_hist[-1] if metric_hist else None, steps=steps, status=status,
            error=str(result.error).splitlines()[0][:300] if result.error is not None else None,
            history_step=steps_hist, history_metric=metric_hist,
        ))
    # BaselineFirst creates the baseline before any other trial, so it is order 0 by construction. The others
    # keep the ResultGrid's order: Tune's creation order, except after a restore, where Ray may list them
    # otherwise (seen 2026-12-06: the restored grid listed a searched trial before the baseline).
    rows.sort(key=lambda row: not row.baseline)  # stable
    for i, row in enumerate(rows):
        row.order = i
    return rows


def best_row(rows: list[TrialRow], mode: str) -> TrialRow | None:
    scored = [r for r in rows if r.best is not None]
    if not scored:
        return None
    return max(scored, key=lambda r: r.best if mode == "max" else -r.best)
