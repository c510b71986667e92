"""The sweep YAML: the shipped sweep, what the command line adds to a file, one-line errors, and the metrics a
sweep may optimise."""

from __future__ import annotations

import re

import pytest
import torch
import yaml

from xswinir.config import ConfigError, config_fields, resolve_config_path
from xswinir.evaluation import ValidationSet, validate
from xswinir.metrics import VAL_PSNR_Y
from xswinir.model import build_swinir
from xswinir.model_spec import MODEL_PRESETS
from xswinir.tune.sweep_config import SWEEP_METRICS, TEXTURE_WEIGHT, SweepConfig, load_sweep_config

LAMBDA_SEARCH = {TEXTURE_WEIGHT: {"type": "loguniform", "low": 0.01, "high": 1.0}}


def test_shipped_sweep_keys_are_config_fields():
    sweep = load_sweep_config("sweep_demo")
    fields = set(config_fields())
    assert sweep.search and set(sweep.search) <= fields
    assert TEXTURE_WEIGHT in sweep.search and sweep.search[TEXTURE_WEIGHT].type == "loguniform"
    assert sweep.baseline and sweep.num_samples == 4 and sweep.metric == VAL_PSNR_Y
    for override in sweep.overrides:
        assert override.split("=", 1)[0] in fields


def test_command_line_values_join_the_file(tmp_path, monkeypatch):
    """Flags replace the file's values where given; --set comes after the file's overrides; a base given as a
    path is found beside the sweep file, wherever the command runs."""
    base = yaml.safe_load(resolve_config_path("demo").read_text())
    base.setdefault("train", {})["total_steps"] = 300
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"base": "base.yaml", "overrides": ["train.total_steps=400"], "num_samples": 3,
                                    "search": LAMBDA_SEARCH}))
    monkeypatch.chdir(tmp_path.parent)
    sweep = load_sweep_config(path, ["train.total_steps=500", "train.lr=1e-3"], num_samples=5, storage=None)
    assert sweep.overrides == ("train.total_steps=400", "train.total_steps=500", "train.lr=1e-3")
    assert sweep.num_samples == 5 and sweep.storage == SweepConfig.storage  # None keeps the file's (the default)
    assert sweep.base_config().train.total_steps == 500 and sweep.base_config().train.lr == 1e-3
    assert load_sweep_config(path).base_config().train.total_steps == 400

    path.write_text(yaml.safe_dump({"base": "demo", "overrides": "train.lr=1e-3", "search": LAMBDA_SEARCH}))
    with pytest.raises(ConfigError, match=re.escape("s.yaml: overrides must be a list")):
        load_sweep_config(path)


def test_sweep_yaml_errors(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"base": "demo", "search": {"train.lr": {"type": "uniform", "low": 1e-4,
                                                                               "high": 1e-3}}}))
    with pytest.raises(ConfigError, match="baseline: true needs loss.texture_weight"):
        load_sweep_config(path)
    path.write_text(yaml.safe_dump({"base": "demo", "samples": 3, "search": {}}))
    with pytest.raises(ConfigError, match="unknown config key 'samples'; did you mean 'num_samples'"):
        load_sweep_config(path)
    path.write_text(yaml.safe_dump({"base": "demo", "baseline": False, "overrides": ["train.nope=1"],
                                    "search": {"train.lr": {"type": "uniform", "low": 1e-4, "high": 1e-3}}}))
    with pytest.raises(ConfigError, match="s.yaml: overrides: .*nope"):
        load_sweep_config(path)
    # An empty override names the field it sits in (the slow tier's generated sweep files found it unnamed).
    path.write_text(yaml.safe_dump({"base": "demo", "overrides": [""], "search": LAMBDA_SEARCH}))
    with pytest.raises(ConfigError, match="s.yaml: overrides: override '' is not of the form section.key=value"):
        load_sweep_config(path)
    path.write_text(yaml.safe_dump({"base": "no-such-base", "search": LAMBDA_SEARCH}))
    with pytest.raises(ConfigError, match="s.yaml: base: .*no-such-base"):
        load_sweep_config(path)


def test_sweep_metrics_are_what_validation_reports():
    """The metrics a sweep accepts are keys of the dict train_loop_per_worker reports at every validation."""
    gt = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    val = ValidationSet(["a"], [gt], [torch.nn.functional.avg_pool2d(gt, 2)])
    reported = validate(build_swinir(MODEL_PRESETS["tiny-x2"]), val, scale=2, tile=None)
    assert set(SWEEP_METRICS) <= set(reported)
