"""The typed config: round trips, presets, overrides and the errors users see."""

from __future__ import annotations

import pytest

from xswinir.config import (
    MODEL_PRESETS,
    Config,
    ConfigError,
    apply_overrides,
    config_fields,
    load_config,
    parse_override,
    resolve_config_path,
)


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
