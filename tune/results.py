"""A finished (or interrupted) sweep's results: the trials table, Parquet, the best config, the baseline verdict.

Everything here works on :class:`TrialRow` objects, built once from Tune's ``ResultGrid`` by
:func:`collect_trials`, so the table, the plots and the comparison with the λ = 0 baseline are testable
without Ray. Files are written beside themselves and moved into place when complete
(:func:`xswinir.atomic.atomic_path`): an interrupted export never leaves half a ``trials.parquet``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xswinir.atomic import atomic_path
from xswinir.config import Config, apply_overrides
from xswinir.tune.sweep_config import PATCH_SIZE, TEXTURE_WEIGHT, SweepConfig

TRIALS_FILE = "trials.parquet"
BEST_CONFIG_FILE = "best_config.yaml"


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
    # Tune's own trial states tell an unfinished trial (an interrupted sweep) from one ASHA stopped.
    analysis = getattr(grid, "_experiment_analysis", None)
    states = {t.trial_id: t.status for t in getattr(analysis, "trials", None) or []}
    # Tune marks the trials it stops at a Ctrl-C as terminated, like those ASHA stops; fewer trials than
    # asked for tells an interrupted sweep apart.
    interrupted = len(grid) < sweep.num_samples
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
        elif states.get(trial_id, "TERMINATED") != "TERMINATED" or not steps_hist or (
                interrupted and steps < base.train.total_steps):
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
    # The ResultGrid lists trials in the order Tune created them (also after a restore).
    for i, row in enumerate(rows):
        row.order = i
    return rows


def best_row(rows: list[TrialRow], mode: str) -> TrialRow | None:
    scored = [r for r in rows if r.best is not None]
    if not scored:
        return None
    return max(scored, key=lambda r: r.best if mode == "max" else -r.best)


def write_trials_parquet(rows: list[TrialRow], sweep: SweepConfig, path: Path) -> Path:
    """All trials as a Parquet table: one column per searched key, the metric's best/final, status, history."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    metric = sweep.metric
    columns: dict[str, list] = {
        "trial_id": [r.trial_id for r in rows], "order": [r.order for r in rows],
        "baseline": [r.baseline for r in rows],
        TEXTURE_WEIGHT: [r.texture_weight for r in rows], PATCH_SIZE: [r.patch_size for r in rows],
    }
    for key in sweep.search:
        if key not in columns:
            columns[key] = [r.params.get(key) for r in rows]
    columns.update({
        f"best {metric}": [r.best for r in rows], f"final {metric}": [r.final for r in rows],
        "steps": [r.steps for r in rows], "status": [r.status for r in rows], "error": [r.error for r in rows],
        "history_step": [r.history_step for r in rows], f"history {metric}": [r.history_metric for r in rows],
    })
    table = pa.table(columns)
    table = table.replace_schema_metadata({"sweep": sweep.name, "metric": metric, "mode": sweep.mode})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


def write_best_config(row: TrialRow, sweep: SweepConfig, base: Config, path: Path) -> Path:
    """The best trial's full training config, loadable by ``xswinir train --config``."""
    cfg = apply_overrides(base, {**row.params, "run.name": f"{sweep.name}_best"})
    header = (
        f"# Best trial of sweep '{sweep.name}': {row.trial_id}, best {sweep.metric} = {row.best:.4f} after "
        f"{row.steps} steps.\n# Sampled: {row.params}\n# Train it: xswinir train --config {path}\n"
    )
    with atomic_path(path) as tmp:
        tmp.write_text(header + cfg.to_yaml())
    return path


def format_table(rows: list[TrialRow], sweep: SweepConfig) -> str:
    """The end-of-sweep table: trial, λ, p, best metric, steps, status; then the baseline comparison."""
    header = f"{'trial':<22} {'λ':>9} {'p':>4} {'best ' + sweep.metric:>17} {'steps':>6}  status"
    lines = [header, "-" * len(header)]
    for r in rows:
        best = f"{r.best:.4f}" if r.best is not None else "-"
        name = r.trial_id + (" (baseline)" if r.baseline else "")
        lines.append(f"{name:<22} {r.texture_weight:>9.4g} {r.patch_size:>4} {best:>17} {r.steps:>6}  {r.status}")
    lines.extend(baseline_comparison(rows, sweep))
    return "\n".join(lines)


def _metric_at(row: TrialRow, step: int) -> float | None:
    values = [m for s, m in zip(row.history_step, row.history_metric, strict=True) if s <= step]
    return values[-1] if values else None


def baseline_comparison(rows: list[TrialRow], sweep: SweepConfig) -> list[str]:
    """Whether the texture term helped: each side at the same step count, since ASHA stops trials early."""
    base = next((r for r in rows if r.baseline and r.history_step), None)
    if base is None:
        return []
    sign = 1.0 if sweep.mode == "max" else -1.0
    pairs = []
    for r in rows:
        if r.baseline or not r.history_step:
            continue
        step = min(r.history_step[-1], base.history_step[-1])
        ours, theirs = _metric_at(r, step), _metric_at(base, step)
        if ours is not None and theirs is not None:
            pairs.append((sign * (ours - theirs), step, ours, theirs, r))
    if not pairs:
        return []
    gain, step, ours, theirs, r = max(pairs, key=lambda p: (p[1], p[0]))
    verdict = "beats" if gain > 0 else "does not beat"
    return [
        f"texture term {verdict} the baseline at step {step}: {ours:.4f} (λ={r.texture_weight:.4g}, "
        f"p={r.patch_size}) vs λ=0 {theirs:.4f} ({sign * gain:+.4f}), the longest-running texture trial compared "
        "with the baseline at the same step; one run each, so gaps within seed-to-seed noise (rerun with other "
        "train.seed values) mean nothing"
    ]


@dataclass
class SweepSummary:
    rows: list[TrialRow]
    best: TrialRow | None
    experiment_path: str
    files: dict[str, Path]
    num_samples: int

    @property
    def finished(self) -> bool:
        """False after an interruption (Ctrl-C): fewer trials than asked, or some still unfinished."""
        return len(self.rows) >= self.num_samples and all(r.status != "unfinished" for r in self.rows)


def export_results(grid, sweep: SweepConfig, base: Config, out_dir: Path) -> SweepSummary:
    """Writes trials.parquet, the plots and best_config.yaml of a Tune ``ResultGrid`` into ``out_dir``."""
    return write_exports(collect_trials(grid, sweep, base), sweep, base, out_dir)


def write_exports(rows: list[TrialRow], sweep: SweepConfig, base: Config, out_dir: Path) -> SweepSummary:
    """Writes trials.parquet, the plots and best_config.yaml of these trials into ``out_dir``."""
    from xswinir.tune.plots import plot_results

    files = {"trials": write_trials_parquet(rows, sweep, out_dir / TRIALS_FILE)}
    for p in plot_results(rows, sweep, out_dir):
        files[p.stem] = p
    best = best_row(rows, sweep.mode)
    if best is not None:
        files["best_config"] = write_best_config(best, sweep, base, out_dir / BEST_CONFIG_FILE)
    return SweepSummary(rows=rows, best=best, experiment_path=sweep.experiment_path(), files=files,
                        num_samples=sweep.num_samples)


