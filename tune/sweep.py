"""A Ray Tune sweep over training configs: Optuna TPE proposes, ASHA stops the weak, Ray Train trains.

One trial is one ``xswinir train`` run (possibly multi-worker, ``run.num_workers``), launched as every
experiment is (:mod:`xswinir.tune.launch`): :func:`train_trial` builds the trial's config from the base config,
the sweep's overrides and the sampled values, and trains it with Tune's report callback.

The λ = 0 baseline. ``loss.texture_weight`` is searched log-uniformly, and 0 lies outside that domain.
Enqueuing λ = 0 in Optuna (``OptunaSearch(points_to_evaluate=...)``) fails at the first suggestion (Optuna
5.0: "`0.0` is invalid value for the case log=True"); a searched on/off switch instead would let TPE spend
trials on repeated baselines. So the baseline never reaches Optuna:
:class:`BaselineFirst` hands out the baseline as the sweep's first trial and forwards only the other trials
to ``OptunaSearch``, whose TPE model thus sees only the domain it samples. The baseline counts toward
``num_samples``; every sweep reports whether the texture term beats it.

Outputs, in ``<storage>/<name>/``: Tune's experiment state (for ``--resume``) and the signed manifest of its
pickled files (:mod:`xswinir.tune.manifest`), ``train/<trial_id>/`` (each trial's Ray Train run with
checkpoints), ``classifiers/`` (texture classifiers shared by the trials), and the exports of
:mod:`xswinir.tune.results` and :mod:`xswinir.tune.plots`: ``trials.parquet``, ``history.png``,
``lambda_psnr.png``, ``importance.png``, ``best_config.yaml``.

The sweep's YAML is :mod:`xswinir.tune.sweep_config`; every check on it, and on the storage, runs before Ray
starts.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.search import Searcher

from xswinir.config import Config, apply_overrides
from xswinir.paths import is_remote
from xswinir.storage import write_file
from xswinir.tune.launch import absolute_path_overrides, check_experiment, check_inputs, fit_trial, run_trials
from xswinir.tune.results import SweepSummary, export_results
from xswinir.tune.search_space import to_tune
from xswinir.tune.sweep_config import TEXTURE_WEIGHT, SweepConfig


def train_trial(config: dict[str, Any], base: dict[str, Any], train_storage: str, classifier_cache: str) -> None:
    """Tune function trainable: one Ray Train run with the sampled values; metrics flow to Tune per report.

    Args:
        config: the sampled values by dotted key (``{"loss.texture_weight": 0.03, "texture.patch_size": 8}``);
            Ray's name for a trial's plain dict (a :class:`~xswinir.config.Config` is ``cfg`` everywhere).
        base: the base training config as a dict (``Config.to_dict``: plain values travel to every trial).
        train_storage: where the trials' Ray Train runs live (``<experiment>/train``).
        classifier_cache: shared texture-classifier cache, so trials with the same patch size train it once.
    """
    # The trial id is stable across a sweep's restore, so a resumed trial continues its own Train run.
    trial_id = tune.get_context().get_trial_id()
    fit_trial(apply_overrides(Config.from_dict(base), config), trial_id, train_storage, classifier_cache)


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

    def set_search_properties(self, metric, mode, config, **spec) -> bool:  # Ray's signature: config is its space
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
    if is_remote(sweep.storage):
        # ensure_texture_classifier wants a local folder; each node trains or reuses its own copy.
        return str(Path(tempfile.gettempdir(), "xswinir_classifiers", sweep.name))
    return str(Path(sweep.experiment_path()) / "classifiers")


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
    # Everything that can refuse the sweep runs before Ray starts: a refusal is one line, not a cluster.
    base = sweep.base_config()
    base = apply_overrides(base, absolute_path_overrides(base))
    exp_path = check_experiment("sweep", sweep.name, sweep.storage, resume)
    check_inputs([base])
    tune_config = None if resume else tune.TuneConfig(
        metric=sweep.metric, mode=sweep.mode, search_alg=build_search_alg(sweep),
        scheduler=build_scheduler(sweep, base), num_samples=sweep.num_samples, trial_name_creator=trial_dirname,
        trial_dirname_creator=trial_dirname,
    )
    grid = run_trials(
        train_trial, {"base": base.to_dict(), "train_storage": f"{exp_path}/train",
                      "classifier_cache": _classifier_cache(sweep)},
        exp_path, dataclasses.replace(base.run, address=sweep.address), resume, tune_config,
        max_failures=sweep.max_failures, callbacks=callbacks,
    )
    local = not is_remote(exp_path)
    out_dir = Path(exp_path) if local else Path(tempfile.mkdtemp(prefix=f"xswinir_sweep_{sweep.name}_"))
    summary = export_results(grid, sweep, base, out_dir)
    if not local:
        _upload(out_dir, exp_path)
    return summary


def build_scheduler(sweep: SweepConfig, base: Config):
    """ASHA on the trainer's ``step`` (up to ``train.total_steps``), or FIFO: every trial runs to the end."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if sweep.scheduler.type == "none":
        return FIFOScheduler()
    return ASHAScheduler(time_attr="step", max_t=base.train.total_steps, grace_period=sweep.scheduler.grace_period,
                         reduction_factor=sweep.scheduler.reduction_factor)


def _upload(folder: Path, uri: str) -> None:
    """Copies the exported result files next to the experiment on remote storage."""
    for file in folder.iterdir():
        if file.is_file():  # each appears whole or not at all
            data = file.read_bytes()
            write_file(f"{uri.rstrip('/')}/{file.name}", lambda path, data=data: path.write_bytes(data))
