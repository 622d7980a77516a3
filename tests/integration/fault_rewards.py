"""Reward functions for ``test_fault_tolerance.py``, named by import path in its configs.

A module of their own, importing nothing heavy: every grading process imports the
module a reward function lives in, and starts again after each grading that overran.
"""

from __future__ import annotations

import time


def spread_reward(response: str, answer: str) -> dict[str, float]:
    """A reward that differs between responses, so every update has a gradient."""
    return {"overall": (sum(map(ord, response)) % 11) / 10}


def hang(response: str, answer: str) -> dict[str, float]:
    """A reward function that never returns."""
    while True:
        time.sleep(3600)
