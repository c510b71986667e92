"""The texture study's pre-registered rules as code: the screen's pick and the confirm stage's seed count, checked
against the cases docs/study_texture/PREREGISTRATION.md spells out."""

from __future__ import annotations

import numpy as np
import pytest

from xswinir.metrics import PSNR_Y, SSIM_Y
from xswinir.tune.prereg import (
    answer,
    bootstrap_interval,
    per_image_differences,
    pick,
    screened_arms,
    seeds_needed,
)

SETS = ("Set5", "skimage:val")


def summary(arms: dict[str, tuple[float, float, float, float]]) -> dict:
    """A study summary's ``differences``: per arm (ΔPSNR Set5, ΔPSNR photos, ΔSSIM Set5, ΔSSIM photos)."""
    rows = []
    for arm, (p5, pv, s5, sv) in arms.items():
        for hr_set, dp, ds in ((SETS[0], p5, s5), (SETS[1], pv, sv)):
            rows += [{"set": hr_set, "arm": arm, "metric": PSNR_Y, "mean": dp},
                     {"set": hr_set, "arm": arm, "metric": SSIM_Y, "mean": ds},
                     {"set": hr_set, "arm": arm, "metric": "vif_y", "mean": -1.0}]  # other metrics decide nothing
    return {"differences": rows}


WEIGHTS = {"lambda0": 0.0, "a_l0.1": 0.1, "b_l0.03": 0.03, "c_l0.3": 0.3}


def picked(arms: dict[str, tuple[float, float, float, float]]) -> str | None:
    winner = pick(screened_arms(summary(arms), {k: WEIGHTS[k] for k in ["lambda0", *arms]}, "lambda0"))
    return winner and winner.arm


def test_the_largest_mean_psnr_gain_over_both_sets_wins_among_arms_that_lose_no_ssim():
    # c has the largest score but loses SSIM on the photos: it does not qualify.
    assert picked({"a_l0.1": (0.02, 0.04, 0.001, 0.0), "b_l0.03": (0.05, 0.0, 0.0, 0.002),
                  "c_l0.3": (0.2, 0.2, 0.01, -0.0001)}) == "a_l0.1"
    # Each set weighs the same: +0.10 on Set5 and -0.02 on the photos (score 0.04) beats +0.03 / +0.03.
    assert picked({"a_l0.1": (0.03, 0.03, 0.0, 0.0), "b_l0.03": (0.10, -0.02, 0.0, 0.0)}) == "b_l0.03"


def test_no_arm_qualifies_when_none_gains_psnr_or_every_gain_costs_ssim():
    # The score must be above 0, not merely not below it.
    assert picked({"a_l0.1": (-0.01, 0.005, 0.001, 0.001), "b_l0.03": (0.0, 0.0, 0.0, 0.0)}) is None
    assert picked({"a_l0.1": (0.3, 0.3, -0.001, 0.01)}) is None


def test_ties_go_to_ssim_then_the_smaller_lambda_then_the_earlier_arm():
    # Scores within 0.001 dB are tied, whichever is larger.
    assert picked({"a_l0.1": (0.0504, 0.05, 0.002, 0.0), "b_l0.03": (0.05, 0.05, 0.001, 0.0)}) == "a_l0.1"
    assert picked({"a_l0.1": (0.0504, 0.05, 0.001, 0.0), "b_l0.03": (0.05, 0.05, 0.001, 0.0)}) == "b_l0.03"
    # Not a tie: scores 0.0015 dB apart (the mean over the two sets), the larger wins even with less SSIM.
    assert picked({"a_l0.1": (0.053, 0.05, 0.0, 0.0), "b_l0.03": (0.05, 0.05, 0.01, 0.0)}) == "a_l0.1"
    winner = pick(screened_arms(summary({"x": (0.05, 0.05, 0.0, 0.0), "y": (0.05, 0.05, 0.0, 0.0)}),
                                {"lambda0": 0.0, "x": 0.1, "y": 0.1}, "lambda0"))
    assert winner.arm == "x"


def test_an_arm_without_two_finished_seeds_stops_the_pick():
    partial = summary({"a_l0.1": (0.1, 0.1, 0.0, 0.0)})
    with pytest.raises(ValueError, match="'b_l0.03' has no paired difference"):
        screened_arms(partial, {"lambda0": 0.0, "a_l0.1": 0.1, "b_l0.03": 0.03}, "lambda0")


@pytest.mark.parametrize("sd, seeds", [(0.05, 8), (0.066, 10), (0.08, 13), (0.10, 18), (0.13, 24), (0.01, 8)])
def test_seed_counts_match_the_registered_table_and_stop_at_24(sd, seeds):
    assert seeds_needed(sd, have=8) == seeds


def test_bootstrap_pairs_arms_by_seed_and_image_and_is_repeatable():
    rows = []
    for seed in (0, 1, 2):
        for j, image in enumerate("abcd"):
            base = 25.0 + j + seed  # images and seeds differ far more than the arms: pairing must remove it
            rows.append({"arm": "lambda0", "seed": seed, "kind": "model", "set": "S", "image": image, "psnr_y": base})
            rows.append({"arm": "t", "seed": seed, "kind": "model", "set": "S", "image": image,
                         "psnr_y": base + 0.1 + 0.01 * seed})
            rows.append({"arm": "t", "seed": seed, "kind": "bicubic", "set": "S", "image": image, "psnr_y": 1.0})
    rows.append({"arm": "t", "seed": 3, "kind": "model", "set": "S", "image": "a", "psnr_y": 99.0})  # no partner
    seeds, images, diffs = per_image_differences(rows, "t", "lambda0", "S")
    assert seeds == [0, 1, 2] and images == ["a", "b", "c", "d"]
    assert np.allclose(diffs, [[0.10] * 4, [0.11] * 4, [0.12] * 4])
    low, high = bootstrap_interval(diffs, resamples=2000)
    assert 0.10 - 1e-9 <= low < 0.11 < high <= 0.12 + 1e-9  # within the seeds' spread, floats aside
    assert bootstrap_interval(diffs, resamples=2000) == (low, high)  # numpy's default_rng(0): the same draws


def test_answers_are_the_registered_sentences():
    assert answer(0.08, 0.03, 0.13, "pull_l0.1", "Sun80").startswith("yes: the texture term (pull_l0.1) raises")
    assert answer(-0.08, -0.13, -0.03, "pull_l0.1", "Sun80").startswith("no: it (pull_l0.1) lowers")
    assert answer(0.01, -0.04, 0.06, "pull_l0.1", "Sun80") == (
        "no detectable effect: Y-PSNR on Sun80 changes by +0.010 [-0.040, +0.060] dB (pull_l0.1)")
