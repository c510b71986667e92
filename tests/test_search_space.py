"""The sweep's search space: parsing the YAML domains, checking them against the training config, and the Tune and
Optuna forms of one space."""

from __future__ import annotations

import pytest

from xswinir.config import ConfigError, load_config
from xswinir.tune.search_space import check_search_space, parse_search_space, to_optuna, to_tune


def test_unknown_search_key_is_refused_with_a_hint():
    with pytest.raises(ConfigError, match="did you mean 'loss.texture_weight'"):
        parse_search_space({"loss.texture_weigth": {"type": "loguniform", "low": 0.01, "high": 1}})


@pytest.mark.parametrize("spec, message", [
    ({"type": "loguniform", "low": 0, "high": 1}, "low > 0"),
    ({"type": "uniform", "low": 1, "high": 1}, "low < high"),
    ({"type": "choice", "values": []}, "non-empty"),
    ({"type": "gauss", "low": 0, "high": 1}, "unknown"),
    ({"type": "int", "low": 1.5, "high": 3}, "integer"),
    ({"type": "choice", "values": [1], "low": 0}, "not `low`"),
    ({"low": 0, "high": 1}, "needs a `type`"),
    ({"type": "uniform", "low": 0, "high": 1, "step": 2}, "unknown domain keys"),
])
def test_bad_domains(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_search_space({"train.lr": spec})


def test_domain_values_are_checked_against_the_config():
    base = load_config("demo")  # gt_size 64
    check_search_space(base, parse_search_space({"texture.patch_size": {"type": "choice", "values": [16, 32]}}))
    with pytest.raises(ConfigError, match="widest filter"):
        check_search_space(base, parse_search_space({"texture.patch_size": {"type": "choice", "values": [8, 16]}}))
    with pytest.raises(ConfigError, match="texture.patch_size=24"):
        check_search_space(base, parse_search_space({"texture.patch_size": {"type": "choice", "values": [16, 24]}}))
    with pytest.raises(ConfigError, match="train.batch_size"):
        check_search_space(base, parse_search_space({"train.batch_size": {"type": "choice", "values": ["big"]}}))


def test_tune_and_optuna_domains_agree():
    space = parse_search_space({
        "loss.texture_weight": {"type": "loguniform", "low": 0.01, "high": 1.0},
        "texture.patch_size": {"type": "choice", "values": [8, 16]},
        "texture.top_k": {"type": "int", "low": 2, "high": 8},
        "train.lr": {"type": "uniform", "low": 1e-4, "high": 1e-3},
    })
    from ray.tune.search.optuna import OptunaSearch

    # OptunaSearch's own conversion of the Tune domains is what the sweep samples from.
    assert OptunaSearch.convert_search_space(to_tune(space)) == to_optuna(space)
