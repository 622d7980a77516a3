"""The contract every reward function keeps, and the outcome of one grading.

A reward function is called as ``fn(response, answer)``: the model's whole response
text and the dataset's reference answer. It returns a mapping from component names
to finite floats that includes ``"overall"`` (the scalar the advantage estimator
sees; in [0, 1] for the built-in graders). The built-ins also return ``format`` and
``accuracy``. A function that cannot use the *reference* answer (a data problem, not
the model's fault) raises ``RewardInputError`` naming it.
"""

from __future__ import annotations

import math
import numbers
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

RewardFn = Callable[[str, str], Mapping[str, float]]

# Why a rollout got reward 0 without being graded:
#   exception     the reward function raised, or its grading process died
#   timeout       one grading ran past ``reward.grading_timeout_s``
#   nan           a returned score was NaN or infinite
#   invalid       the return value broke the contract (not a mapping, no "overall", ...)
#   bad_answer    the reference answer or label cannot be graded (RewardInputError)
#   call_timeout  a whole group's actor call ran past ``reward.call_timeout_s``
#   actor_died    the reward actor died while grading the group
#   memory        one grading ran out of memory: past ``reward.grading_memory_mb`` in the
#                 grading process (a MemoryError the reward function let through)
#   cpu           one grading used more than ``reward.grading_cpu_s`` seconds of CPU time
FailureKind = Literal[
    "exception", "timeout", "nan", "invalid", "bad_answer", "call_timeout", "actor_died", "memory", "cpu"
]
FAILURE_KINDS: tuple[FailureKind, ...] = get_args(FailureKind)


class RewardInputError(ValueError):
    """The reference answer (or label) cannot be graded; the message names it."""


@dataclass(frozen=True)
class Graded:
    """The outcome of grading one response.

    Exactly one of ``scores`` (component name -> finite float, with ``"overall"``)
    and ``failure`` is set; ``error`` says what went wrong for the log. ``regraded``:
    the grading process was killed from outside during a first try (see
    ``sandbox.TimedGrader``), and this is the second.
    """

    scores: dict[str, float] | None = None
    failure: FailureKind | None = None
    error: str = ""
    regraded: bool = False

    @staticmethod
    def failed(kind: FailureKind, error: str) -> Graded:
        return Graded(failure=kind, error=error)


def check_scores(value: Any) -> Graded:
    """Validate what a reward function returned: ``Graded`` with plain-float scores,
    or an ``invalid``/``nan`` failure saying which key is wrong."""
    if not isinstance(value, Mapping):
        return Graded.failed("invalid", f"returned {type(value).__name__}, expected a mapping of str to float")
    scores: dict[str, float] = {}
    for key, score in value.items():
        # bool is an int subclass, but True as a score is almost surely a bug.
        if not isinstance(key, str) or isinstance(score, bool) or not isinstance(score, numbers.Real):
            return Graded.failed("invalid", f"entry {key!r}: {score!r} is not a str -> float pair")
        scores[key] = float(score)
    if "overall" not in scores:
        return Graded.failed("invalid", f"no 'overall' key (keys: {sorted(scores)})")
    bad = [key for key, score in scores.items() if not math.isfinite(score)]
    if bad:
        return Graded.failed("nan", "not finite: " + ", ".join(f"{k}={scores[k]}" for k in bad))
    return Graded(scores=scores)


def call_reward_fn(fn: RewardFn, response: str, answer: str) -> Graded:
    """``fn(response, answer)`` with every error turned into a ``Graded`` failure.

    No time limit here: that is the caller's job (``sandbox.TimedGrader``).
    """
    try:
        value = fn(response, answer)
    except RewardInputError as err:
        return Graded.failed("bad_answer", str(err))
    except MemoryError as err:  # before Exception, of which it is a subclass
        return Graded.failed("memory", _describe(err))
    except Exception as err:  # a reward function's bug must not end the run
        return Graded.failed("exception", _describe(err))
    return check_scores(value)


def _describe(err: Exception) -> str:
    """``Type: message (at file:line)`` of the innermost frame, for a one-line log."""
    frames = traceback.extract_tb(err.__traceback__)
    where = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    try:
        message = str(err)
    except Exception:  # an exception whose __str__ itself fails
        message = "<unprintable>"
    return f"{type(err).__name__}: {message}{where}"
