"""Launching an experiment of Train runs on Ray Tune: what a sweep and a study share.

An experiment (a sweep or a study) lives in ``<storage>/<name>``: Tune's state, the signature of what a resume
unpickles (:mod:`xswinir.tune.manifest`), and ``train/<run>/`` with each trial's Ray Train run. Each trial is a
Tune *function* trainable that calls :func:`xswinir.trainer.fit` with Tune's ``TuneReportCallback`` (the Ray Train
V2 pattern; passing a ``TorchTrainer`` to the ``Tuner`` is refused under V2) and asks for 0.01 CPU itself, so
that the CPUs go to the Train workers.

The steps, in order: :func:`check_experiment` and :func:`check_inputs` refuse what cannot run, in one line and
before Ray starts; :func:`run_trials` starts Ray and runs (or continues) the trials, and signs what a
``--resume`` will unpickle however it ends; :func:`fit_trial` is the body of one trial.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xswinir.config import Config, RunConfig, apply_overrides
from xswinir.data import check_image_source, check_train_source
from xswinir.errors import UserError
from xswinir.paths import experiment_path, is_remote, log_dir
from xswinir.runs import run_exists
from xswinir.sources import absolute_source
from xswinir.storage import check_writable
from xswinir.texture import load_texture_classifier
from xswinir.trainer import failure_message, fit, init_ray
from xswinir.training_log import METRICS_FILE, read_metrics
from xswinir.tune.manifest import verify_signature, write_signature

if TYPE_CHECKING:
    import ray.train
    import ray.tune

log = logging.getLogger(__name__)

def absolute_path_overrides(cfg: Config) -> dict[str, str]:
    """The overrides that make the config's local data and classifier paths absolute.

    A Tune trial runs in its own working directory, where a relative path names nothing. URIs, ``skimage:``
    sources and paths that do not exist stay as they are.

    Returns:
        ``{dotted key: absolute value}`` for each value that changes; empty when none does.
    """
    # Every config value that names local files or folders a trial reads.
    values = {"data.train": cfg.data.train, "data.train_lq": cfg.data.train_lq, "data.val": cfg.data.val,
              "texture.classifier.path": cfg.texture.classifier.path}
    return {key: absolute_source(value) for key, value in values.items() if value and absolute_source(value) != value}


def check_experiment(kind: str, name: str, storage: str, resume: bool) -> str:
    """Refuses a new experiment where one exists and a resume where none does; returns the experiment's folder.

    On ``resume`` the files ``Tuner.restore`` would unpickle are checked against their signature first.

    Args:
        kind: ``"sweep"`` or ``"study"``, for the messages.
        name: the experiment's name, its folder under ``storage``.
        storage: a local folder or a URI.

    Returns:
        ``<storage>/<name>``: an absolute local path or a URI.

    Raises:
        UserError: the experiment exists and ``resume`` is False, or there is nothing to resume; its files
            do not match their signature; the storage is not writable.
    """
    from ray import tune  # here, not at the top: `xswinir study --report-only` runs without Ray

    experiment = experiment_path(storage, name)
    exists = (is_remote(experiment) or Path(experiment).is_dir()) and tune.Tuner.can_restore(experiment)
    if resume and not exists:
        raise UserError(f"nothing to resume: no {kind} '{name}' in {storage}")
    if not resume and exists:
        raise UserError(f"{kind} '{name}' already exists in {storage}: pass --resume to continue it, or choose "
                        "another name")
    if resume:
        verify_signature(experiment)  # Tuner.restore unpickles the folder's files
    check_writable(storage)
    return experiment


def check_inputs(configs: list[Config], eval_sets: tuple[str, ...] | list[str] = ()) -> None:
    """Refuses, before Ray starts, the inputs that every trial would otherwise find wrong only once it runs.

    The training data of each distinct data setting (:func:`xswinir.data.check_train_source`: every image's
    header, paired LQ partners included), the validation images, a texture classifier named by path, and a
    study's evaluation sets: a refusal is one line, not a set of failed trials or a study with nothing to report.

    Args:
        configs: the trials' training configs (a sweep's base; a study's arms).
        eval_sets: the HR sources a study evaluates its trials on.

    Raises:
        UserError: one line naming the setting, the source and what is wrong with it.
    """
    checked: set[str] = set()
    for cfg in configs:
        # What the data check depends on; arms that differ elsewhere (a loss weight, a seed) share one check.
        key = repr((cfg.data, cfg.texture.region_size, cfg.texture_enabled, cfg.scale, cfg.model.in_chans))
        if key not in checked:
            checked.add(key)
            check_train_source(cfg)
            check_image_source(cfg.data.val, "data.val")
        if cfg.texture_enabled and cfg.texture.classifier.path is not None:
            load_texture_classifier(cfg.texture.classifier.path)  # a few KB: a missing or foreign folder fails here
    for source in eval_sets:
        check_image_source(source, "eval_sets")


def run_trials(
    trainable: Callable[..., None],
    parameters: dict[str, Any],
    experiment: str,
    run: RunConfig,
    resume: bool,
    tune_config: ray.tune.TuneConfig | None = None,
    param_space: dict[str, Any] | None = None,
    max_failures: int = 0,
    callbacks: list | None = None,
) -> ray.tune.ResultGrid:
    """Starts Ray and runs the experiment's trials, or with ``resume`` continues them (errored ones run again).

    Args:
        trainable: the trial function, ``trainable(config, **parameters)``; a module-level function, so that
            Tune can pickle it.
        parameters: the trial function's fixed arguments (plain values: they travel to every trial).
        experiment: the folder from :func:`check_experiment`.
        run: where Ray runs: ``run.address`` (None: a local Ray, or the job's cluster).
        tune_config, param_space: the new experiment's settings; a resumed one has its own.
        max_failures: retries of a failed trial; -1: retry forever.
        callbacks: extra Tune callbacks; Tune saves them with the experiment, and a resumed one runs them again.

    Returns:
        Tune's results as its saved experiment state records them (:func:`saved_results`), also after an
        interrupted run: a trial stopped by the Ctrl-C is not ``TERMINATED`` there.
    """
    from ray import tune  # here, not at the top: `xswinir study --report-only` runs without Ray

    # Concurrent trials start their Train workers (each importing torch) at the same moment; on a small, busy
    # machine that overruns Ray Train's default 60 s and the trial fails. Inherited by a local cluster.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "180")
    # A failed trial's traceback goes to its error file; the console gets one line per failed trial (below).
    os.environ.setdefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")
    init_ray(run)
    # The trial function only drives its TorchTrainer; a whole CPU each would starve the Train workers.
    wrapped = tune.with_resources(tune.with_parameters(trainable, **parameters), {"cpu": 0.01})
    if resume:
        log.info("resuming %s", experiment)
        tuner = tune.Tuner.restore(experiment, trainable=wrapped, resume_errored=True)
    else:
        storage_path, name = experiment.rstrip("/").rsplit("/", 1)
        tuner = tune.Tuner(
            wrapped, param_space=param_space, tune_config=tune_config,
            run_config=tune.RunConfig(name=name, storage_path=storage_path, callbacks=callbacks, verbose=1,
                                      failure_config=tune.FailureConfig(max_failures=max_failures)),
        )
    try:
        tuner.fit()
    finally:
        # Tune has synced its final state (also after Ctrl-C or an error): sign what a --resume will unpickle.
        write_signature(experiment)
    grid = saved_results(experiment)
    for result in grid:
        if result.error is not None:
            log.error("trial %s failed: %s (full log: %s/error.txt)", Path(result.path).name,
                      trial_error(result.error), result.path)
    return grid


def saved_results(experiment: str) -> ray.tune.ResultGrid:
    """The experiment's trials as Tune's newest saved experiment state records them: what a ``--resume`` reads.

    Not the grid that ``Tuner.fit`` returns, which is wrong after a Ctrl-C. On SIGINT, Tune (Ray 2.60,
    ``tune.py`` ``run``) leaves its loop, saves its state (``checkpoint(force=True, wait=True)``: finished trials
    ``TERMINATED``, interrupted ones still ``RUNNING`` or ``PENDING``), and only then stops the live trials in
    ``cleanup()``, which marks them ``TERMINATED`` in memory; ``fit`` returns those in-memory trials. A trial the
    Ctrl-C cut short would then read as finished (or as stopped early by the scheduler), though the resume runs
    it again.

    Args:
        experiment: the experiment's folder or URI, ``<storage>/<name>``.
    """
    from ray.tune import ExperimentAnalysis, ResultGrid

    return ResultGrid(ExperimentAnalysis(experiment))


def trial_error(error: BaseException) -> str:
    """One line for what a trial raised: a user error's own message, else the error's type and first line.

    Tune hands a trial's exception back wrapped (``RayTaskError``, whose text is the whole traceback); the
    trial's own exception is its ``cause``.
    """
    cause = getattr(error, "cause", None) or error
    lines = str(cause).strip().splitlines()
    first = lines[0][:300] if lines else ""
    return first if isinstance(cause, UserError) else f"{type(cause).__name__}: {first}"


def fit_trial(cfg: Config, name: str, train_storage: str, classifier_cache: str) -> ray.train.Result:
    """One trial's Train run, ``<train_storage>/<name>``, reporting every validation to Tune.

    A trial that Tune starts again (a resumed experiment, a retried failure) continues its own run, so ``name``
    must be stable across restarts (a trial id, an arm and a seed; never a time).

    Args:
        cfg: the trial's training config; its ``run`` section is set here.
        classifier_cache: the texture-classifier cache the trials share, so that trials with the same
            classifier settings train it once.
    """
    import ray.train
    from ray import tune  # here, not at the top: `xswinir study --report-only` runs without Ray
    from ray.tune.integration.ray_train import TuneReportCallback

    # A trial's log is a file; the experiment's driver prints its own table.
    cfg = apply_overrides(cfg, {"run.name": name, "run.storage": train_storage, "run.address": None,
                                "run.progress": False})
    resumed = run_exists(cfg.run)
    try:
        result = fit(cfg, resume=resumed, callbacks=[TuneReportCallback()], classifier_cache=Path(classifier_cache))
    except ray.train.TrainingFailedError as err:  # the worker's error in one line, for the driver's console
        raise UserError(failure_message(err, log_dir(cfg.run.storage, cfg.run.name, cfg.run.log_dir))) from err
    if resumed:
        # An experiment interrupted after a trial's Train run had finished, but before Tune recorded it, resumes
        # into a run with nothing left to train: fit reports nothing, and Tune refuses a final result without
        # the metric. Report the latest metrics again (a repeat at the same step is harmless). Ray has none when
        # the resume set its run snapshot aside (it named an older checkpoint than the newest good one): the
        # run's own metrics file has them.
        logs = log_dir(cfg.run.storage, cfg.run.name, cfg.run.log_dir)
        latest = dict(result.metrics or {}) or latest_validation(logs / METRICS_FILE)
        if latest:
            tune.report(latest)
    return result


def latest_validation(metrics_path: Path) -> dict[str, Any]:
    """The last validation row of a run's metrics file (``step`` and the ``val/...`` values), or {}."""
    rows = [r for r in read_metrics(metrics_path) if any(k.startswith("val/") for k in r)]
    return {k: v for k, v in rows[-1].items() if k == "step" or k.startswith("val/")} if rows else {}
