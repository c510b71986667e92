"""A real local Ray instance for the integration tests, started once on 127.0.0.1 and stopped at the end.

Every test that starts Ray lives in this folder; those that need a cluster of their own (a `ray start --head`
for Ray Jobs, a driver that is killed with its Ray, the demo run as users run it) start it themselves."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest


def start_ray_retrying(start: Callable[[], object]) -> None:
    """Calls ``start`` (something that starts a local Ray), once more if Ray timed out starting.

    Ray waits a fixed 30 s (``ray/_private/node.py``) for its raylet to register with the GCS; on the overloaded
    shared machine that was too short (2026-11-28: every integration test errored; 2026-12-06, at a load of 60
    on 2 cores: the interrupted-sweep drill).
    """
    import ray

    for attempt in (1, 2):
        try:
            start()
            return
        except Exception as err:
            ray.shutdown()
            if attempt == 2 or "timed out during startup" not in str(err):
                raise


@pytest.fixture(scope="session")
def ray_start_retrying() -> Callable[[Callable[[], object]], None]:
    """:func:`start_ray_retrying`, for the tests that start a Ray of their own (conftest is not imported)."""
    return start_ray_retrying


@pytest.fixture(scope="session")
def ray_local():
    import ray

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    # The controller polls workers every 2 s by default; reports in these short runs would wait on it.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    # More logical CPUs than cores: two 1-CPU workers plus Ray's own tasks must fit on a 2-core machine.
    start_ray_retrying(lambda: ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
                                        runtime_env={"env_vars": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}}))
    yield ray
    ray.shutdown()
