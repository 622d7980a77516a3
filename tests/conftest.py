"""Shared fixtures. Integration tests share one local Ray cluster per session."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster (no dashboard, listening on 127.0.0.1 only), shut down at the end of the session."""
    import ray

    from mapo_ray.job import start_local_ray

    # Loopback only, like a job's cluster, but without Ray 2.60's token: Ray would write one to
    # ~/.ray/auth_token when there is none, and every later Ray process of this user would use it.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    start_local_ray(num_cpus=4, include_dashboard=False, log_to_driver=True, configure_logging=False)
    yield ray
    ray.shutdown()
