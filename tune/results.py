"""A finished (or interrupted) sweep's results: the trials table, Parquet, the best config, the baseline verdict.

Everything here works on :class:`xswinir.tune.trials.TrialRow` objects, built once from Tune's ``ResultGrid``
by :func:`xswinir.tune.trials.collect_trials`, so the table, the plots and the comparison with the λ = 0
baseline are testable without Ray. :func:`write_exports` writes the files and the plots
(:mod:`xswinir.tune.plots`); each is written beside itself and moved into place when complete
(:func:`xswinir.atomic.atomic_path`): an interrupted export never leaves half a ``trials.parquet``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from xswinir.atomic import atomic_path
from xswinir.config import Config, apply_overrides
from xswinir.tune.plots import plot_results
from xswinir.tune.sweep_config import PATCH_SIZE, TEXTURE_WEIGHT, SweepConfig
from xswinir.tune.trials import TrialRow, best_row, collect_trials

TRIALS_FILE = "trials.parquet"
BEST_CONFIG_FILE = "best_config.yaml"


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
    files = {"trials": write_trials_parquet(rows, sweep, out_dir / TRIALS_FILE)}
    for p in plot_results(rows, sweep, out_dir):
        files[p.stem] = p
    best = best_row(rows, sweep.mode)
    if best is not None:
        files["best_config"] = write_best_config(best, sweep, base, out_dir / BEST_CONFIG_FILE)
    return SweepSummary(rows=rows, best=best, experiment_path=sweep.experiment_path(), files=files,
                        num_samples=sweep.num_samples)


