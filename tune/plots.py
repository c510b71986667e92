"""The sweep's pictures: optimisation history, λ against the metric per patch size, parameter importance."""

from __future__ import annotations

import logging
from pathlib import Path

from xswinir.atomic import atomic_path
from xswinir.tune.search_space import Domain, numeric_position, to_optuna
from xswinir.tune.sweep_config import SweepConfig
from xswinir.tune.trials import TrialRow

log = logging.getLogger(__name__)

PLOT_FILES = ("history.png", "lambda_psnr.png", "importance.png")


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

    scored = [r for r in rows if r.best is not None]
    # Each picture: how to draw it, from which trials, at what size (inches); the files of PLOT_FILES, in order.
    pictures = ((_draw_history, scored, (6, 4)), (_draw_lambda, scored, (6, 4)), (_draw_importance, rows, (6, 3)))
    paths = []
    for name, (draw, trials, size) in zip(PLOT_FILES, pictures, strict=True):
        fig, ax = plt.subplots(figsize=size)
        draw(ax, trials, sweep)
        fig.tight_layout()
        paths.append(_save(fig, out_dir / name))
        plt.close(fig)
    return paths


def _draw_history(ax, scored: list[TrialRow], sweep: SweepConfig) -> None:
    """Each trial's best metric in creation order, the baseline apart, and the best so far."""
    from matplotlib.ticker import MaxNLocator

    better = max if sweep.mode == "max" else min
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
    ax.set_ylabel(f"best {sweep.metric}")
    ax.set_title(f"{sweep.name}: optimisation history")
    ax.legend()


def _draw_lambda(ax, scored: list[TrialRow], sweep: SweepConfig) -> None:
    """λ against the best metric, one line per patch size, the baseline as a horizontal line."""
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
    ax.set_ylabel(f"best {sweep.metric}")
    ax.set_title(f"{sweep.name}: texture weight against {sweep.metric}")
    ax.legend()


def _draw_importance(ax, rows: list[TrialRow], sweep: SweepConfig) -> None:
    """One bar per searched key (:func:`param_importances`), or why there are none."""
    importances, method = param_importances(rows, sweep.search, sweep.mode, sweep.seed)
    if importances:
        keys = sorted(importances, key=importances.get)
        ax.barh(keys, [importances[k] for k in keys], color="tab:green")
        ax.set_xlabel("importance")
    else:
        ax.text(0.5, 0.5, f"no importances: {method}", ha="center", va="center")
        ax.set_axis_off()
    num_scored = len([r for r in rows if not r.baseline and r.best is not None])
    ax.set_title(f"{sweep.name}: parameter importance ({method}, {num_scored} trials)")


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    return path
