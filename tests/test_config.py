"""The typed config: round trips, presets, overrides and the errors users see."""

from __future__ import annotations

import re
import time

import pytest

from xswinir.config import (
    Config,
    ConfigError,
    apply_overrides,
    config_fields,
    load_config,
    parse_override,
    resolve_config_path,
)
from xswinir.model_spec import MODEL_PRESETS


def test_defaults_round_trip_through_dict_and_yaml(tmp_path):
    cfg = Config()
    assert Config.from_dict(cfg.to_dict()) == cfg
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg


@pytest.mark.parametrize("name", ["demo", "swinir_s_x2", "xswinir_blur_noise"])
def test_shipped_configs_load(name):
    cfg = load_config(name)
    assert Config.from_dict(cfg.to_dict()) == cfg
    assert resolve_config_path(name).suffix == ".yaml"


def test_published_swinir_s_x2_setup():
    cfg = load_config("swinir_s_x2")
    assert cfg.model == MODEL_PRESETS["swinir-s-x2"]
    assert cfg.data.gt_size // cfg.scale == 64
    assert (cfg.train.batch_size, cfg.train.lr, cfg.train.ema_decay) == (64, 2e-4, 0.999)
    assert cfg.train.milestones == (250_000, 400_000, 450_000, 475_000)
    assert cfg.degradation.resize == "matlab"


def test_preset_then_field_overrides():
    cfg = load_config(None, ["model.depths=[6,6]", "model.preset=swinir-m-x4", "model.num_heads=[6,6]",
                             "data.gt_size=96"])
    assert cfg.model.upscale == 4 and cfg.model.embed_dim == 180
    assert cfg.model.depths == (6, 6)  # applied after the preset, whatever the order on the command line


def test_yaml_preset_with_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("degradation:\n  preset: realistic\n  jpeg_prob: 0.5\n")
    cfg = load_config(path)
    assert cfg.degradation.second_order_prob == 0.8 and cfg.degradation.jpeg_prob == 0.5


def test_overrides_parse_yaml_values():
    assert parse_override("train.lr=1e-4") == (["train", "lr"], 1e-4)
    assert parse_override("data.val_tile=null") == (["data", "val_tile"], None)
    assert parse_override("train.milestones=[1, 2]") == (["train", "milestones"], [1, 2])
    cfg = apply_overrides(Config(), {"loss.texture_weight": 0.3, "texture.patch_size": 32})
    assert cfg.loss.texture_weight == 0.3 and cfg.texture.patch_size == 32


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lrr=1", "unknown config key 'train.lrr'; did you mean 'lr'"),
        ("trian.lr=1", "unknown config key 'trian'"),
        ("train.lr=fast", "train.lr must be a number"),
        ("train.total_steps=1.5", "train.total_steps must be an integer"),
        ("train.bf16=yes please", "train.bf16 must be true or false"),
        ("model.upsampler=magic", "model.upsampler must be one of"),
        ("model.preset=swinir-xl", "unknown"),
        ("data.gt_size=65", "not a multiple of model.upscale"),
        ("train.milestones=[3, 1]", "must be increasing"),
        ("degradation.noise_prob=2", "must lie in [0, 1]"),
        ("train.lr", "not of the form"),
    ],
)
def test_bad_values_are_refused_with_clear_messages(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(None, [override])


def test_cross_section_rules():
    with pytest.raises(ConfigError, match="does not split evenly"):
        load_config(None, ["train.batch_size=6", "run.num_workers=4"])
    with pytest.raises(ConfigError, match="not a multiple of texture.patch_size"):
        load_config(None, ["loss.texture_weight=0.1", "data.gt_size=48", "texture.patch_size=32"])


def test_missing_config_file_names_the_shipped_ones():
    with pytest.raises(ConfigError, match="demo"):
        load_config("no_such_config.yaml")


def test_config_fields_cover_nested_sections():
    keys = config_fields()
    assert "texture.classifier.num_pairs" in keys and "loss.texture_weight" in keys
    for key in keys:  # every listed key can be overridden by itself
        section = key.split(".")[0]
        assert section in Config().to_dict()


def test_texture_patch_must_hold_the_classifiers_widest_filter():
    with pytest.raises(ConfigError, match="widest filter"):
        load_config("demo", ["texture.patch_size=8"])
    # With the texture term off the patch size is unused and not checked.
    assert load_config("demo", ["texture.patch_size=8", "loss.texture_weight=0"]).texture.patch_size == 8


# Every value is range-checked before anything runs: a bad one would otherwise fail later, inside a Ray worker.


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.gt_size=0"], "data.gt_size must be >= 1"),
        (["data.gt_size=-64"], "data.gt_size must be >= 1"),
        (["train.lr=.nan"], "train.lr must be a finite number"),
        (["train.lr=.inf"], "train.lr must be a finite number"),
        (["train.lr=1e400"], "train.lr must be a finite number"),
        (["loss.texture_weight=.nan"], "loss.texture_weight must be a finite number"),
        (["model.depths=[]", "model.num_heads=[]"], "must be non-empty"),
        (["model.embed_dim=0"], "model.embed_dim must be >= 1"),
        (["model.num_heads=[0, 0, 0, 0]"], "model.num_heads must be >= 1"),
        (["model.mlp_ratio=0"], "model.mlp_ratio"),
        (["model.img_range=-1"], "model.img_range"),
        (["degradation.noise_sigma=[-5, 10]"], "degradation.noise_sigma must be >= 0"),
        (["degradation.second_noise_sigma=[-1, 0]"], "degradation.second_noise_sigma must be >= 0"),
        (["degradation.blur_kernel_size=-3"], "degradation.blur_kernel_size must be odd and >= 1"),
        (["degradation.motion_kernel_size=-1"], "degradation.motion_kernel_size must be odd and >= 1"),
        (["degradation.blur_sigma=[0, 1]"], "degradation.blur_sigma must be > 0"),
        (["degradation.jpeg_quality=[0, 200]"], "degradation.jpeg_quality must lie in [1, 100]"),
        (["degradation.blur_sigma=[.nan, 1]"], "must be a finite number"),
        (["run.keep_checkpoints=0"], "run.keep_checkpoints must be >= 1"),
        (["run.name=../escape"], "run.name must be"),
        (["run.name=a/b"], "run.name must be"),
        (["run.name=.."], "run.name must be"),
        (["run.storage="], "run.storage"),
        (["train.betas=[0.9, 1.5]"], "train.betas"),
        (["train.grad_clip=0"], "train.grad_clip"),
        (["train.gamma=-1"], "train.gamma"),
        (["train.seed=-1"], "seed must be >= 0"),
        (["loss.charbonnier_eps=0"], "loss.charbonnier_eps"),
        (["data.val_tile=0"], "data.val_tile"),
        (["texture.region_size=8"], "texture.region_size"),
        (["data.gt_size=100000000000000000000000"], "must fit in 64 bits"),
    ],
)
def test_out_of_range_values_are_refused_before_anything_runs(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, overrides)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("texture.classifier=5", "texture.classifier is a section, not a value"),
        ("texture=3", "texture is a section, not a value"),
        ("texture.classifier.path.x=1", "texture.classifier.path is a value, not a section"),
        ("model.depths.x=1", "model.depths is a value, not a section"),
        ("run.name.x.y=2", "run.name is a value, not a section"),
        ("model.preset=[1]", "model.preset [1] is unknown"),
    ],
)
def test_overrides_that_do_not_fit_the_tree_are_one_line_errors(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override])


def test_texture_enabled_is_the_one_rule():
    assert not Config().texture_enabled
    assert apply_overrides(Config(), {"loss.texture_weight": 1e-6}).texture_enabled


# Hostile YAML: aliases that expand, recursive anchors, huge values, files that are not UTF-8.


def _billion_laughs(levels: int = 9) -> str:
    anchors = ["&a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    anchors += [f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return f"run:\n  name: [{', '.join(anchors)}]\n"


def test_nested_aliases_are_refused_quickly_with_a_short_message(tmp_path):
    path = tmp_path / "laughs.yaml"
    path.write_text(_billion_laughs())  # ~400 bytes that expand to 9**9 values
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="expands to more than") as info:
        load_config(path)
    assert time.perf_counter() - start < 2 and len(str(info.value)) < 400
    with pytest.raises(ConfigError, match="expands to more than"):
        parse_override("run.name=" + _billion_laughs().split("name: ", 1)[1])


def test_a_few_aliases_are_fine_and_recursive_ones_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  milestones: &m [10, 20]\n  betas: [0.9, 0.99]\nrun:\n  name: n\n")
    assert load_config(path).train.milestones == (10, 20)
    path.write_text("run: &r\n  name: *r\n")
    with pytest.raises(ConfigError, match="recursive"):
        load_config(path)


def test_error_messages_never_repeat_a_long_value(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(f"run:\n  name: {[list(range(100))] * 50}\n")
    with pytest.raises(ConfigError, match="run.name must be a string") as info:
        load_config(path)
    assert len(str(info.value)) < len(str(path)) + 200
    with pytest.raises(ConfigError) as info:
        load_config(None, ["run.name=" + "x" * 100_000])
    assert len(str(info.value)) < 400


def test_a_config_that_is_not_utf8_is_a_one_line_error(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("run:\n  name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"is not UTF-8 text \(byte 16"):
        load_config(path)
    path.write_bytes(b"a: 1\n" + b"#" * 2_000_000)
    with pytest.raises(ConfigError, match="at most 1,000,000"):
        load_config(path)
