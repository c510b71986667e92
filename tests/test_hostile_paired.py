"""Hostile paired folders (``data.train_lq``, ``pack --lq``): random sizes, partners missing, misnamed, of the
wrong size or not images at all.

Property-based (hypothesis, as the other ``test_hostile_*`` files): whatever the folders hold, the check the
driver runs before Ray names exactly the images the training workers would skip, refuses the run in one line
when none is left, and ``pack --lq`` packs the usable pairs, names the others and never prints a traceback.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from xswinir.cli import main
from xswinir.data import DataError, PatchCutter, PatchDataset, check_train_source, open_images
from xswinir.shards import ShardImages
from xswinir.sources import IMAGE_SUFFIXES

SCALE = 2
PATCH = 16  # the tiny config's data.gt_size

# One HR image: its size, what its LQ partner is, and the stem the partner is saved under.
_PAIR = st.tuples(
    st.integers(1, 44), st.integers(1, 44),
    st.sampled_from(["exact", "exact", "exact", "wider", "taller", "missing", "not_an_image", "hr_not_an_image"]),
    st.sampled_from(["{}x2", "{}_x2", "{}", "{}x3", "other_{}"]),  # the last two are not partners
)
_FOLDERS = st.lists(_PAIR, min_size=1, max_size=5)
_SETTINGS = settings(max_examples=25, deadline=None, derandomize=True,
                     suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(autouse=True)
def console_logging():
    """Each ``main`` call sets up logging on the stderr of the moment (capsys's), not a closed earlier one."""
    saved = logging.root.handlers[:]
    logging.root.handlers.clear()
    yield
    logging.root.handlers[:] = saved


def _write(root: Path, pairs: list[tuple]) -> tuple[Path, Path, dict[str, str]]:
    """HR and LQ folders for ``pairs``; returns them and, per HR file, why it is unusable ('' when usable)."""
    folder = root / os.urandom(6).hex()
    hr, lq = folder / "hr", folder / "lq"
    hr.mkdir(parents=True)
    lq.mkdir()
    rng = np.random.default_rng(len(pairs))
    expected = {}
    for k, (h, w, kind, naming) in enumerate(pairs):
        stem = f"img{k}"
        if kind == "hr_not_an_image":
            (hr / f"{stem}.png").write_bytes(b"\x89PNG not really")
        else:
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(hr / f"{stem}.png")
        lq_h, lq_w = h // SCALE + (kind == "taller"), w // SCALE + (kind == "wider")
        partner = lq / f"{naming.format(stem)}.png"
        if kind == "not_an_image":
            partner.write_bytes(b"GIF89a broken")
        elif kind != "missing" and lq_h > 0 and lq_w > 0:
            Image.fromarray(rng.integers(0, 256, (lq_h, lq_w, 3), dtype=np.uint8)).save(partner)
        found = kind != "missing" and naming in ("{}x2", "{}_x2", "{}") and lq_h > 0 and lq_w > 0
        expected[f"{stem}.png"] = (
            "unreadable HR" if kind == "hr_not_an_image"
            else "no partner" if not found
            else "unreadable LQ" if kind == "not_an_image"
            else "wrong size" if kind in ("wider", "taller")
            else "small" if min(h - h % SCALE, w - w % SCALE) < PATCH
            else "")
    return hr, lq, expected


@_SETTINGS
@given(pairs=_FOLDERS)
def test_property_driver_check_names_what_the_workers_skip(tmp_path_factory, tiny_config, pairs) -> None:
    hr, lq, expected = _write(tmp_path_factory.getbasetemp(), pairs)
    bad = sorted(name for name, why in expected.items() if why)
    cfg = tiny_config(hr, **{"data.train_lq": str(lq)})
    if len(bad) == len(expected):
        with pytest.raises(DataError) as refused:
            check_train_source(cfg)
        message = str(refused.value)
        assert "\n" not in message
        if not any(lq.iterdir()):
            assert message == f"data source '{lq}': {lq} holds no image files ({', '.join(IMAGE_SUFFIXES)})"
        else:  # the first reason names the first HR image, or its LQ partner
            assert f"none of its {len(expected)} images is usable" in message
            assert f"; first: {hr / bad[0]}: " in message or f"; first: {bad[0]}: " in message \
                or f"; first: {lq}/{Path(bad[0]).stem}" in message
        return
    skipped = check_train_source(cfg)
    assert [name for name, _ in skipped] == bad
    dataset = PatchDataset(open_images(str(hr), 3, str(lq), SCALE), PatchCutter.from_config(cfg))
    assert dataset.skipped == skipped
    for name, reason in skipped:
        assert {"no partner": "no LQ partner", "wrong size": "its LQ image is", "small": "is smaller than",
                "unreadable HR": "not a readable image", "unreadable LQ": "not a readable image"}[expected[name]] \
            in reason


@_SETTINGS
@given(pairs=_FOLDERS)
def test_property_pack_lq_packs_the_usable_pairs_and_names_the_rest(tmp_path_factory, capsys, pairs) -> None:
    hr, lq, expected = _write(tmp_path_factory.getbasetemp(), pairs)
    out = hr.parent / "shards"
    code = main(["pack", str(hr), str(out), "--lq", str(lq), "--scale", str(SCALE), "--no-progress", "--workers", "1"])
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert "Traceback" not in text
    # pack has no patch size: small pairs are packed; the training data check skips them later.
    bad = sorted(name for name, why in expected.items() if why and why != "small")
    if not any(lq.iterdir()):
        assert code == 2 and captured.err.strip() == (f"xswinir pack: error: {lq} holds no image files "
                                                      f"({', '.join(IMAGE_SUFFIXES)})")
        return
    if len(bad) == len(expected):
        assert code == 2 and len(captured.err.strip().splitlines()) == 1
        assert f"nothing to pack from {hr}: all {len(bad)} file(s) were skipped (" in captured.err
        if all(expected[name] == "wrong size" for name in bad):
            assert f"({len(bad)} whose LQ partner is not their size / {SCALE})" in captured.err
        assert not out.exists()
        return
    assert code == 0, text
    for name in bad:
        assert f"  {name}: " in captured.out
    assert ShardImages(out).names == sorted(name for name in expected if name not in bad)


@pytest.fixture
def no_ray(monkeypatch):
    """Fails the test the moment a sweep or a study would start Ray: what it refuses, it refuses before."""
    import xswinir.tune.launch

    def started(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(xswinir.tune.launch, "init_ray", started)


def test_a_study_with_a_missing_eval_set_is_refused_before_ray(tmp_path, no_ray):
    from xswinir.tune.study import load_study_config, run_study

    missing = tmp_path / "Set5_typo"
    (tmp_path / "study.yaml").write_text(f"base: demo\narms: {{lambda0: [loss.texture_weight=0]}}\nseeds: [0, 1]\n"
                                         f"eval_sets: [skimage:val, {missing}]\nstorage: {tmp_path / 'studies'}\n")
    with pytest.raises(DataError) as refused:
        run_study(load_study_config(tmp_path / "study.yaml"))
    assert str(refused.value) == f"eval_sets '{missing}': {missing} does not exist"


def test_a_sweep_with_unusable_paired_data_or_a_missing_classifier_is_refused_before_ray(tmp_path, no_ray):
    from xswinir.texture.classifier import TextureClassifierError
    from xswinir.tune.sweep import run_sweep
    from xswinir.tune.sweep_config import load_sweep_config

    hr, lq, _ = _write(tmp_path, [(40, 40, "wider", "{}x2"), (40, 40, "missing", "{}x2")])
    sweep = tmp_path / "sweep.yaml"

    def write_sweep(*overrides: str) -> None:
        sweep.write_text(f"name: paired\nbase: demo\nnum_samples: 2\nbaseline: false\nstorage: {tmp_path / 'sweeps'}\n"
                         "search: {train.lr: {type: loguniform, low: 1.0e-4, high: 1.0e-3}}\n"
                         f"overrides: [{', '.join(overrides)}]\n")

    write_sweep(f"data.train={hr}", f"data.train_lq={lq}", "loss.texture_weight=0")
    with pytest.raises(DataError, match=r"none of its 2 images is usable \(1 with an LQ partner of the wrong size "
                                        r"\(not HR / 2\), 1 without an LQ partner\); first: img0.png: its LQ image"):
        run_sweep(load_sweep_config(sweep))
    classifier = tmp_path / "no-classifier"
    write_sweep(f"texture.classifier.path={classifier}", "loss.texture_weight=1")
    with pytest.raises(TextureClassifierError, match=f"{classifier}"):
        run_sweep(load_sweep_config(sweep))
