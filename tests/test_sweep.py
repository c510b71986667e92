"""The sweep's searcher without Ray's Tuner: the λ = 0 baseline kept away from Optuna, seeded proposals (the real
Ray sweep: tests/integration/test_sweep_ray.py)."""

from __future__ import annotations

from xswinir.metrics import VAL_PSNR_Y
from xswinir.tune.search_space import parse_search_space, to_tune
from xswinir.tune.sweep import BaselineFirst
from xswinir.tune.sweep_config import TEXTURE_WEIGHT


def test_baseline_first_keeps_lambda_zero_away_from_optuna():
    from ray.tune.search.optuna import OptunaSearch

    space = parse_search_space({TEXTURE_WEIGHT: {"type": "loguniform", "low": 0.01, "high": 1.0},
                                "texture.patch_size": {"type": "choice", "values": [16, 32]}})
    inner = OptunaSearch(space=to_tune(space), metric=VAL_PSNR_Y, mode="max", seed=0)
    searcher = BaselineFirst(inner, {TEXTURE_WEIGHT: 0.0})
    assert searcher.suggest("a") == {TEXTURE_WEIGHT: 0.0}
    proposal = searcher.suggest("b")
    assert 0.01 <= proposal[TEXTURE_WEIGHT] <= 1.0 and proposal["texture.patch_size"] in (16, 32)
    searcher.on_trial_result("a", {VAL_PSNR_Y: 30.0, "training_iteration": 1})
    searcher.on_trial_complete("a", {VAL_PSNR_Y: 30.0})
    searcher.on_trial_complete("b", {VAL_PSNR_Y: 29.0})
    # Optuna's study holds only the trial it proposed; the baseline never entered its TPE model.
    values = [t.params[TEXTURE_WEIGHT] for t in inner._ot_study.trials]
    assert values == [proposal[TEXTURE_WEIGHT]]
    # The wrapper's state travels through Tune's get_state/set_state: a restored sweep re-issues no baseline.
    fresh = BaselineFirst(inner, {TEXTURE_WEIGHT: 0.0})
    fresh.set_state(searcher.get_state())
    assert fresh.suggest("c")[TEXTURE_WEIGHT] > 0


def test_seeded_tpe_proposes_the_same_sweep():
    from ray.tune.search.optuna import OptunaSearch

    space = to_tune(parse_search_space({TEXTURE_WEIGHT: {"type": "loguniform", "low": 0.01, "high": 1.0}}))
    runs = []
    for _ in range(2):
        searcher = BaselineFirst(OptunaSearch(space=space, metric=VAL_PSNR_Y, mode="max", seed=3), None)
        runs.append([searcher.suggest(f"t{i}")[TEXTURE_WEIGHT] for i in range(3)])
    assert runs[0] == runs[1]
