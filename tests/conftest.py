"""Shared fixtures: the read-only reference data beside the repository, seeds, the tiny config."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from xswinir.config import Config, apply_overrides

REPO_ROOT = Path(__file__).resolve().parents[1]
INTEGRATION = REPO_ROOT / "tests" / "integration"
# ../shared/data beside the checkout holds Set5 and the SwinIR parity vectors; a user's clone has none.
SHARED_DATA = Path(os.environ.get("XSWINIR_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The reference data folder; tests that need it skip with the reason when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"reference data not found at {SHARED_DATA} (set XSWINIR_SHARED_DATA to its folder)")
    return SHARED_DATA


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _one_torch_thread():
    # Tiny tensors: a second intra-op thread only adds waiting, and on a busy machine a lot of it.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# For a whole module (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``) or a single test.
one_torch_thread = pytest.fixture(scope="module")(_one_torch_thread)
one_torch_thread_per_test = pytest.fixture(_one_torch_thread, name="one_torch_thread_per_test")


# STYLE.md's tiny everything: one SwinIR block of 12 channels, 16 px crops, batch 4, no loader processes.
TINY = {
    "model.upscale": 2, "model.window_size": 4, "model.depths": [1], "model.num_heads": [2], "model.embed_dim": 12,
    "model.img_size": 16, "data.gt_size": 16, "data.loader_workers": 0, "train.batch_size": 4,
}


@pytest.fixture
def tiny_config() -> Callable[..., Config]:
    """``tiny_config(source=None, **overrides)``: a whole ``Config`` around the tiny model, for unit tests.

    ``source`` is the training and validation images; overrides use the dotted keys of ``--set``:
    ``tiny_config(folder, **{"loss.texture_weight": 0.1})``; ``tiny_config().model`` is the tiny ``ModelConfig``.
    """

    def make(source: str | Path | None = None, **overrides: Any) -> Config:
        images = {"data.train": str(source), "data.val": str(source)} if source is not None else {}
        return apply_overrides(Config(), {**TINY, **images, **overrides})

    return make


@pytest.hookimpl(tryfirst=True)  # before -m deselects: the integration mark must be on by then
def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if INTEGRATION in item.path.parents:
            item.add_marker(pytest.mark.integration)
    # Unit tests first: they answer in seconds, and the shared local Ray then lives only as long as needed.
    items.sort(key=lambda item: INTEGRATION in item.path.parents)


@pytest.fixture(autouse=True)
def _ray_only_in_integration(request):
    """Fails a test outside tests/integration/ that starts Ray: the tiers are only fast if that holds."""
    started_before = _ray_is_up()
    yield
    if not started_before and _ray_is_up() and INTEGRATION not in request.node.path.parents:
        import ray

        ray.shutdown()
        pytest.fail("this test started Ray: move it to tests/integration/ and use its ray_local fixture")


def _ray_is_up() -> bool:
    ray = sys.modules.get("ray")  # never imported: never started
    return ray is not None and ray.is_initialized()
