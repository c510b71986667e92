"""The ``tune/`` folder as a package: it installs as ``xswinir.tune`` and nothing else. Each of its modules has its
own test file (test_search_space, test_sweep_config, test_sweep, test_results, test_plots, test_manifest,
test_tune_launch, test_study); the real Ray sweep is tests/integration/test_sweep_ray.py."""

from __future__ import annotations

from pathlib import Path

import pytest

import xswinir.tune.sweep

REPO = Path(__file__).resolve().parents[1]


def test_tune_folder_installs_as_xswinir_tune_only():
    """pyproject maps tune/ to xswinir.tune and lists every package: no top-level `tune`, nothing left out."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["package-dir"] == {"xswinir.tune": "tune"}
    on_disk = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "xswinir").rglob("__init__.py")}
    assert set(setuptools["packages"]) == on_disk | {"xswinir.tune"}
    assert Path(xswinir.tune.sweep.__file__).parent == REPO / "tune"
