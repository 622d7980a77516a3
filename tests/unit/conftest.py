"""Fixtures of the unit tests."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from mapo_ray.learner import init_single_process


@pytest.fixture(scope="session")
def single_process_world():
    """A torch.distributed world of one for the whole session: DeepSpeed keeps a handle
    on the first default group it sees, so the group must outlive every learner test."""
    init_single_process("gloo")
    yield
    dist.destroy_process_group()
