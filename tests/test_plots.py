"""The sweep's pictures: which searched key moves the metric (Optuna's fANOVA, or the rank-correlation fallback)."""

from __future__ import annotations

import math

import optuna

from xswinir.tune.plots import param_importances
from xswinir.tune.search_space import Domain
from xswinir.tune.sweep_config import TEXTURE_WEIGHT
from xswinir.tune.trials import TrialRow

SPACE = {TEXTURE_WEIGHT: Domain("loguniform", 0.01, 1.0), "train.lr": Domain("uniform", 1e-4, 1e-3)}
# Five trials: λ in increasing order, the learning rate in no order.
SAMPLES = [(0.01, 5e-4), (0.03, 2e-4), (0.1, 9e-4), (0.3, 4e-4), (1.0, 6e-4)]


def _rows(metric_of_index_and_lambda) -> list[TrialRow]:
    """One completed trial per sample, its best metric ``metric_of_index_and_lambda(i, λ)``."""
    rows = []
    for i, (lam, lr) in enumerate(SAMPLES):
        best = metric_of_index_and_lambda(i, lam)
        rows.append(TrialRow(trial_id=f"t_{i:05d}", order=i, baseline=False, texture_weight=lam, patch_size=16,
                             params={TEXTURE_WEIGHT: lam, "texture.patch_size": 16, "train.lr": lr}, best=best,
                             final=best, steps=10, status="completed", error=None, history_step=[10],
                             history_metric=[best]))
    return rows


def test_importance_ranks_the_key_that_moves_the_metric():
    rows = _rows(lambda i, lam: 31.0 + 2 * math.log10(lam))  # PSNR rises with log λ; the learning rate is noise
    importances, method = param_importances(rows, SPACE, "max", seed=0)
    assert importances[TEXTURE_WEIGHT] > importances.get("train.lr", 0.0), (importances, method)
    assert math.isclose(sum(importances.values()), 1.0, rel_tol=1e-6)


def test_importance_falls_back_to_rank_correlation(monkeypatch):
    def unavailable(*args, **kwargs):
        raise ImportError("no evaluator")

    monkeypatch.setattr(optuna.importance, "get_param_importances", unavailable)
    # PSNR rises monotonically with λ (|rho| = 1) and is unrelated to the learning rate's order.
    importances, method = param_importances(_rows(lambda i, lam: 30.0 + i), SPACE, "max", seed=0)
    assert method == "|Spearman rank correlation|"
    assert importances[TEXTURE_WEIGHT] > importances["train.lr"]
    assert math.isclose(sum(importances.values()), 1.0, rel_tol=1e-6)
