"""Generated hostile input: config files, ``--set`` strings and safetensors metadata.

Every case goes through the real command in-process (``xswinir.cli.main``) and must end with exit status 0
or 2, no traceback, and for 2 one line that names the problem. ``train`` runs with ``--print-config``, which
returns before Ray is imported, so a valid generated config never starts a run. Hypothesis is derandomised
(the same cases every run) and keeps no example database.
"""

from __future__ import annotations

import collections
import dataclasses
import json

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import save_file

from xswinir.cli import main
from xswinir.config import Config, config_fields, load_config
from xswinir.model_spec import MODEL_PRESETS, ModelConfig

SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
OUTCOMES: collections.Counter[str] = collections.Counter()

HOSTILE_SCALARS = st.one_of(
    st.none(), st.booleans(),
    st.sampled_from([0, -1, 1, 2, 3, 4, 7, 8, 16, 32, 10**9, 2**40, -(2**70), 10**30]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["../x", "a/b", "", ".", "..", "pixelshuffle", "nearest+conv", "swinir-s-x2", "realistic",
                     "skimage:val", "s3://b/r", "x" * 500]),
)
HOSTILE = st.one_of(HOSTILE_SCALARS, st.lists(HOSTILE_SCALARS, max_size=5),
                    st.dictionaries(st.text(max_size=5), HOSTILE_SCALARS, max_size=3))


def _field_values(section: object) -> dict[str, st.SearchStrategy]:
    """Per field: its default (so that some generated configs are valid) or a hostile value."""
    out = {}
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            out[f.name] = st.one_of(_section(value), HOSTILE)
        else:
            plain = list(value) if isinstance(value, tuple) else value
            out[f.name] = st.one_of(st.just(plain), st.just(plain), HOSTILE)
    return out


def _section(section: object) -> st.SearchStrategy[dict]:
    values = _field_values(section)
    keys = st.lists(st.sampled_from([*values, "bogus"]), max_size=3, unique=True)
    return keys.flatmap(lambda ks: st.fixed_dictionaries({k: values.get(k, HOSTILE) for k in ks}))


CONFIGS = st.one_of(
    st.dictionaries(st.sampled_from([f.name for f in dataclasses.fields(Config)] + ["bogus"]),
                    st.just(None), max_size=0),
    st.lists(st.sampled_from([f.name for f in dataclasses.fields(Config)] + ["bogus"]), min_size=1, max_size=3,
             unique=True).flatmap(lambda names: st.fixed_dictionaries(
                 {n: _section(getattr(Config(), n)) if hasattr(Config(), n) else HOSTILE for n in names})),
    HOSTILE,
)


def _keys(data: object) -> set[str]:
    """Every key and string inside ``data``: what an error message may name."""
    found: set[str] = set()
    if isinstance(data, dict):
        for k, v in data.items():
            found.add(str(k))
            found |= _keys(v)
    elif isinstance(data, list):
        for v in data:
            found |= _keys(v)
    return found


def _run(capsys, argv: list[str]) -> tuple[int, str]:
    code = main(argv)
    captured = capsys.readouterr()
    assert code in (0, 2), (argv, captured.err)
    assert "Traceback" not in captured.err + captured.out
    return code, captured.err.strip()


def _one_line_error(err: str, command: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"xswinir {command}: error: "), err
    return lines[0]


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    print(f"\nhostile cases: {dict(sorted(OUTCOMES.items()))}")


@settings(max_examples=40, **SETTINGS)
@given(data=CONFIGS)
def test_generated_config_files(tmp_path, capsys, data):
    path = tmp_path / "generated.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    code, err = _run(capsys, ["train", "--config", str(path), "--print-config"])
    OUTCOMES[f"config file -> {code}"] += 1
    if code == 0:
        assert load_config(path).to_dict() == Config.from_dict(data or {}).to_dict()
        return
    line = _one_line_error(err, "train")
    assert str(path) in line or "mapping" in line
    if isinstance(data, dict) and data:
        assert any(key in line for key in _keys(data) | {"config", "mapping"}), line


KEYS = st.sampled_from(config_fields() + [f.name for f in dataclasses.fields(Config)] + [
    "texture.classifier", "model.depths.x", "texture.classifier.path.x", "a.b", "run.name.x.y", ".", "model.",
])
VALUES = st.one_of(
    st.text(max_size=20),
    st.sampled_from([".nan", ".inf", "-.inf", "-1", "0", "1", "[0]", "[]", "[0, 0, 0, 0]", "{a: 1}", "&a [*a, *a]",
                     "1e400", "1e-4", "null", "[6, 6]", "../x", "'", "{", "!!python/object/apply:os.system [id]",
                     "swinir-m-x4", "true", "2.5", "[1, [2, [3]]]"]),
)


def _default_text(key: str) -> str | None:
    """The key's default as YAML flow text (a valid override), or None for a key that is not a leaf."""
    node: object = Config().to_dict()
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    if isinstance(node, dict):
        return None
    return yaml.safe_dump(node, default_flow_style=True).removesuffix("...\n").strip()


@settings(max_examples=60, **SETTINGS)
@given(key=KEYS, value=VALUES, with_equals=st.booleans(), keep_default=st.booleans())
def test_generated_set_overrides(capsys, key, value, with_equals, keep_default):
    if keep_default and _default_text(key) is not None:
        value = _default_text(key)  # a valid override, so that both outcomes are exercised
    text = f"{key}={value}" if with_equals else key + value
    code, err = _run(capsys, ["train", f"--set={text}", "--print-config"])
    OUTCOMES[f"--set -> {code}"] += 1
    if code == 2:
        line = _one_line_error(err, "train")
        assert key.split(".")[0] in line or "override" in line, line


MODEL_FIELDS = {f.name: f for f in dataclasses.fields(ModelConfig)}
TINY = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(MODEL_PRESETS["tiny-x2"]).items()}
METADATA = st.one_of(
    st.lists(st.sampled_from([*MODEL_FIELDS, "bogus"]), max_size=4, unique=True).flatmap(
        lambda ks: st.fixed_dictionaries({k: st.one_of(st.just(TINY.get(k)), HOSTILE) for k in ks})
    ).map(lambda changed: json.dumps({**TINY, **changed})),
    HOSTILE.map(json.dumps),
    st.sampled_from(["not json", "{", "[" * 100_000, "NaN", '{"embed_dim": 1e999}', "", "null"]),
)


@pytest.fixture(scope="module")
def tiny_image(tmp_path_factory):
    path = tmp_path_factory.mktemp("image") / "in.png"
    Image.new("RGB", (8, 8), (120, 60, 30)).save(path)
    return path


@settings(max_examples=40, **SETTINGS)
@given(metadata=METADATA)
def test_generated_safetensors_metadata(tmp_path, capsys, tiny_image, metadata):
    checkpoint = tmp_path / "model.safetensors"
    save_file({"x": torch.zeros(1)}, str(checkpoint),
              metadata={"model_config": metadata, "format": "xswinir"})
    code, err = _run(capsys, ["upscale", str(tiny_image), "--checkpoint", str(checkpoint),
                              "--out", str(tmp_path / "out"), "--device", "cpu", "--overwrite"])
    assert code == 2  # no metadata here fits the one-tensor file
    assert err.startswith("xswinir upscale: error: ") and str(checkpoint) in err.splitlines()[0], err
    if "metadata is not usable" in err or "carries no model config" in err:  # refused before a model is built
        OUTCOMES["safetensors -> 2, metadata refused"] += 1
        _one_line_error(err, "upscale")
    else:  # a model the metadata describes was built and the weights do not fit it (a multi-line report)
        OUTCOMES["safetensors -> 2, weights do not fit"] += 1
        assert "does not fit" in err, err


def test_crafted_metadata_cannot_ask_for_a_huge_model(tmp_path, capsys, tiny_image):
    for config, message in [
        ({**TINY, "embed_dim": 2**20, "num_heads": [1, 1]}, "parameters, more than"),
        ({**TINY, "num_heads": [0, 0]}, "model.num_heads must be >= 1"),
        ([1, 2, 3], "must be a mapping"),
        ({**TINY, "upscale": "x2"}, "model.upscale must be an integer"),
    ]:
        checkpoint = tmp_path / "model.safetensors"
        save_file({"x": torch.zeros(1)}, str(checkpoint), metadata={"model_config": json.dumps(config)})
        code, err = _run(capsys, ["upscale", str(tiny_image), "--checkpoint", str(checkpoint),
                                  "--out", str(tmp_path / "out"), "--device", "cpu"])
        line = _one_line_error(err, "upscale")
        assert code == 2 and str(checkpoint) in line and message in line, line


