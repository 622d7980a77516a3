"""Shared fixtures. Integration tests share one local Ray cluster per session."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster (no dashboard), shut down at the end of the session."""
    import ray

    # A tiny test cluster needs no token-authenticated dashboard (on by default in Ray 2.60).
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=True, configure_logging=False)
    yield ray
    ray.shutdown()
