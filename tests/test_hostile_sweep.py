"""Hostile sweep YAMLs: every one either loads or is refused with one line naming the problem, before Ray.

Fifteen hand-written cases that used to end in tracebacks (several after Ray had started), then property-based
ones: hypothesis mutates a valid sweep file (a field replaced by any YAML value, an unknown key, a broken domain
or scheduler) and checks ``load_sweep_config`` and ``xswinir tune --config FILE`` against it.
"""

from __future__ import annotations

import copy
import string
from pathlib import Path
from unittest import mock

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from xswinir.errors import UserError
from xswinir.tune.sweep_config import SWEEP_METRICS, TEXTURE_WEIGHT, SweepConfig, load_sweep_config

VALID: dict = {
    "name": "hostile", "base": "demo", "overrides": ["train.total_steps=20", "train.val_every=10"],
    "search": {TEXTURE_WEIGHT: {"type": "loguniform", "low": 0.1, "high": 10.0},
               "texture.patch_size": {"type": "choice", "values": [16, 32]}},
    "num_samples": 4, "max_concurrent": 2, "seed": 0, "metric": "val/psnr_y", "mode": "max", "baseline": True,
    "scheduler": {"type": "asha", "grace_period": 10, "reduction_factor": 2}, "storage": "unused",
}


def _with(**changes) -> dict:
    data = copy.deepcopy(VALID)
    data.update(changes)
    return data


def _search(**domain) -> dict:
    return {TEXTURE_WEIGHT: {"type": "loguniform", "low": 0.1, "high": 10.0, **domain}}


# YAML text whose anchors expand to 9**6 (half a million) list items: a MemoryError before the limit.
ALIAS_BOMB = "name: bomb\nbase: demo\nsearch: {loss.texture_weight: {type: loguniform, low: 0.1, high: 1}}\n" + \
    "a0: &a0 [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 7))

CASES = [
    ("name_int", _with(name=5), "name must be a string"),
    ("name_null", _with(name=None), "name may not be null"),
    ("storage_int", _with(storage=5), "storage must be a string"),
    ("base_int", _with(base=5), "base must be a string"),
    ("seed_str", _with(seed="abc"), "seed must be an integer"),
    ("bounds_str", _with(search=_search(low="0.1")), "low must be a finite number"),
    ("mode_maxi", _with(mode="maxi"), "mode must be one of ['max', 'min']"),
    ("grace_negative", _with(scheduler={"grace_period": -1}), "scheduler.grace_period must be >= 1"),
    ("reduction_1", _with(scheduler={"reduction_factor": 1}), "scheduler.reduction_factor must be >= 2"),
    ("scheduler_str", _with(scheduler="asha"), "scheduler is a section"),
    ("metric_unreported", _with(metric="val/psnr_yy"), "did you mean 'val/psnr_y'"),
    ("unknown_key", _with(num_sample=3), "did you mean 'num_samples'"),
    ("grace_beyond_steps", _with(scheduler={"grace_period": 50}), "exceeds train.total_steps=20"),
    ("alias_bomb", ALIAS_BOMB, "expands to more than"),
    ("not_utf8", b"name: caf\xe9\n", "not UTF-8"),
]


def _write(path: Path, content) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    return path


def _cli_refuses(path: Path, capsys) -> str:
    """Runs ``xswinir tune --config path`` in-process; returns its one error line, failing if Ray starts."""
    import ray

    from xswinir.cli import main

    # Reaching Ray fails the test with an AssertionError, which the CLI would not turn into exit status 2.
    with mock.patch("ray.init", side_effect=AssertionError("Ray was started")), \
            mock.patch("xswinir.tune.launch.init_ray", side_effect=AssertionError("Ray was started")):
        code = main(["tune", "--config", str(path)])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, captured
    assert len(lines) == 1 and lines[0].startswith("xswinir tune: error: "), captured.err
    assert "Traceback" not in captured.err + captured.out and not ray.is_initialized()
    return lines[0]


@pytest.mark.parametrize("name, content, message", CASES, ids=[c[0] for c in CASES])
def test_hostile_sweep_file_is_one_line_before_ray(tmp_path, capsys, name, content, message):
    path = _write(tmp_path / f"{name}.yaml", content)
    with pytest.raises(UserError) as info:
        load_sweep_config(path)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert message in _cli_refuses(path, capsys)


# Any YAML value: what a typo, a wrong indent or a hostile file can put where a field should be.
_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(),
                     st.text(max_size=12), st.sampled_from(["", "..", "a/b", "val/psnr_y", "asha", "max", "demo"]))
ANY_VALUE = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=3)
                         | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)
TOP_KEYS = [*VALID, "address", "max_failures"]


@st.composite
def sweep_files(draw) -> tuple[str, str, dict]:
    """(kind, the field it changes, the sweep mapping): one mutation of VALID, or a valid variation of it."""
    data = copy.deepcopy(VALID)
    kind = draw(st.sampled_from(["field", "unknown key", "domain", "search key", "scheduler", "valid"]))
    if kind == "valid":
        low = draw(st.floats(1e-4, 1.0))
        data.update(
            num_samples=draw(st.integers(1, 100)), max_concurrent=draw(st.integers(1, 8)),
            seed=draw(st.integers(0, 2**32 - 1)), metric=draw(st.sampled_from(SWEEP_METRICS)),
            mode=draw(st.sampled_from(["max", "min"])), max_failures=draw(st.integers(-1, 3)),
            name=draw(st.text(string.ascii_letters + string.digits + "._-", min_size=1, max_size=30)
                      .filter(lambda n: n not in (".", ".."))),
            scheduler={"type": draw(st.sampled_from(["asha", "none"])), "grace_period": draw(st.integers(1, 20)),
                       "reduction_factor": draw(st.integers(2, 5))},
        )
        data["search"][TEXTURE_WEIGHT].update(low=low, high=low * draw(st.floats(1.01, 1e3)))
        return kind, "", data
    if kind == "field":
        key = draw(st.sampled_from(TOP_KEYS))
        data[key] = draw(ANY_VALUE)
        return kind, key, data
    if kind == "unknown key":
        key = draw(st.text(min_size=1, max_size=12).filter(lambda k: k not in TOP_KEYS))
        data[key] = draw(ANY_VALUE)
        return kind, key, data
    if kind == "domain":
        key = draw(st.sampled_from(list(VALID["search"])))
        field = draw(st.sampled_from(["type", "low", "high", "values", "step"]))
        data["search"][key][field] = draw(ANY_VALUE)
        return kind, "search", data
    if kind == "search key":
        new = draw(st.one_of(st.text(max_size=30), st.integers(), st.sampled_from(["loss.texture_weigth",
                                                                                   "train.lr", "run"])))
        data["search"][new] = data["search"].pop("texture.patch_size")
        return kind, "search", data
    field = draw(st.sampled_from(["type", "grace_period", "reduction_factor", "max_t"]))
    data["scheduler"][field] = draw(ANY_VALUE)
    return kind, "scheduler", data


def _load_or_refuse(tmp_path: Path, capsys, case: tuple[str, str, dict]) -> None:
    kind, field, data = case
    path = _write(tmp_path / "generated.yaml", data)
    try:
        sweep = load_sweep_config(path)
    except UserError as err:
        message = str(err)
        event(f"{kind}: refused")
        assert "\n" not in message, message
        if not field:
            raise AssertionError(f"a valid variation was refused: {message}") from err
        # The message names what is wrong: the field, or the section it lies in.
        named = str(field)[:20] in message or repr(field)[1:-1][:20] in message  # as written or escaped (long: cut)
        assert named or (kind == "search key" and "search" in message), message
        if kind in ("field", "scheduler"):  # the command line too, for a sample of kinds (it costs a parser)
            assert message in _cli_refuses(path, capsys)
        return
    event(f"{kind}: loaded")
    assert isinstance(sweep, SweepConfig)


_SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@settings(max_examples=40, **_SETTINGS)  # ~0.2 s each on 2 busy cores: the default run stays short
@given(case=sweep_files())
def test_generated_sweep_files_load_or_name_their_problem(tmp_path, capsys, case):
    _load_or_refuse(tmp_path, capsys, case)


@pytest.mark.slow
@settings(max_examples=600, **_SETTINGS)
@given(case=sweep_files())
def test_many_generated_sweep_files_load_or_name_their_problem(tmp_path, capsys, case):
    _load_or_refuse(tmp_path, capsys, case)
