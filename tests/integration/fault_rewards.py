"""Reward functions for ``test_fault_tolerance.py`` and the chaos run, named by import path in its configs.

A module of their own, importing nothing heavy: every grading process imports the
module a reward function lives in, and starts again after each grading that overran.
"""

from __future__ import annotations

import time
import zlib


def spread_reward(response: str, answer: str) -> dict[str, float]:
    """A reward that differs between responses, so every update has a gradient."""
    return {"overall": (sum(map(ord, response)) % 11) / 10}


def hang(response: str, answer: str) -> dict[str, float]:
    """A reward function that never returns."""
    while True:
        time.sleep(3600)


def spread_or_hang(response: str, answer: str) -> dict[str, float]:
    """``spread_reward``, except that it hangs on a response whose text hashes to 0 mod 32:
    a property of the input, so two runs that meet the same responses hang on the same ones."""
    if zlib.crc32(f"{response}|{answer}".encode()) % 32 == 0:
        hang(response, answer)
    return spread_reward(response, answer)
