"""Hostile image files (tests/data/make_hostile_images.py) through every command that reads user images.

Each command runs in-process (``xswinir.cli.main``): it must finish with its documented status, print no
traceback, and name every file it could not use. The property-based tests draw modes, sizes, faults and file
names (non-UTF-8 bytes included) with hypothesis; ``max_examples`` is kept small for the default run.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_explain import textured_image, tiny_classifier
from tests.test_images import load_hostile_generator
from xswinir.checkpoint import save_weights
from xswinir.cli import main
from xswinir.config import MODEL_PRESETS
from xswinir.model import build_swinir
from xswinir.paths import printable_path
from xswinir.texture import save_texture_classifier

hostile = load_hostile_generator()
OK, UNREADABLE, TOO_LARGE = hostile.OK, hostile.UNREADABLE, hostile.TOO_LARGE


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hostile")
    torch.manual_seed(0)
    cfg = MODEL_PRESETS["tiny-x2"]
    save_weights(build_swinir(cfg), cfg, root / "model.safetensors")
    save_texture_classifier(tiny_classifier(textured_image(torch.Generator().manual_seed(0))), root / "clf")
    kinds = hostile.make_hostile_images(root / "corpus")
    return {"root": root, "corpus": root / "corpus", "model": root / "model.safetensors", "clf": root / "clf",
            "kinds": kinds}


@pytest.fixture(autouse=True)
def console_logging():
    """Each ``main`` call sets up logging on the stderr of the moment (capsys's), not a closed earlier one."""
    saved = logging.root.handlers[:]
    logging.root.handlers.clear()
    yield
    logging.root.handlers[:] = saved


def _run(capsys: pytest.CaptureFixture, argv: list[str]) -> tuple[int, str]:
    code = main(argv)
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert "Traceback" not in text and "Logging error" not in text, text
    text.encode("utf-8")  # every printed path went through printable_path
    return code, text


def _shown(name: bytes) -> str:
    return printable_path(name)


def test_corpus_through_upscale_eval_and_texture_training(parts, tmp_path: Path, capsys) -> None:
    from xswinir.texture.training import load_training_images

    bad = {name: kind for name, kind in parts["kinds"].items() if kind != OK}
    good = [name for name, kind in parts["kinds"].items() if kind == OK]
    code, text = _run(capsys, ["upscale", str(parts["corpus"]), "--checkpoint", str(parts["model"]), "--out",
                               str(tmp_path / "up"), "--device", "cpu", "--tile", "0"])
    assert code == 1 and f"processed {len(good)}, skipped {len(bad)}" in text  # upscale's status for skips
    for name, kind in bad.items():
        assert _shown(name) in text
        assert ("over the limit" in text) if kind == TOO_LARGE else True
    written = {os.fsencode(p.name) for p in (tmp_path / "up").iterdir()}
    assert written == {os.fsencode(Path(os.fsdecode(n)).stem) + b"_x2.png" for n in good
                       if not n.startswith(b"valid.")} | {b"valid_png_x2.png", b"valid_jpg_x2.png"}

    code, text = _run(capsys, ["eval", "--hr", str(parts["corpus"]), "--scale", "2", "--bicubic"])
    assert code == 0
    for name in [*bad, b"tiny_1x1.png", b"tiny_2x2.png"]:
        assert _shown(name) in text
    assert "too small to measure at x2" in text and "declares 400,000,000 pixels" in text
    assert "caf\\xe9" in text  # the non-UTF-8 name, measured and printed

    images = load_training_images(str(parts["corpus"]))
    assert len(images) == len(good)


def test_corpus_through_explain(parts, tmp_path: Path, capsys) -> None:
    common = ["--checkpoint", str(parts["model"]), "--classifier", str(parts["clf"]), "--device", "cpu",
              "--out", str(tmp_path / "explain.png")]
    for name, kind in parts["kinds"].items():
        if kind == OK and not name.startswith(b"tiny"):
            continue  # a valid picture takes seconds to draw; test_explain.py covers those
        code, text = _run(capsys, ["explain", os.fsdecode(os.path.join(os.fsencode(parts["corpus"]), name)),
                                   *common])
        assert code == 2 and _shown(name) in text


def test_max_pixels_flag(parts, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XSWINIR_MAX_PIXELS", "64000000")  # restored after: the flag sets it for the process
    code, text = _run(capsys, ["eval", "--hr", str(parts["corpus"] / "valid.png"), "--scale", "2", "--bicubic",
                               "--max-pixels", "100"])
    assert code == 2 and "over the limit of 100" in text and "valid.png" in text


_NAMES = st.lists(st.sampled_from([b"a", b"Z", b"0", b" ", b"_", b"\xe9", b"\xff", "é".encode(), "🙂".encode()]),
                  min_size=1, max_size=6).map(lambda parts: b"x" + b"".join(parts))
_CASES = st.tuples(st.sampled_from(["RGB", "P", "LA", "RGBA", "I;16", "RGB;16", "CMYK", "1", "L"]),
                   st.integers(1, 24), st.integers(1, 24),
                   st.sampled_from(["none", "none", "truncated", "garbage", "empty", "bomb"]), _NAMES)
_SETTINGS = settings(max_examples=20, deadline=None, derandomize=True,
                     suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _write_case(root: Path, case: tuple) -> tuple[Path, bytes, str]:
    mode, width, height, fault, stem = case
    data, kind = hostile.hostile_png(mode, width, height, fault)
    folder = Path(os.fsdecode(os.path.join(os.fsencode(root), os.urandom(6).hex().encode())))
    folder.mkdir()
    name = stem + (b".jpg" if mode == "CMYK" and fault != "bomb" else b".png")
    with open(os.path.join(os.fsencode(folder), name), "wb") as handle:
        handle.write(data)
    return folder, name, kind


@_SETTINGS
@given(case=_CASES)
def test_property_upscale(parts, capsys, case) -> None:
    folder, name, kind = _write_case(parts["root"], case)
    code, text = _run(capsys, ["upscale", str(folder), "--checkpoint", str(parts["model"]), "--out",
                               str(folder / "out"), "--device", "cpu", "--tile", "0"])
    assert code in (0, 1)  # 1: the file was skipped, and named
    assert code == 0 if kind == OK else code == 1 if kind != "unknown" else True
    if code:
        assert _shown(name) in text


@_SETTINGS
@given(case=_CASES)
def test_property_eval(parts, capsys, case) -> None:
    folder, name, kind = _write_case(parts["root"], case)
    code, text = _run(capsys, ["eval", "--hr", str(folder), "--scale", "2", "--bicubic"])
    assert code in (0, 2)
    if kind in (UNREADABLE, TOO_LARGE) or min(case[1:3]) < 15:  # unreadable, or too small to measure at x2
        assert code == 2 and _shown(name) in text


@_SETTINGS
@given(case=_CASES)
def test_property_explain(parts, capsys, case) -> None:
    folder, name, kind = _write_case(parts["root"], case)
    code, text = _run(capsys, ["explain", os.fsdecode(os.path.join(os.fsencode(folder), name)), "--checkpoint",
                               str(parts["model"]), "--classifier", str(parts["clf"]), "--device", "cpu",
                               "--out", str(folder / "explain.png")])
    assert code == 2 and _shown(name) in text  # at most 24 px: too small to explain, or not readable
