"""A real local Ray instance for the integration tests, started once on 127.0.0.1 and stopped at the end.

Every test that starts Ray lives in this folder; those that need a cluster of their own (a `ray start --head`
for Ray Jobs, a driver that is killed with its Ray, the demo run as users run it) start it themselves."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def ray_local():
    import ray

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    # The controller polls workers every 2 s by default; reports in these short runs would wait on it.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    # More logical CPUs than cores: two 1-CPU workers plus Ray's own tasks must fit on a 2-core machine.
    for attempt in (1, 2):
        try:
            ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}})
            break
        except Exception as err:
            # Ray waits a fixed 30 s for its raylet to register with the GCS; on the overloaded shared machine
            # that was too short once (2026-11-28) and every integration test errored: one more try.
            ray.shutdown()
            if attempt == 2 or "timed out during startup" not in str(err):
                raise
    yield ray
    ray.shutdown()
