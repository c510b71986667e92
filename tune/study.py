"""A controlled study on Ray Tune: does the texture term help, against lambda = 0, paired by seed?

A study is a *grid*, not a search: every arm (a named set of config overrides, e.g. ``lambda0``,
``projection_l1``, ``pull_l0.1``) is trained once per seed, with the same steps, data and degradations, so
that two arms with the same seed differ only in what the arm changes (the seed fixes the initial weights, the
batches and the degradations of every step). Each trial is one ``xswinir train`` run (Ray Train inside a
Tune function trainable, launched as a sweep's are: :mod:`xswinir.tune.launch`); after training, the final EMA
weights are evaluated on every evaluation set with the ``eval_degradation`` at the fixed ``eval_seed``
(:func:`xswinir.evaluation.evaluate_model`: each image degraded the same way for every model) and the
per-image rows are written beside the run (``eval.json``), so nothing depends on Tune's result objects. The
bicubic rows (the same inputs whatever the arm) are evaluated by the baseline arm's trials only.

The storage is a local folder or a URI (``s3://bucket/studies``): the trials, the report and ``--resume`` read
and write it through pyarrow (:func:`xswinir.storage.read_file`, :func:`xswinir.storage.write_file`), and every
file appears whole or not at all (a local file is moved into place, an object is copied onto its name once
uploaded).

Outputs, in ``<storage>/<name>/``: ``train/<arm>_s<seed>/`` (each run with its checkpoints, kept for
re-evaluation), ``study.parquet`` (one row per arm, seed, set and image, bicubic included), ``study.md``
(per arm and set: the mean of every metric; per texture arm: the paired difference to the baseline arm with
its 95 % confidence interval over seeds), ``study_summary.json``, ``study_psnr.png`` (paired differences per
seed), and ``xswinir_manifest.json`` (what ``--resume`` may unpickle: :mod:`xswinir.tune.manifest`). On request,
:func:`export_models` writes every finished trial's final EMA weights as safetensors with an index.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from xswinir.checkpoint import checkpoint_problem, load_model
from xswinir.config import (
    DEFAULT_DEGRADATION,
    Config,
    ConfigError,
    apply_overrides,
    build_section,
    check_name,
    load_experiment_base,
    read_experiment_file,
    resolve_config_path,
    show,
)
from xswinir.errors import UserError
from xswinir.evaluation import evaluate_model
from xswinir.metrics import LPIPS, MS_SSIM_Y, PSNR_Y, SCC_Y, SSIM_Y, VIF_Y
from xswinir.paths import (
    experiment_path,
    filesystem_and_path,
    is_remote,
    location_of,
    printable_path,
    remote_error,
    storage_path,
)
from xswinir.runs import list_checkpoints
from xswinir.sources import absolute_source
from xswinir.storage import StorageError, read_file, write_file
from xswinir.tune.launch import absolute_path_overrides, check_experiment, check_inputs, fit_trial, run_trials
from xswinir.tune.prereg import half_width

EVAL_FILE = "eval.json"
STUDY_TABLE = "study.parquet"
STUDY_REPORT = "study.md"
STUDY_PLOT = "study_psnr.png"
STUDY_SUMMARY = "study_summary.json"
CONFIRM_REPORT = "confirm.md"  # --confirm's analysis, as printed
CONFIRM_PLOT = "confirm_per_image.png"  # the primary set's per-image differences (plot_per_image)
MODELS_INDEX = "README.md"  # beside the exported models (export_models)
# Metrics compared between arms, higher is better for all but LPIPS.
COMPARED = (PSNR_Y, SSIM_Y, MS_SSIM_Y, SCC_Y, VIF_Y, LPIPS)


@dataclass
class StudyConfig:
    """A study: a base training config, arms of overrides, seeds, and the evaluation sets."""

    name: str = "study"
    base: str = "demo"  # a shipped training config's name or a YAML path
    overrides: tuple[str, ...] = ()  # applied to base for every arm
    arms: dict[str, list[str]] = field(default_factory=dict)  # arm name -> `section.key=value` overrides
    baseline: str = "lambda0"  # the arm every other arm is compared with, paired by seed
    seeds: tuple[int, ...] = (0, 1, 2)
    eval_sets: tuple[str, ...] = ("skimage:val",)
    eval_degradation: str = DEFAULT_DEGRADATION
    eval_seed: int = 0
    max_concurrent: int = 2
    storage: str = "outputs/studies"  # a local folder or a URI (s3://bucket/studies)
    address: str | None = None
    # Reports only: other studies under the same storage whose finished trials stand in for this one's missing
    # (arm, seed) runs, e.g. the confirm stage's extra seeds run as `--name study_confirm_more --seeds 108 ...`.
    joins: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_name(self.name, "name")
        for other in self.joins:
            check_name(other, "a joined study's name")
        for arm in self.arms:
            check_name(arm, "an arm's name")  # it names the runs' folders, <arm>_s<seed>
        if not self.arms or self.baseline not in self.arms:
            raise ConfigError(f"the study needs arms, one of them the baseline {show(self.baseline)}")
        if len(self.seeds) < 2 or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"a study needs at least 2 distinct seeds for a confidence interval, got "
                              f"{show(list(self.seeds))}")
        if not self.eval_sets or self.max_concurrent < 1:
            raise ConfigError("a study needs eval_sets and max_concurrent >= 1")

    def arm_config(self, arm: str, seed: int) -> Config:
        """The training config of one trial, validated."""
        base = load_experiment_base(self.base, list(self.overrides))
        return apply_overrides(base, [*self.arms[arm], f"train.seed={seed}"])

    def experiment_path(self) -> str:
        """``<storage>/<name>``: an absolute local path or a URI."""
        return experiment_path(self.storage, self.name)

    def run_path(self, arm: str, seed: int) -> str:
        """The Ray Train run folder of one trial, ``<storage>/<name>/train/<arm>_s<seed>``."""
        return f"{self.experiment_path()}/train/{run_name(arm, seed)}"


def load_study_config(path: str | Path, extra_overrides: list[str] | None = None, **changes: Any) -> StudyConfig:
    """Reads a study YAML (a path or a shipped config's name, ``study_cpu``) and checks every arm's config.

    The file goes through the training config's typed loader (:func:`xswinir.config.build_section`).

    Raises:
        ConfigError: unknown keys, wrong types, or an arm whose overrides make an invalid training config.
    """
    file, data = read_experiment_file(path, extra_overrides, changes)  # one-line errors that name the file
    try:
        arms = data.get("arms")
        if not isinstance(arms, dict) or not all(isinstance(k, str) and isinstance(v, list)
                                                 and all(isinstance(o, str) for o in v) for k, v in arms.items()):
            raise ConfigError(f"arms must map names to lists of 'section.key=value' strings, got {show(arms)}")
        study = build_section(StudyConfig, data, "")
        for arm in study.arms:
            try:
                study.arm_config(arm, study.seeds[0])
            except ConfigError as err:
                raise ConfigError(f"arm '{arm}': {err}") from err
    except ConfigError as err:
        raise ConfigError(f"{printable_path(file)}: {err}") from err
    return study


def with_absolute_paths(study: StudyConfig) -> StudyConfig:
    """The study with its local paths made absolute (the base config, its data and classifier paths, the
    evaluation sets, the storage): Tune trials run in their own working directory."""
    base = study.arm_config(study.baseline, study.seeds[0])
    extra = [f"{key}={value}" for key, value in absolute_path_overrides(base).items()]
    base_path = resolve_config_path(study.base)
    return dataclasses.replace(study, base=str(base_path.resolve()), overrides=[*study.overrides, *extra],
                               eval_sets=[absolute_source(s) for s in study.eval_sets],
                               storage=storage_path(study.storage))


def run_name(arm: str, seed: int) -> str:
    return f"{arm}_s{seed}"


class StudyStorageError(StorageError):
    """A file of the study that is not what ``xswinir study`` wrote, or a final checkpoint that cannot be read."""


def study_trial(config: dict[str, Any], study_fields: dict[str, Any], classifier_cache: str) -> None:
    """Tune function trainable: trains one (arm, seed), then evaluates its final EMA weights on every set.

    The baseline arm's trials also evaluate bicubic up-sampling of the same inputs: those rows do not depend
    on the arm, so one arm's copy per seed is enough.

    Args:
        config: the trial's grid point, ``{"arm": name, "seed": int}`` (Ray's name for a trial's plain dict).
        study_fields: the study as a dict (``dataclasses.asdict``: plain values travel to every trial).
        classifier_cache: the texture-classifier cache the trials share (a local folder).
    """
    from ray import tune  # here, not at the top: `xswinir study --report-only` runs without Ray

    study = StudyConfig(**study_fields)
    arm, seed = config["arm"], int(config["seed"])
    cfg = study.arm_config(arm, seed)
    result = fit_trial(cfg, run_name(arm, seed), f"{study.experiment_path()}/train", classifier_cache)
    if result.checkpoint is None:
        raise RuntimeError(f"{run_name(arm, seed)} finished without a checkpoint")
    with result.checkpoint.as_directory() as directory:  # a checkpoint in a bucket is downloaded
        model, _ = load_model(directory)
    kinds = [("model", model)] + ([("bicubic", None)] if arm == study.baseline else [])
    rows = []
    for hr_source in study.eval_sets:
        for kind, net in kinds:
            for row in evaluate_model(net, hr_source, cfg.scale, degradation=study.eval_degradation,
                                     seed=study.eval_seed):
                rows.append({"arm": arm, "seed": seed, "kind": kind, **row})
    text = json.dumps(rows, indent=1, default=_json_default)
    write_file(f"{study.run_path(arm, seed)}/{EVAL_FILE}", lambda path: path.write_text(text))
    means = _mean_metrics([r for r in rows if r["kind"] == "model"])
    tune.report({**{f"test/{k}": v for k, v in means.items()}, "done": 1})


def _json_default(value: Any) -> Any:
    return None if value is None else float(value)


def _mean_metrics(rows: list[dict[str, Any]]) -> dict[str, float]:
    out = {}
    for key in COMPARED:
        values = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        if values:
            out[key] = sum(values) / len(values)
    return out


def _classifier_cache(study: StudyConfig) -> str:
    """The trials' shared texture-classifier cache: beside the study, or a local temp folder for a bucket."""
    if is_remote(study.storage):
        # The classifier is trained and read by local processes: each node trains or reuses its own copy.
        return str(Path(tempfile.gettempdir(), "xswinir_classifiers", study.name))
    return f"{study.experiment_path()}/classifiers"


def run_study(study: StudyConfig, resume: bool = False, callbacks: list | None = None) -> str:
    """Runs (or continues) every (arm, seed) trial and writes the report.

    Args:
        resume: continue the study in ``<storage>/<name>`` (finished trials stay, the others run); its files
            are checked against the signed manifest before Tune reads them.
        callbacks: extra Tune callbacks (the tests use one to interrupt a study); Tune saves them with the
            experiment, and a resumed study runs them again.

    Returns:
        The report, ``study.md``'s text (also after an interrupted run: the report of the finished trials).
    """
    from ray import tune  # here, not at the top: `xswinir study --report-only` runs without Ray

    exp_path = check_experiment("study", study.name, study.storage, resume)
    study = with_absolute_paths(study)
    check_inputs([study.arm_config(arm, study.seeds[0]) for arm in study.arms], study.eval_sets)
    base = study.arm_config(study.baseline, study.seeds[0])
    # Seeds outermost: the first finished trials already form complete pairs.
    space = {"seed": tune.grid_search(list(study.seeds)), "arm": tune.grid_search(list(study.arms))}
    tune_config = tune.TuneConfig(max_concurrent_trials=study.max_concurrent,
                                  trial_dirname_creator=lambda t: run_name(t.config["arm"], t.config["seed"]))
    run_trials(study_trial, {"study_fields": dataclasses.asdict(study), "classifier_cache": _classifier_cache(study)},
               exp_path, dataclasses.replace(base.run, address=study.address), resume, tune_config, space,
               callbacks=callbacks)
    return write_report(study)


def collect_rows(study: StudyConfig) -> list[dict[str, Any]]:
    """Every evaluated row of the study's finished trials (``eval.json`` files, local or in a bucket).

    Raises:
        StudyStorageError: an ``eval.json`` that cannot be read or is not JSON.
    """
    rows = []
    for arm in study.arms:
        for seed in study.seeds:
            rows.extend(_eval_rows(study, arm, seed) or [])
    return rows


def _eval_rows(study: StudyConfig, arm: str, seed: int) -> list[dict[str, Any]] | None:
    """One trial's ``eval.json`` rows, from this study or else the first joined study that ran it; None while
    no such trial has finished."""
    for name in (study.name, *study.joins):
        location = f"{dataclasses.replace(study, name=name, joins=()).run_path(arm, seed)}/{EVAL_FILE}"
        data = read_file(location)
        if data is not None:
            break
    else:
        return None
    try:
        rows = json.loads(data)
    except ValueError as err:
        raise StudyStorageError(f"{printable_path(location)} is not JSON ({err}); the trial's evaluation "
                                "was not written by xswinir study") from err
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise StudyStorageError(f"{printable_path(location)} holds no list of rows; the trial's evaluation "
                                "was not written by xswinir study")
    return rows


def paired_difference(arm_means: dict[int, float], base_means: dict[int, float]) -> dict[str, float] | None:
    """Mean of (arm - baseline) over the seeds both have, with a 95 % t interval; None with fewer than 2."""
    seeds = sorted(set(arm_means) & set(base_means))
    diffs = [arm_means[s] - base_means[s] for s in seeds]
    n = len(diffs)
    if n < 2:
        return None
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = half_width(sd, n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n, "wins": sum(d > 0 for d in diffs)}


def summarise(study: StudyConfig, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per arm and set: seed means of every metric; per non-baseline arm: paired differences.

    The bicubic rows of a seed are the baseline arm's: today only its trials evaluate bicubic. In studies run
    before that, every trial did, on the same inputs with the same numbers, and the baseline's copy is kept (or,
    where its trial is missing, every copy: their mean is the same).
    """
    per_seed: dict[tuple[str, str, int], dict[str, float]] = {}
    for key in {(r["arm"] if r["kind"] == "model" else "bicubic", r["set"], r["seed"]) for r in rows}:
        arm, hr_set, seed = key
        chosen = [r for r in rows if r["set"] == hr_set and r["seed"] == seed
                  and ((r["kind"] == "bicubic") if arm == "bicubic" else (r["kind"] == "model" and r["arm"] == arm))]
        if arm == "bicubic":  # a study run before bicubic was the baseline's alone: one arm's copy
            chosen = [r for r in chosen if r["arm"] == study.baseline] or chosen
        per_seed[key] = _mean_metrics(chosen)
    arms = [*study.arms, "bicubic"]
    sets = list(dict.fromkeys(r["set"] for r in rows))
    summary: dict[str, Any] = {"means": [], "differences": []}
    for hr_set in sets:
        for arm in arms:
            seeds = sorted(s for (a, h, s) in per_seed if a == arm and h == hr_set)
            if not seeds:
                continue
            row = {"set": hr_set, "arm": arm, "seeds": len(seeds)}
            for metric in COMPARED:
                values = [per_seed[(arm, hr_set, s)][metric] for s in seeds if metric in per_seed[(arm, hr_set, s)]]
                row[metric] = sum(values) / len(values) if values else None
            summary["means"].append(row)
        for arm in study.arms:
            if arm == study.baseline:
                continue
            for metric in COMPARED:
                mine = {s: v[metric] for (a, h, s), v in per_seed.items() if a == arm and h == hr_set and metric in v}
                base = {s: v[metric] for (a, h, s), v in per_seed.items()
                        if a == study.baseline and h == hr_set and metric in v}
                diff = paired_difference(mine, base)
                if diff is not None:
                    summary["differences"].append({"set": hr_set, "arm": arm, "metric": metric, **diff})
    summary["per_seed"] = [{"arm": a, "set": h, "seed": s, **v} for (a, h, s), v in sorted(per_seed.items())]
    return summary


def pick_report(study: StudyConfig) -> str:
    """The pre-registered pick rule (:mod:`xswinir.tune.prereg`) applied to the study's finished trials: a table
    of every texture arm's differences and score, and which arm the confirm stage tests (or that none does).

    Raises:
        UserError: no trial has finished, or an arm lacks two finished seeds.
    """
    from xswinir.tune import prereg

    rows = collect_rows(study)
    if not rows:
        raise UserError(f"study '{study.name}' has no finished trial to pick from in "
                        f"{printable_path(study.experiment_path())}")
    weights = {arm: study.arm_config(arm, study.seeds[0]).loss.texture_weight for arm in study.arms}
    try:
        screened = prereg.screened_arms(summarise(study, rows), weights, study.baseline)
    except ValueError as err:
        raise UserError(f"study '{study.name}': {err}") from err
    picked = prereg.pick(screened)
    text = prereg.format_pick(screened, picked, display_set)
    if picked is not None:
        overrides = ", ".join(study.arms[picked.arm])
        text += f"\nstudy_confirm.yaml's arm, copied verbatim: {picked.arm}: [{overrides}]"
    return f"## The pick rule (docs/study_texture/PREREGISTRATION.md)\n\n{text}\n"


def confirm_report(study: StudyConfig) -> str:
    """The confirm stage's registered analysis (:mod:`xswinir.tune.prereg`) over its finished trials: the primary
    (Δ Y-PSNR on the first evaluation set, paired by seed, 95 % t interval), whether its half-width meets the goal
    and how many seeds the power rule asks for, the answer, whether the default may change, and the per-image
    bootstrap. Written beside the study's report as ``confirm.md``, with ``confirm_per_image.png``
    (:func:`plot_per_image`).

    Raises:
        UserError: the study is not two arms, or fewer than 2 seeds have finished both.
    """
    from xswinir.tune import prereg

    others = [arm for arm in study.arms if arm != study.baseline]
    if len(others) != 1:
        raise UserError(f"study '{study.name}': the confirm analysis compares one arm with {study.baseline}, "
                        f"found {others}")
    # The rows name their set as the trials were given it: a local path made absolute (with_absolute_paths).
    arm, primary = others[0], absolute_source(study.eval_sets[0])
    rows = collect_rows(study)
    seeds, images, diffs = prereg.per_image_differences(rows, arm, study.baseline, primary)
    if len(seeds) < 2:
        raise UserError(f"study '{study.name}': {len(seeds)} seed(s) finished both arms on "
                        f"{display_set(primary)}; the interval needs 2")
    summary = summarise(study, rows)
    found = {(d["set"], d["metric"]): d for d in summary["differences"] if d["arm"] == arm}
    d = found[(primary, PSNR_Y)]
    per_seed = diffs.mean(axis=1)
    sd = float(per_seed.std(ddof=1))
    half = (d["high"] - d["low"]) / 2
    wanted = prereg.seeds_needed(sd, len(seeds))
    low, high = prereg.bootstrap_interval(diffs)
    ssim = found[(primary, SSIM_Y)]["mean"]
    may_change = d["low"] > 0 and ssim >= 0
    lines = [f"## Confirm: {arm} against {study.baseline} (docs/study_texture/PREREGISTRATION.md)", "",
             f"Primary, Δ Y-PSNR on {display_set(primary)} ({len(images)} images), paired over seeds "
             f"{seeds}: {d['mean']:+.4f} dB, 95 % t interval [{d['low']:+.4f}, {d['high']:+.4f}] "
             f"(half-width {half:.4f} dB; goal ≤ {prereg.HALF_WIDTH_GOAL_DB}: "
             f"{'met' if half <= prereg.HALF_WIDTH_GOAL_DB else 'not met'}); sd over seeds {sd:.4f} dB; "
             f"{d['wins']}/{d['n']} seeds better.",
             f"Power rule: {wanted} seeds for the goal at this sd"
             + (f" (cap {prereg.MAX_CONFIRM_SEEDS})" if wanted == prereg.MAX_CONFIRM_SEEDS else "")
             + ("" if wanted <= len(seeds) else f"; run {wanted - len(seeds)} more"),
             f"Answer: {prereg.answer(d['mean'], d['low'], d['high'], arm, display_set(primary))}.",
             f"Default form or λ may change: {'yes' if may_change else 'no'} (interval above 0 and Δ Y-SSIM "
             f"{ssim:+.5f} ≥ 0 both needed).",
             f"Per-image bootstrap over seeds and images ({prereg.BOOTSTRAP_RESAMPLES} resamples): "
             f"[{low:+.4f}, {high:+.4f}] dB.", "",
             "| set | metric | mean | 95 % t interval | seeds better |", "|---|---|---|---|---|"]
    for (hr_set, metric), diff in found.items():
        lines.append(f"| {display_set(hr_set)} | {metric} | {diff['mean']:+.5f} | [{diff['low']:+.5f}, "
                     f"{diff['high']:+.5f}] | {diff['wins']}/{diff['n']} |")
    text = "\n".join(lines) + "\n"
    out = study.experiment_path()
    write_file(f"{out}/{CONFIRM_REPORT}", lambda path: path.write_text(text))
    write_file(f"{out}/{CONFIRM_PLOT}", lambda path: plot_per_image(
        diffs, f"{arm} minus {study.baseline}", display_set(primary), d, (low, high), path))
    return text


def plot_per_image(diffs: Any, label: str, set_name: str, primary: dict[str, Any], bootstrap: tuple[float, float],
                   path: Path) -> Path:
    """Where the primary's mean comes from: each image's Δ Y-PSNR (``diffs``, seeds x images: mean over seeds,
    sorted; the grey bar spans the seeds' range), with the mean, its 95 % t interval over seeds and the per-image
    bootstrap's interval.

    An effect that a few images carry looks different here from one that every image shares, though both give
    the same mean.
    """
    import numpy as np
    from matplotlib.figure import Figure

    per_image = diffs.mean(axis=0)
    order = np.argsort(per_image)
    n_seeds, n_images = diffs.shape
    x = np.arange(n_images)
    fig = Figure(figsize=(max(6.0, 0.07 * n_images + 2.0), 3.6))
    ax = fig.subplots()
    ax.vlines(x, diffs.min(axis=0)[order], diffs.max(axis=0)[order], color="0.8", linewidth=2,
              label=f"range over {n_seeds} seeds")
    ax.scatter(x, per_image[order], s=10, color="tab:blue", zorder=3, label="mean over seeds")
    ax.axhline(0.0, color="gray", linewidth=0.8)
    ax.axhline(primary["mean"], color="black", linewidth=1.0, label=f"mean {primary['mean']:+.3f} dB")
    ax.axhspan(primary["low"], primary["high"], color="black", alpha=0.15,
               label=f"95 % t interval over seeds [{primary['low']:+.3f}, {primary['high']:+.3f}]")
    ax.axhspan(*bootstrap, facecolor="none", edgecolor="tab:orange", hatch="//", linewidth=0.0,
               label=f"bootstrap over seeds and images [{bootstrap[0]:+.3f}, {bootstrap[1]:+.3f}]")
    ax.set_xticks([])
    ax.set_xlabel(f"the {n_images} images of {set_name}, sorted by their mean difference", fontsize=8)
    ax.set_ylabel(f"Y-PSNR, {label} (dB)", fontsize=8)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def display_set(source: str) -> str:
    """A short name for an evaluation set: ``Set5/HR`` for ``/data/Set5/HR``, ``skimage:val`` as it is."""
    if is_remote(source) or source.startswith("skimage:") or "/" not in source:
        return source
    parts = Path(source).parts
    return "/".join(parts[-2:]) if parts[-1].lower() in ("hr", "gt") else parts[-1]


def format_report(study: StudyConfig, summary: dict[str, Any]) -> str:
    cfg = study.arm_config(study.baseline, study.seeds[0])
    m, t = cfg.model, cfg.train
    lines = [f"# Study `{study.name}`", "",
             f"Arms trained on `{cfg.data.train}` with seeds {study.seeds}: SwinIR x{m.upscale} (embed_dim "
             f"{m.embed_dim}, depths {list(m.depths)}, window {m.window_size}), {t.total_steps} steps of batch "
             f"{t.batch_size}, `{cfg.degradation.preset}` degradations, LR patch {cfg.data.gt_size // m.upscale}. "
             f"Each final EMA model evaluated with `{study.eval_degradation}` degradations at seed {study.eval_seed} "
             f"(every model sees the same inputs). Arms:", ""]
    for arm, overrides in study.arms.items():
        lines.append(f"- `{arm}`: {', '.join(f'`{o}`' for o in overrides) or 'the base config'}")
    lines += ["", "## Means over seeds", "", "| set | arm | seeds | " + " | ".join(COMPARED) + " |",
              "|---|---|---|" + "---|" * len(COMPARED)]
    lines[-2] = lines[-2].replace("| lpips |", "| lpips (lower is better) |")
    for row in summary["means"]:
        cells = [_fmt(row[m]) for m in COMPARED]
        lines.append(f"| {display_set(row['set'])} | {row['arm']} | {row['seeds']} | " + " | ".join(cells) + " |")
    lines += ["", f"## Paired difference to `{study.baseline}` (arm - baseline, same seed), 95 % t interval over seeds",
              "", "| set | arm | metric | mean | 95 % CI | seeds better |", "|---|---|---|---|---|---|"]
    for d in summary["differences"]:
        lines.append(f"| {display_set(d['set'])} | {d['arm']} | {d['metric']} | {d['mean']:+.4f} | "
                     f"[{d['low']:+.4f}, {d['high']:+.4f}] | {d['wins']}/{d['n']} |")
    return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def write_report(study: StudyConfig) -> str:
    """``study.parquet``, ``study.md``, ``study_summary.json`` and ``study_psnr.png`` from the finished trials'
    ``eval.json`` files, each written whole or not at all (:func:`xswinir.storage.write_file`), locally or in
    the bucket.

    Returns:
        The report, ``study.md``'s text.

    Raises:
        UserError: no trial has finished; a file cannot be read or written.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = collect_rows(study)
    out = study.experiment_path()
    if not rows:
        raise UserError(f"study '{study.name}' has no finished trial to report on in {printable_path(out)}")
    columns = sorted({k for r in rows for k in r})
    table = pa.table({c: [r.get(c) for r in rows] for c in columns})
    summary = summarise(study, rows)
    report = format_report(study, summary)
    # Each file appears complete or not at all: a reader never sees half a report from an interrupted write.
    write_file(f"{out}/{STUDY_TABLE}", lambda path: pq.write_table(table, path))
    write_file(f"{out}/{STUDY_REPORT}", lambda path: path.write_text(report))
    write_file(f"{out}/{STUDY_SUMMARY}", lambda path: path.write_text(json.dumps(summary, indent=1)))
    write_file(f"{out}/{STUDY_PLOT}", lambda path: plot_differences(study, summary, path))
    return report


def plot_differences(study: StudyConfig, summary: dict[str, Any], path: Path) -> Path:
    """Y-PSNR of every arm minus the baseline, per seed (dots) and mean with 95 % CI (bar), per set."""
    from matplotlib.figure import Figure

    sets = list(dict.fromkeys(r["set"] for r in summary["means"]))
    arms = [a for a in study.arms if a != study.baseline]
    # Wide enough that the arms' names (rotated) do not overlap: a screen has eight of them per panel.
    fig = Figure(figsize=(max(3.2, 1.0 + 0.55 * len(arms)) * max(1, len(sets)), 3.8))
    axes = fig.subplots(1, max(1, len(sets)), squeeze=False)[0]
    per_seed = {(r["arm"], r["set"], r["seed"]): r.get("psnr_y") for r in summary["per_seed"]}
    for ax, hr_set in zip(axes, sets, strict=False):
        for i, arm in enumerate(arms):
            diffs = [per_seed[(arm, hr_set, s)] - per_seed[(study.baseline, hr_set, s)] for s in study.seeds
                     if per_seed.get((arm, hr_set, s)) is not None and per_seed.get((study.baseline, hr_set, s))
                     is not None]
            ax.scatter([i] * len(diffs), diffs, s=14, color="tab:blue", alpha=0.7)
            d = next((d for d in summary["differences"] if d["set"] == hr_set and d["arm"] == arm
                      and d["metric"] == "psnr_y"), None)
            if d is not None:
                ax.errorbar([i + 0.15], [d["mean"]], yerr=[[d["mean"] - d["low"]], [d["high"] - d["mean"]]],
                            fmt="o", color="black", capsize=3)
        ax.axhline(0.0, color="gray", linewidth=0.8)
        ax.set_xticks(range(len(arms)), arms, rotation=35, ha="right", rotation_mode="anchor", fontsize=7)
        ax.set_title(display_set(hr_set), fontsize=8)
        ax.set_ylabel(f"Y-PSNR minus {study.baseline} (dB)", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


class ExportedModel(NamedTuple):
    """One model written by :func:`export_models`."""

    arm: str
    seed: int
    location: str  # <out>/<arm>_s<seed>.safetensors
    size: int  # bytes
    sha256: str
    psnr_y: dict[str, float]  # mean Y-PSNR (dB) per evaluation set, from the trial's eval.json


def final_checkpoint(study: StudyConfig, arm: str, seed: int) -> str:
    """The final checkpoint of a trial's run (the newest: the one its ``eval.json`` measured), checked.

    Returns:
        The checkpoint folder, a local path or a URI.

    Raises:
        StudyStorageError: the run has no checkpoint, the newest one is damaged, or the store cannot be read.
    """
    import pyarrow as pa

    run = study.run_path(arm, seed)
    try:
        fs, path = filesystem_and_path(run)
        checkpoints = list_checkpoints(path, fs)
        # Names and sizes only for a bucket: load_model checks every sha256 once the folder is downloaded.
        problem = checkpoint_problem(checkpoints[-1], fs, hashes=not is_remote(run)) if checkpoints else None
    except (OSError, pa.ArrowException) as err:
        raise StudyStorageError(remote_error("cannot list the checkpoints of", run, err)) from err
    if not checkpoints:
        raise StudyStorageError(f"{run_name(arm, seed)} has its {EVAL_FILE} but no checkpoint in {printable_path(run)}")
    location = location_of(fs, checkpoints[-1])
    if problem is not None:
        raise StudyStorageError(f"the final checkpoint of {run_name(arm, seed)}, {printable_path(location)}, "
                                f"cannot be exported: {problem}")
    return location


def export_models(study: StudyConfig, out: str) -> list[ExportedModel]:
    """Writes each finished trial's final EMA weights as ``<out>/<arm>_s<seed>.safetensors``, and an index.

    The files are the official SwinIR keys with our model config in the metadata
    (:func:`xswinir.export.export_safetensors`): ``xswinir eval --checkpoint FILE`` loads them as they are.
    ``<out>/README.md`` lists them (arm, seed, overrides, size, sha256, the mean Y-PSNR per evaluation set the
    study measured) and says how to evaluate one again. A trial is finished once its ``eval.json`` exists;
    the others are left out. ``out`` may be a local folder or a URI; every file appears whole or not at all.

    Returns:
        The models written, in the order of the arms, then the seeds.

    Raises:
        UserError: no trial has finished; a final checkpoint is missing or damaged; a file cannot be written.
    """
    from xswinir.export import export_safetensors  # here: torch's export machinery only when asked for

    out = out.rstrip("/") or "/"
    exported = []
    for arm in study.arms:
        for seed in study.seeds:
            rows = _eval_rows(study, arm, seed)
            if rows is None:
                continue
            model, model_cfg = load_model(final_checkpoint(study, arm, seed))  # the EMA weights
            location = f"{out}/{run_name(arm, seed)}.safetensors"
            written = write_file(location, functools.partial(export_safetensors, model, model_cfg))
            model_rows = [r for r in rows if r["kind"] == "model"]
            psnr = {s: _mean_metrics([r for r in model_rows if r["set"] == s]).get(PSNR_Y)
                    for s in dict.fromkeys(r["set"] for r in model_rows)}
            exported.append(ExportedModel(arm, seed, location, written.size, written.sha256,
                                          {s: v for s, v in psnr.items() if v is not None}))
    if not exported:
        raise UserError(f"study '{study.name}' has no finished trial to export in "
                        f"{printable_path(study.experiment_path())}")
    index = format_models_index(study, exported, out)
    write_file(f"{out}/{MODELS_INDEX}", lambda path: path.write_text(index))
    return exported


def format_models_index(study: StudyConfig, models: list[ExportedModel], out: str) -> str:
    """The ``README.md`` beside the exported models: a table of them and how to evaluate one again."""
    sets = list(dict.fromkeys(s for m in models for s in m.psnr_y))
    lines = [f"# Models of the study `{study.name}`", "",
             f"The final EMA weights of every finished trial of `{study.name}`, one safetensors file per arm and "
             "seed: the official SwinIR keys with the model config in the metadata, so that `xswinir eval` and "
             "`xswinir upscale` load a file as it is. `psnr_y` is the model's mean Y-PSNR (dB) on each evaluation "
             f"set as the study measured it (`{study.eval_degradation}` inputs at seed {study.eval_seed}).", "",
             "| arm | seed | overrides | file | size | sha256 | " + " | ".join(f"psnr_y {display_set(s)}" for s in sets)
             + " |", "|---|---|---|---|---|---|" + "---|" * len(sets)]
    for m in models:
        overrides = ", ".join(f"`{o}`" for o in study.arms[m.arm]).replace("|", "\\|") or "the base config"
        cells = [_fmt(m.psnr_y.get(s)) for s in sets]
        lines.append(f"| {m.arm} | {m.seed} | {overrides} | `{m.location.rsplit('/', 1)[-1]}` | "
                     f"{m.size / 1024:,.0f} KiB | `{m.sha256}` | " + " | ".join(cells) + " |")
    first = models[0].location.rsplit("/", 1)[-1]
    hr = " ".join(f"--hr {s}" for s in study.eval_sets)
    lines += ["", "## Evaluate a model again", "",
              "The study's numbers, image by image (`--out results.csv` keeps them):", "",
              f"    xswinir eval --checkpoint {printable_path(out)}/{first} {hr} "
              f"--degradation {study.eval_degradation} --seed {study.eval_seed}", "",
              "On your own images: `--hr` a folder of them; without `--degradation` the inputs are made with MATLAB "
              "bicubic, as in the papers' benchmarks. Each file's sha256 above tells whether it is the one the study "
              "wrote (`sha256sum *.safetensors`)."]
    return "\n".join(lines) + "\n"
