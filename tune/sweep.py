"""A Ray Tune sweep over training configs: Optuna TPE proposes, ASHA stops the weak, Ray Train trains.

One trial is one ``xswinir train`` run (possibly multi-worker, ``run.num_workers``): a Tune *function*
trainable builds the trial's config from the base config, the sweep's overrides and the sampled values,
and calls :func:`xswinir.trainer.fit` with Tune's ``TuneReportCallback`` (the Ray Train V2 pattern; passing
a ``TorchTrainer`` to the ``Tuner`` is refused under V2). The trainable itself asks for 0.01 CPU, so the
CPUs go to the Train workers.

The λ = 0 baseline. ``loss.texture_weight`` is searched log-uniformly, and 0 lies outside that domain.
Enqueuing λ = 0 in Optuna (``OptunaSearch(points_to_evaluate=...)``) fails at the first suggestion (Optuna
5.0: "`0.0` is invalid value for the case log=True"); a searched on/off switch instead would let TPE spend
trials on repeated baselines. So the baseline never reaches Optuna:
:class:`BaselineFirst` hands out the baseline as the sweep's first trial and forwards only the other trials
to ``OptunaSearch``, whose TPE model thus sees only the domain it samples. The baseline counts toward
``num_samples``; every sweep reports whether the texture term beats it.

Outputs, in ``<storage>/<name>/``: Tune's experiment state (for ``--resume``), ``train/<trial_id>/`` (each
trial's Ray Train run with checkpoints), ``classifiers/`` (texture classifiers shared by the trials),
``trials.parquet``, ``history.png``, ``lambda_psnr.png``, ``importance.png``, ``best_config.yaml``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ray.tune.search import Searcher

from tune.search_space import Domain, check_search_space, parse_search_space, to_optuna, to_tune
from xswinir.config import Config, ConfigError, apply_overrides, load_config, read_yaml_mapping, resolve_config_path
from xswinir.errors import UserError
from xswinir.metrics import VAL_PSNR_Y

log = logging.getLogger(__name__)

TEXTURE_WEIGHT = "loss.texture_weight"
PATCH_SIZE = "texture.patch_size"
TRIALS_FILE = "trials.parquet"
BEST_CONFIG_FILE = "best_config.yaml"
PLOT_FILES = ("history.png", "lambda_psnr.png", "importance.png")


@dataclass
class SchedulerConfig:
    """ASHA early stopping on the sweep's metric; times are optimizer steps (the trainer reports ``step``)."""

    type: Literal["asha", "none"] = "asha"
    grace_period: int = 100  # steps every trial runs before it may be stopped
    reduction_factor: int = 2  # keep the best 1/reduction_factor at every rung


@dataclass
class SweepConfig:
    """A sweep: a base training config, fixed overrides, a search space and how to search it."""

    name: str = "sweep"
    base: str = "demo"  # a shipped training config's name or a YAML path
    overrides: list[str] = field(default_factory=list)  # `section.key=value`, applied to base before sampling
    search: dict[str, Domain] = field(default_factory=dict)
    num_samples: int = 8  # trials in all, the baseline included
    max_concurrent: int = 2
    seed: int = 0
    metric: str = VAL_PSNR_Y
    mode: Literal["max", "min"] = "max"
    baseline: bool = True  # evaluate loss.texture_weight=0 as the first trial
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    storage: str = "outputs/sweeps"  # local folder or URI; the sweep lands in <storage>/<name>
    address: str | None = None  # Ray cluster to join; None: local Ray (or the job's cluster)
    max_failures: int = 0  # retries of a failed trial

    def __post_init__(self) -> None:
        if self.num_samples < 1 or self.max_concurrent < 1:
            raise ConfigError("num_samples and max_concurrent must be >= 1")
        if self.baseline and TEXTURE_WEIGHT not in self.search:
            raise ConfigError(f"baseline: true needs {TEXTURE_WEIGHT} in the search space (it compares against λ=0)")

    def base_config(self) -> Config:
        """The training config every trial starts from: ``base`` + ``overrides``, validated."""
        return load_config(self.base, list(self.overrides))

    def experiment_path(self) -> str:
        if "://" in self.storage:
            return f"{self.storage.rstrip('/')}/{self.name}"
        return str(Path(self.storage).expanduser().resolve() / self.name)


_SWEEP_KEYS = {f.name for f in dataclasses.fields(SweepConfig)}


def load_sweep_config(path: str | Path, extra_overrides: list[str] | None = None, **changes: Any) -> SweepConfig:
    """Reads a sweep YAML (a path or a shipped config's name) and checks its search space against the config.

    Args:
        path: the YAML file, or the name of one in ``xswinir/configs`` (``sweep_demo``).
        extra_overrides: ``section.key=value`` appended to the YAML's ``overrides`` (the CLI's ``--set``).
        changes: top-level fields to replace (``storage``, ``num_samples``, ``address``) where not None.

    Raises:
        ConfigError: unknown keys, bad domains, or domain values that make an invalid training config.
    """
    file = resolve_config_path(path)
    data = read_yaml_mapping(file)
    unknown = set(data) - _SWEEP_KEYS
    if unknown:
        raise ConfigError(f"{file}: unknown sweep keys {sorted(unknown)}; known: {sorted(_SWEEP_KEYS)}")
    data["search"] = parse_search_space(data.get("search") or {})
    overrides = data.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise ConfigError(f"{file}: overrides must be a list of 'section.key=value' strings")
    data["overrides"] = [*overrides, *(extra_overrides or [])]
    scheduler = data.get("scheduler") or {}
    if not isinstance(scheduler, dict) or set(scheduler) - {f.name for f in dataclasses.fields(SchedulerConfig)}:
        raise ConfigError(f"{file}: scheduler takes type, grace_period, reduction_factor; got {scheduler!r}")
    data["scheduler"] = SchedulerConfig(**scheduler)
    data.update({k: v for k, v in changes.items() if v is not None})
    if isinstance(data.get("base"), str) and not Path(data["base"]).is_absolute():
        # A base given as a path is relative to the sweep file, like an include.
        beside = file.parent / data["base"]
        if beside.is_file():
            data["base"] = str(beside)
    try:
        sweep = SweepConfig(**data)
    except TypeError as err:
        raise ConfigError(f"{file}: {err}") from err
    base = sweep.base_config()
    check_search_space(base, sweep.search)
    if sweep.baseline:
        apply_overrides(base, {TEXTURE_WEIGHT: 0.0})
    return sweep


def trial_config(base: Config, sampled: dict[str, Any], trial_id: str, train_storage: str) -> Config:
    """The training config of one trial: the base, the sampled values, and a run named by the trial id."""
    cfg = apply_overrides(base, sampled)
    run = {"run.name": trial_id, "run.storage": train_storage, "run.address": None}
    if "progress" in {f.name for f in dataclasses.fields(cfg.run)}:
        run["run.progress"] = False  # a trial's log is a file; the sweep prints its own table
    return apply_overrides(cfg, run)


def train_trial(config: dict[str, Any], base: dict[str, Any], train_storage: str, classifier_cache: str) -> None:
    """Tune function trainable: one Ray Train run with the sampled values; metrics flow to Tune per report.

    Args:
        config: the sampled values by dotted key (``{"loss.texture_weight": 0.03, "texture.patch_size": 8}``).
        base: the base training config as a dict.
        train_storage: where the trials' Ray Train runs live (``<experiment>/train``).
        classifier_cache: shared texture-classifier cache, so trials with the same patch size train it once.
    """
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from xswinir.trainer import fit, run_exists

    # The trial id is stable across a sweep's restore, so a resumed trial continues its own Train run.
    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(Config.from_dict(base), config, trial_id, train_storage)
    resumed = run_exists(cfg.run)
    result = fit(cfg, resume=resumed, callbacks=[TuneReportCallback()], classifier_cache=Path(classifier_cache))
    if resumed and result.metrics:
        # A sweep interrupted after a trial's Train run had finished, but before Tune recorded it, resumes into a
        # run with nothing left to train: fit reports nothing, and Tune refuses a final result without the
        # metric. Report the latest checkpoint's metrics again (a repeat at the same step is harmless).
        tune.report(dict(result.metrics))


def trial_dirname(trial) -> str:
    """Trial folders named by trial id (not by sampled values, which make long, unreadable names)."""
    return trial.trial_id


class BaselineFirst(Searcher):
    """Suggests ``baseline`` as the first trial, then defers to ``searcher``, which never hears of it.

    See the module docstring for why the λ = 0 baseline must stay outside Optuna.
    """

    def __init__(self, searcher: Searcher, baseline: dict[str, Any] | None):
        self.searcher = searcher
        self.baseline = baseline
        self.baseline_trial: str | None = None
        super().__init__(metric=searcher.metric, mode=searcher.mode)

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        ok = self.searcher.set_search_properties(metric, mode, config, **spec)
        self._metric, self._mode = self.searcher.metric, self.searcher.mode
        return ok

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        return False  # let ConcurrencyLimiter count the baseline too

    def suggest(self, trial_id: str) -> dict | None:
        if self.baseline is not None and self.baseline_trial is None:
            self.baseline_trial = trial_id
            return dict(self.baseline)
        return self.searcher.suggest(trial_id)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id != self.baseline_trial:
            self.searcher.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id != self.baseline_trial:
            self.searcher.on_trial_complete(trial_id, result=result, error=error)

    # Tune saves wrappers (objects with a `.searcher`) through get_state/set_state and the innermost
    # searcher (Optuna's study) through its own save_to_dir.
    def get_state(self) -> dict:
        return {"baseline": self.baseline, "baseline_trial": self.baseline_trial}

    def set_state(self, state: dict) -> None:
        self.baseline, self.baseline_trial = state["baseline"], state["baseline_trial"]



def build_search_alg(sweep: SweepConfig):
    """``ConcurrencyLimiter(BaselineFirst(OptunaSearch(TPE, seeded)))``."""
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    optuna_search = OptunaSearch(space=to_tune(sweep.search), metric=sweep.metric, mode=sweep.mode, seed=sweep.seed)
    baseline = {TEXTURE_WEIGHT: 0.0} if sweep.baseline else None
    return ConcurrencyLimiter(BaselineFirst(optuna_search, baseline), max_concurrent=sweep.max_concurrent)


def _classifier_cache(sweep: SweepConfig) -> str:
    if "://" in sweep.storage:
        # ensure_texture_classifier wants a local folder; each node trains or reuses its own copy.
        return str(Path(tempfile.gettempdir(), "xswinir_classifiers", sweep.name))
    return str(Path(sweep.experiment_path()) / "classifiers")


def absolute_local_paths(cfg: Config) -> Config:
    """Local data and classifier paths as absolute ones: a trial may run in another working directory."""
    from xswinir.images import absolute_source

    changes: dict[str, Any] = {}
    for key, value in (("data.train", cfg.data.train), ("data.val", cfg.data.val),
                       ("texture.classifier.path", cfg.texture.classifier.path)):
        if value and absolute_source(value) != value:
            changes[key] = absolute_source(value)
    return apply_overrides(cfg, changes) if changes else cfg


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
            trial_id=trial_id, order=0, baseline=cfg.loss.texture_weight == 0 and sweep.baseline,
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
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def param_importances(rows: list[TrialRow], space: dict[str, Domain], mode: str, seed: int) -> tuple[dict, str]:
    """Importance of each searched key for the metric, over the non-baseline trials.

    Optuna's default evaluator (fANOVA, a random forest over the params) on a study rebuilt from the trials.
    If that fails: |Spearman rank correlation| of each key (log scale for loguniform) with the metric,
    normalised to sum 1. With a handful of trials either is a hint, not a measurement.

    Returns:
        Importances by key and the name of the method used.
    """
    import numpy as np

    scored = [r for r in rows if not r.baseline and r.best is not None and all(k in r.params for k in space)]
    varying = {k: d for k, d in space.items() if len({repr(r.params[k]) for r in scored}) > 1}
    if len(scored) < 2 or not varying:
        return {}, "too few trials"
    try:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(direction="maximize" if mode == "max" else "minimize")
        dists = to_optuna(space)
        for r in scored:
            study.add_trial(optuna.trial.create_trial(params={k: r.params[k] for k in space}, distributions=dists,
                                                      value=r.best))
        return dict(optuna.importance.get_param_importances(study)), "Optuna fANOVA"
    except Exception as err:  # e.g. a domain Optuna's evaluator does not take
        log.debug("Optuna importance unavailable (%s); using rank correlation", err)
    from tune.search_space import numeric_position

    values = np.array([r.best for r in scored])
    out = {}
    for key, domain in varying.items():
        x = np.array([numeric_position(domain, r.params[key]) for r in scored])
        rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(values))
        corr = np.corrcoef(rx, ry)[0, 1] if rx.std() > 0 and ry.std() > 0 else 0.0
        out[key] = abs(float(np.nan_to_num(corr)))
    total = sum(out.values())
    return ({k: v / total for k, v in out.items()} if total > 0 else out), "|Spearman rank correlation|"


def plot_results(rows: list[TrialRow], sweep: SweepConfig, out_dir: Path) -> list[Path]:
    """history.png (metric per trial and running best), lambda_psnr.png (λ vs metric per patch size, the
    baseline as a horizontal line), importance.png (per searched key)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    metric = sweep.metric
    paths = [out_dir / name for name in PLOT_FILES]
    scored = [r for r in rows if r.best is not None]
    better = max if sweep.mode == "max" else min

    fig, ax = plt.subplots(figsize=(6, 4))
    running, best_so_far = [], None
    for r in scored:
        best_so_far = r.best if best_so_far is None else better(best_so_far, r.best)
        running.append(best_so_far)
    ax.scatter([r.order for r in scored if not r.baseline], [r.best for r in scored if not r.baseline],
               label="trial", color="tab:blue")
    ax.scatter([r.order for r in scored if r.baseline], [r.best for r in scored if r.baseline],
               label="baseline λ=0", color="black", marker="s")
    ax.step([r.order for r in scored], running, where="post", color="tab:orange", label="best so far")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial (creation order)")
    ax.set_ylabel(f"best {metric}")
    ax.set_title(f"{sweep.name}: optimisation history")
    ax.legend()
    fig.tight_layout()
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for p in sorted({r.patch_size for r in scored if not r.baseline}):
        series = sorted((r for r in scored if not r.baseline and r.patch_size == p), key=lambda r: r.texture_weight)
        line, = ax.plot([r.texture_weight for r in series], [r.best for r in series], label=f"p = {p}")
        # Trials ASHA stopped were validated after fewer steps: hollow markers, not comparable one to one.
        for r in series:
            full = r.status == "completed"
            ax.plot(r.texture_weight, r.best, marker="o", color=line.get_color(),
                    markerfacecolor=line.get_color() if full else "none")
    if any(r.status == "stopped early" for r in scored):
        ax.plot([], [], marker="o", color="gray", markerfacecolor="none", linestyle="none",
                label="stopped early (ASHA)")
    for r in scored:
        if r.baseline:
            ax.axhline(r.best, color="black", linestyle="--", label=f"baseline λ=0 ({r.best:.2f})")
    ax.set_xscale("log")
    ax.set_xlabel("λ (loss.texture_weight)")
    ax.set_ylabel(f"best {metric}")
    ax.set_title(f"{sweep.name}: texture weight against {metric}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)

    importances, method = param_importances(rows, sweep.search, sweep.mode, sweep.seed)
    fig, ax = plt.subplots(figsize=(6, 3))
    if importances:
        keys = sorted(importances, key=importances.get)
        ax.barh(keys, [importances[k] for k in keys], color="tab:green")
        ax.set_xlabel("importance")
    else:
        ax.text(0.5, 0.5, f"no importances: {method}", ha="center", va="center")
        ax.set_axis_off()
    num_scored = len([r for r in rows if not r.baseline and r.best is not None])
    ax.set_title(f"{sweep.name}: parameter importance ({method}, {num_scored} trials)")
    fig.tight_layout()
    fig.savefig(paths[2], dpi=120)
    plt.close(fig)
    return paths


def write_best_config(row: TrialRow, sweep: SweepConfig, base: Config, path: Path) -> Path:
    """The best trial's full training config, loadable by ``xswinir train --config``."""
    cfg = apply_overrides(base, {**row.params, "run.name": f"{sweep.name}_best"})
    header = (
        f"# Best trial of sweep '{sweep.name}': {row.trial_id}, best {sweep.metric} = {row.best:.4f} after "
        f"{row.steps} steps.\n# Sampled: {row.params}\n# Train it: xswinir train --config {path}\n"
    )
    path.write_text(header + cfg.to_yaml())
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
    """Writes trials.parquet, the plots and best_config.yaml into ``out_dir``."""
    rows = collect_trials(grid, sweep, base)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"trials": write_trials_parquet(rows, sweep, out_dir / TRIALS_FILE)}
    for p in plot_results(rows, sweep, out_dir):
        files[p.stem] = p
    best = best_row(rows, sweep.mode)
    if best is not None:
        files["best_config"] = write_best_config(best, sweep, base, out_dir / BEST_CONFIG_FILE)
    return SweepSummary(rows=rows, best=best, experiment_path=sweep.experiment_path(), files=files,
                        num_samples=sweep.num_samples)


def run_sweep(sweep: SweepConfig, resume: bool = False, callbacks: list | None = None) -> SweepSummary:
    """Runs (or with ``resume``, continues) the sweep and exports its results.

    Args:
        sweep: the sweep; ``sweep.address`` picks the cluster.
        resume: continue the experiment in ``<storage>/<name>`` (finished trials stay, errored ones rerun).
        callbacks: extra Tune callbacks (the tests use one to interrupt a sweep); Tune saves them with the
            experiment, and a resumed sweep runs them again.

    Raises:
        UserError: the sweep exists and ``resume`` is False, or there is nothing to resume.
    """
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from xswinir.trainer import init_ray

    base = absolute_local_paths(sweep.base_config())
    exp_path = sweep.experiment_path()
    local = "://" not in exp_path
    can_restore = tune.Tuner.can_restore(exp_path) if (not local or Path(exp_path).is_dir()) else False
    if resume and not can_restore:
        raise UserError(f"nothing to resume: no sweep '{sweep.name}' in {sweep.storage}")
    if not resume and can_restore:
        raise UserError(f"sweep '{sweep.name}' already exists in {sweep.storage}: pass --resume to continue it, "
                        "or choose another name")
    # Concurrent trials start their Train workers (each importing torch) at the same moment; on a small,
    # busy machine that overruns Ray Train's default 60 s and the trial fails. Inherited by a local cluster.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "180")
    init_ray(dataclasses.replace(base.run, address=sweep.address))
    trainable = tune.with_resources(
        tune.with_parameters(
            train_trial, base=base.to_dict(), train_storage=f"{exp_path}/train",
            classifier_cache=_classifier_cache(sweep),
        ),
        # The trial function only drives its TorchTrainer; a whole CPU each would starve the Train workers.
        {"cpu": 0.01},
    )
    if resume:
        log.info("resuming sweep %s", exp_path)
        tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_errored=True)
    else:
        scheduler = (
            ASHAScheduler(time_attr="step", max_t=base.train.total_steps, grace_period=sweep.scheduler.grace_period,
                          reduction_factor=sweep.scheduler.reduction_factor)
            if sweep.scheduler.type == "asha" else FIFOScheduler()
        )
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                metric=sweep.metric, mode=sweep.mode, search_alg=build_search_alg(sweep), scheduler=scheduler,
                num_samples=sweep.num_samples, trial_name_creator=trial_dirname, trial_dirname_creator=trial_dirname,
            ),
            run_config=tune.RunConfig(
                name=sweep.name, storage_path=str(Path(exp_path).parent) if local else exp_path.rsplit("/", 1)[0],
                failure_config=tune.FailureConfig(max_failures=sweep.max_failures), callbacks=callbacks,
                verbose=1,
            ),
        )
    grid = tuner.fit()
    out_dir = Path(exp_path) if local else Path(tempfile.mkdtemp(prefix=f"xswinir_sweep_{sweep.name}_"))
    summary = export_results(grid, sweep, base, out_dir)
    if not local:
        _upload(out_dir, exp_path)
    return summary


def _upload(folder: Path, uri: str) -> None:
    """Copies the exported result files next to the experiment on remote storage."""
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(uri)
    for file in folder.iterdir():
        if file.is_file():
            with fs.open_output_stream(f"{root}/{file.name}") as out:
                out.write(file.read_bytes())
