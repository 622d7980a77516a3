"""A reward function whose module takes seconds to import, so that a test can kill a
reward actor while it starts (its grading process imports the module before the actor
is ready). Named by import path in ``test_reward_pool.py``."""

from __future__ import annotations

import time

time.sleep(3.0)


def score(response: str, answer: str) -> dict[str, float]:
    return {"overall": float(response == answer)}
