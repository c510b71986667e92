"""A controlled study on Ray Tune: does the texture term help, against lambda = 0, paired by seed?

A study is a *grid*, not a search: every arm (a named set of config overrides, e.g. ``lambda0``,
``projection_l1``, ``pull_l0.1``) is trained once per seed, with the same steps, data and degradations, so
that two arms with the same seed differ only in what the arm changes (the seed fixes the initial weights, the
batches and the degradations of every step). Each trial is one ``xswinir train`` run (Ray Train inside a
Tune function trainable, launched as a sweep's are: :mod:`xswinir.tune.launch`); after training, the final EMA
weights are evaluated on every evaluation set with the ``eval_degradation`` at the fixed ``eval_seed``
(:func:`xswinir.evaluation.evaluate_model`: each image degraded the same way for every model) and the
per-image rows are written beside the run (``eval.json``), so nothing depends on Tune's result objects.

Outputs, in ``<storage>/<name>/``: ``train/<arm>_s<seed>/`` (each run with its checkpoints, kept for
re-evaluation), ``study.parquet`` (one row per arm, seed, set and image, bicubic included), ``study.md``
(per arm and set: the mean of every metric; per texture arm: the paired difference to the baseline arm with
its 95 % confidence interval over seeds), ``study_psnr.png`` (paired differences per seed), each written
atomically, and ``xswinir_manifest.json`` (what ``--resume`` may unpickle: :mod:`xswinir.tune.manifest`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xswinir.atomic import atomic_path
from xswinir.checkpoint import load_model
from xswinir.config import (
    DEFAULT_DEGRADATION,
    Config,
    ConfigError,
    apply_overrides,
    build_section,
    check_name,
    load_config,
    read_experiment_file,
    resolve_config_path,
    show,
)
from xswinir.errors import UserError
from xswinir.evaluation import evaluate_model
from xswinir.metrics import LPIPS, MS_SSIM_Y, PSNR_Y, SCC_Y, SSIM_Y, VIF_Y
from xswinir.paths import experiment_path, is_remote, printable_path
from xswinir.sources import absolute_source
from xswinir.tune.launch import absolute_path_overrides, check_experiment, check_inputs, fit_trial, run_trials

EVAL_FILE = "eval.json"
STUDY_TABLE = "study.parquet"
STUDY_REPORT = "study.md"
STUDY_PLOT = "study_psnr.png"
STUDY_SUMMARY = "study_summary.json"
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
    storage: str = "outputs/studies"  # a local folder: the report is made from the trials' files
    address: str | None = None

    def __post_init__(self) -> None:
        check_name(self.name, "name")
        for arm in self.arms:
            check_name(arm, "an arm's name")  # it names the runs' folders, <arm>_s<seed>
        if not self.arms or self.baseline not in self.arms:
            raise ConfigError(f"the study needs arms, one of them the baseline {show(self.baseline)}")
        if len(self.seeds) < 2 or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"a study needs at least 2 distinct seeds for a confidence interval, got "
                              f"{show(list(self.seeds))}")
        if not self.eval_sets or self.max_concurrent < 1:
            raise ConfigError("a study needs eval_sets and max_concurrent >= 1")
        if is_remote(self.storage):
            raise ConfigError(f"study storage must be a local or mounted folder, got {show(self.storage)}")

    def arm_config(self, arm: str, seed: int) -> Config:
        """The training config of one trial, validated."""
        base = load_config(self.base, list(self.overrides))
        return apply_overrides(base, [*self.arms[arm], f"train.seed={seed}"])

    def experiment_path(self) -> Path:
        return Path(experiment_path(self.storage, self.name))


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
                               storage=str(Path(study.storage).expanduser().resolve()))


def run_name(arm: str, seed: int) -> str:
    return f"{arm}_s{seed}"


def study_trial(config: dict[str, Any], study_fields: dict[str, Any], classifier_cache: str) -> None:
    """Tune function trainable: trains one (arm, seed), then evaluates its final EMA weights on every set.

    Args:
        config: the trial's grid point, ``{"arm": name, "seed": int}`` (Ray's name for a trial's plain dict).
        study_fields: the study as a dict (``dataclasses.asdict``: plain values travel to every trial).
        classifier_cache: the texture-classifier cache the trials share.
    """
    from ray import tune  # here, not at the top: `xswinir study --report-only` runs without Ray

    study = StudyConfig(**study_fields)
    arm, seed = config["arm"], int(config["seed"])
    cfg = study.arm_config(arm, seed)
    train_storage = study.experiment_path() / "train"
    result = fit_trial(cfg, run_name(arm, seed), str(train_storage), classifier_cache)
    if result.checkpoint is None:
        raise RuntimeError(f"{run_name(arm, seed)} finished without a checkpoint")
    with result.checkpoint.as_directory() as directory:
        model, _ = load_model(directory)
    rows = []
    for hr_source in study.eval_sets:
        for kind, net in (("model", model), ("bicubic", None)):
            for row in evaluate_model(net, hr_source, cfg.scale, degradation=study.eval_degradation,
                                     seed=study.eval_seed):
                rows.append({"arm": arm, "seed": seed, "kind": kind, **row})
    out = train_storage / run_name(arm, seed) / EVAL_FILE
    out.write_text(json.dumps(rows, indent=1, default=_json_default))
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


def run_study(study: StudyConfig, resume: bool = False) -> Path:
    """Runs (or continues) every (arm, seed) trial and writes the report; returns ``study.md``'s path."""
    from ray import tune  # here, not at the top: `xswinir study --report-only` runs without Ray

    exp_path = check_experiment("study", study.name, study.storage, resume)
    study = with_absolute_paths(study)
    check_inputs([study.arm_config(arm, study.seeds[0]) for arm in study.arms], study.eval_sets)
    base = study.arm_config(study.baseline, study.seeds[0])
    # Seeds outermost: the first finished trials already form complete pairs.
    space = {"seed": tune.grid_search(list(study.seeds)), "arm": tune.grid_search(list(study.arms))}
    tune_config = tune.TuneConfig(max_concurrent_trials=study.max_concurrent,
                                  trial_dirname_creator=lambda t: run_name(t.config["arm"], t.config["seed"]))
    run_trials(study_trial, {"study_fields": dataclasses.asdict(study), "classifier_cache": f"{exp_path}/classifiers"},
               exp_path, dataclasses.replace(base.run, address=study.address), resume, tune_config, space)
    return write_report(study)


def collect_rows(study: StudyConfig) -> list[dict[str, Any]]:
    """Every evaluated row of the study's finished trials (``eval.json`` files)."""
    rows = []
    for arm in study.arms:
        for seed in study.seeds:
            file = study.experiment_path() / "train" / run_name(arm, seed) / EVAL_FILE
            if file.is_file():
                rows.extend(json.loads(file.read_text()))
    return rows


def t_quantile_975(dof: int) -> float:
    """Two-sided 95 % quantile of Student's t with ``dof`` degrees of freedom."""
    from scipy import stats

    return float(stats.t.ppf(0.975, dof))


def paired_difference(arm_means: dict[int, float], base_means: dict[int, float]) -> dict[str, float] | None:
    """Mean of (arm - baseline) over the seeds both have, with a 95 % t interval; None with fewer than 2."""
    seeds = sorted(set(arm_means) & set(base_means))
    diffs = [arm_means[s] - base_means[s] for s in seeds]
    n = len(diffs)
    if n < 2:
        return None
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = t_quantile_975(n - 1) * sd / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n, "wins": sum(d > 0 for d in diffs)}


def summarise(study: StudyConfig, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per arm and set: seed means of every metric; per non-baseline arm: paired differences."""
    per_seed: dict[tuple[str, str, int], dict[str, float]] = {}
    for key in {(r["arm"] if r["kind"] == "model" else "bicubic", r["set"], r["seed"]) for r in rows}:
        arm, hr_set, seed = key
        chosen = [r for r in rows if r["set"] == hr_set and r["seed"] == seed
                  and ((r["kind"] == "bicubic") if arm == "bicubic" else (r["kind"] == "model" and r["arm"] == arm))]
        if arm == "bicubic":  # the same inputs whichever arm evaluated them: keep one arm's copy
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


def write_report(study: StudyConfig) -> Path:
    """``study.parquet``, ``study.md`` and ``study_psnr.png`` from the finished trials' ``eval.json`` files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = collect_rows(study)
    if not rows:
        raise UserError(f"study '{study.name}' has no finished trial to report on")
    out = study.experiment_path()
    columns = sorted({k for r in rows for k in r})
    table = pa.table({c: [r.get(c) for r in rows] for c in columns})
    # Each file appears complete or not at all: a reader never sees half a report from an interrupted write.
    with atomic_path(out / STUDY_TABLE) as tmp:
        pq.write_table(table, tmp)
    summary = summarise(study, rows)
    report = out / STUDY_REPORT
    with atomic_path(report) as tmp:
        tmp.write_text(format_report(study, summary))
    with atomic_path(out / STUDY_SUMMARY) as tmp:
        tmp.write_text(json.dumps(summary, indent=1))
    with atomic_path(out / STUDY_PLOT) as tmp:
        plot_differences(study, summary, tmp)
    return report


def plot_differences(study: StudyConfig, summary: dict[str, Any], path: Path) -> Path:
    """Y-PSNR of every arm minus the baseline, per seed (dots) and mean with 95 % CI (bar), per set."""
    from matplotlib.figure import Figure

    sets = list(dict.fromkeys(r["set"] for r in summary["means"]))
    arms = [a for a in study.arms if a != study.baseline]
    fig = Figure(figsize=(3.2 * max(1, len(sets)), 3.4))
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
        ax.set_xticks(range(len(arms)), arms, rotation=20, fontsize=7)
        ax.set_title(display_set(hr_set), fontsize=8)
        ax.set_ylabel(f"Y-PSNR minus {study.baseline} (dB)", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path
