"""The texture study's pre-registered decisions, as code: the screen's pick and the confirm stage's seed count.

``docs/study_texture/PREREGISTRATION.md`` wrote both rules down before any run; this module applies them to a
study's summary (:func:`xswinir.tune.study.summarise`) so that the decision is computed, printed and tested rather
than read off a table by hand. Nothing here looks at a set the rule does not name, and the seed count uses only
the spread of the paired differences, never their mean or sign.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from xswinir.metrics import PSNR_Y, SSIM_Y

# Scores closer than this are a tie (PREREGISTRATION.md, "The pick rule").
TIE_DB = 0.001
# The confirm stage's goal and budget (PREREGISTRATION.md, "Power").
HALF_WIDTH_GOAL_DB = 0.05
MAX_CONFIRM_SEEDS = 24


@dataclass(frozen=True)
class ScreenedArm:
    """One texture arm as the pick rule sees it: per set, the paired mean differences to the baseline."""

    arm: str
    weight: float  # loss.texture_weight, the rule's second tie-break
    order: int  # position in the study file, the last tie-break
    delta_psnr: dict[str, float]  # set -> mean over seeds of (arm - baseline) Y-PSNR
    delta_ssim: dict[str, float]

    @property
    def score(self) -> float:
        """The mean over the sets of ΔY-PSNR: each set weighs the same, whatever its number of images."""
        return sum(self.delta_psnr.values()) / len(self.delta_psnr)

    @property
    def mean_delta_ssim(self) -> float:
        return sum(self.delta_ssim.values()) / len(self.delta_ssim)

    @property
    def qualifies(self) -> bool:
        return self.score > 0 and all(value >= 0 for value in self.delta_ssim.values())


def screened_arms(summary: dict[str, Any], arms: dict[str, float], baseline: str) -> list[ScreenedArm]:
    """Every non-baseline arm of ``arms`` (name -> texture weight, in the study file's order) with its differences.

    Raises:
        ValueError: an arm lacks a paired difference on a set another arm has (the screen is not complete).
    """
    sets = list(dict.fromkeys(d["set"] for d in summary["differences"]))
    found = {(d["arm"], d["set"], d["metric"]): d["mean"] for d in summary["differences"]}
    screened = []
    for order, (arm, weight) in enumerate(arms.items()):
        if arm == baseline:
            continue
        missing = [s for s in sets for m in (PSNR_Y, SSIM_Y) if (arm, s, m) not in found]
        if missing or not sets:
            raise ValueError(f"arm {arm!r} has no paired difference on {missing or 'any set'}: the pick needs every "
                             "arm finished with at least 2 seeds")
        screened.append(ScreenedArm(arm, weight, order, {s: found[(arm, s, PSNR_Y)] for s in sets},
                                    {s: found[(arm, s, SSIM_Y)] for s in sets}))
    return screened


def pick(screened: list[ScreenedArm]) -> ScreenedArm | None:
    """The qualifying arm with the largest score, ties (< :data:`TIE_DB`) to the larger mean ΔSSIM, then the
    smaller λ, then the earlier arm; None when no arm qualifies (the confirm stage is then not run)."""
    best: ScreenedArm | None = None
    for arm in (a for a in screened if a.qualifies):
        if best is None or _beats(arm, best):
            best = arm
    return best


def _beats(a: ScreenedArm, b: ScreenedArm) -> bool:
    if abs(a.score - b.score) >= TIE_DB:
        return a.score > b.score
    if a.mean_delta_ssim != b.mean_delta_ssim:
        return a.mean_delta_ssim > b.mean_delta_ssim
    if a.weight != b.weight:
        return a.weight < b.weight
    return a.order < b.order


def format_pick(screened: list[ScreenedArm], picked: ScreenedArm | None, display: Any = str) -> str:
    """The rule's table (one row per arm, the sets' ΔPSNR and ΔSSIM, score, whether it qualifies) and its verdict."""
    sets = list(screened[0].delta_psnr) if screened else []
    head = " | ".join(f"ΔPSNR {display(s)} | ΔSSIM {display(s)}" for s in sets)
    lines = [f"| arm | λ | {head} | score (dB) | qualifies |", "|---|---|" + "---|---|" * len(sets) + "---|---|"]
    for arm in sorted(screened, key=lambda a: -a.score):
        cells = " | ".join(f"{arm.delta_psnr[s]:+.4f} | {arm.delta_ssim[s]:+.5f}" for s in sets)
        mark = " (picked)" if arm is picked else ""
        lines.append(f"| {arm.arm}{mark} | {arm.weight:g} | {cells} | {arm.score:+.4f} | "
                     f"{'yes' if arm.qualifies else 'no'} |")
    verdict = (f"picked: {picked.arm} (score {picked.score:+.4f} dB)" if picked else
               "no arm qualifies: the confirm stage is not run; the answer is \"no: no texture arm beat λ = 0 in "
               "the screen\"")
    return "\n".join([*lines, "", verdict])


def half_width(sd: float, n: int) -> float:
    """The 95 % t interval's half-width of a mean of ``n`` paired differences with standard deviation ``sd``."""
    from scipy import stats

    return float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)


def seeds_needed(sd: float, have: int, goal: float = HALF_WIDTH_GOAL_DB, cap: int = MAX_CONFIRM_SEEDS) -> int:
    """The smallest seed count ≥ ``have`` whose interval half-width is ≤ ``goal`` at this ``sd``, at most ``cap``.

    Uses the spread alone (a variance-based re-estimation of the sample size), never the mean.
    """
    if have < 2:
        raise ValueError(f"the spread of paired differences needs at least 2 seeds, got {have}")
    n = have
    while n < cap and half_width(sd, n) > goal:
        n += 1
    return n


# The per-image bootstrap of the confirm stage (PREREGISTRATION.md, "Secondary").
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0


def per_image_differences(rows: list[dict[str, Any]], arm: str, baseline: str, hr_set: str,
                          metric: str = PSNR_Y) -> tuple[list[int], list[str], Any]:
    """``(seeds, images, D)``: D[i, j] = arm minus baseline on image j with seed i, for the seeds both arms finished
    with every image of ``hr_set`` (model rows only)."""
    import numpy as np

    values: dict[tuple[str, int, str], float] = {(r["arm"], r["seed"], r["image"]): r[metric] for r in rows
                                                 if r["kind"] == "model" and r["set"] == hr_set
                                                 and r.get(metric) is not None}
    images = sorted({image for (_, _, image) in values})
    seeds = sorted(s for s in {s for (_, s, _) in values}
                   if all((a, s, image) in values for a in (arm, baseline) for image in images))
    diffs = np.array([[values[(arm, s, image)] - values[(baseline, s, image)] for image in images] for s in seeds])
    return seeds, images, diffs


def bootstrap_interval(diffs: Any, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED
                       ) -> tuple[float, float]:
    """95 % percentile interval of the mean of ``diffs`` (seeds x images), resampling seeds with replacement and
    then images with replacement; one draw serves both arms, since ``diffs`` already pairs them."""
    import numpy as np

    rng = np.random.default_rng(seed)
    n_seeds, n_images = diffs.shape
    means = np.empty(resamples)
    for k in range(resamples):
        seeds = rng.integers(0, n_seeds, n_seeds)
        images = rng.integers(0, n_images, n_images)
        means[k] = diffs[np.ix_(seeds, images)].mean()
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def answer(mean: float, low: float, high: float, arm: str, hr_set: str) -> str:
    """The registered answer sentence for the primary interval."""
    figure = f"{mean:+.3f} [{low:+.3f}, {high:+.3f}] dB"
    if low > 0:
        return f"yes: the texture term ({arm}) raises Y-PSNR on {hr_set} by {figure}"
    if high < 0:
        return f"no: it ({arm}) lowers Y-PSNR on {hr_set} by {figure}"
    return f"no detectable effect: Y-PSNR on {hr_set} changes by {figure} ({arm})"
