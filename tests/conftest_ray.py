"""A local Ray for the stage tests (import the fixture into a test module: `from tests.conftest_ray import ray_local`).

Module-scoped, and it leaves alone a Ray that someone else started, so that modules with their own Ray fixture
run in the same session.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # bind 127.0.0.1 only


@pytest.fixture(scope="module")
def ray_local():
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    if started_here:
        ray.shutdown()
