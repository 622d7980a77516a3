"""Grading a whole group: the request and result types, and the failure metrics.

A group is one prompt's G responses sharing one reference answer; it is the unit the
reward pool sends to an actor. A response whose grading fails gets reward 0, its
failure kind, and one log line with the offending input truncated.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from mapo_ray.reward.contract import FAILURE_KINDS, FailureKind, Graded
from mapo_ray.reward.text import truncate

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GroupRequest:
    """One prompt's responses to grade. ``uid`` identifies the group in results and logs."""

    uid: str
    answer: str
    responses: Sequence[str]

    @property
    def size(self) -> int:
        return len(self.responses)

    def __post_init__(self) -> None:
        # Checked here, in the caller, so a wrong type never reaches an actor.
        if not isinstance(self.answer, str):
            raise TypeError(f"group {self.uid!r}: answer must be str, got {type(self.answer).__name__}")
        for index, response in enumerate(self.responses):
            if not isinstance(response, str):
                raise TypeError(f"group {self.uid!r}: response {index} must be str, got {type(response).__name__}")


@dataclass(frozen=True)
class RequestRef:
    """A ``GroupRequest`` that waits in the object store (``ref``), with its ``uid`` and response count."""

    uid: str
    size: int
    ref: Any  # ray.ObjectRef[GroupRequest]; this module does not import Ray


@dataclass(frozen=True)
class GroupResult:
    """Scores of one group, aligned with ``GroupRequest.responses``.

    ``scores[i]`` holds every component the reward function returned, including
    ``"overall"``; a failed response has only ``{"overall": 0.0}`` and
    ``failures[i]`` names why (None when graded). ``retries`` counts the calls
    that were lost with their reward actor and made again on another; ``regraded``
    the responses graded again after their grading process was killed.
    """

    uid: str
    scores: list[dict[str, float]]
    failures: list[FailureKind | None]
    retries: int = 0
    regraded: int = 0

    @property
    def rewards(self) -> list[float]:
        """``overall`` per response: the scalar rewards of this group."""
        return [s["overall"] for s in self.scores]

    @staticmethod
    def all_failed(request: GroupRequest | RequestRef, kind: FailureKind, retries: int = 0) -> GroupResult:
        n = request.size
        return GroupResult(
            uid=request.uid, scores=[{"overall": 0.0} for _ in range(n)], failures=[kind] * n, retries=retries
        )


def log_failure(kind: FailureKind, error: str, uid: str, index: int | str, response: str, answer: str) -> None:
    """One warning per failed grading, with the offending input cut to 200 characters."""
    logger.warning(
        "reward failed (%s) for group %r response %s: %s | response=%r | answer=%r",
        kind,
        uid,
        index,
        truncate(error),
        truncate(response),
        truncate(answer),
    )


def grade_group(request: GroupRequest, grade: Callable[[str, str], Graded]) -> GroupResult:
    """Grade each response of ``request`` with ``grade(response, answer)`` (which never
    raises; see ``sandbox.TimedGrader``), turning failures into reward 0."""
    scores: list[dict[str, float]] = []
    failures: list[FailureKind | None] = []
    regraded = 0
    for index, response in enumerate(request.responses):
        graded = grade(response, request.answer)
        if graded.failure is not None:
            log_failure(graded.failure, graded.error, request.uid, index, response, request.answer)
        scores.append(graded.scores if graded.scores is not None else {"overall": 0.0})
        failures.append(graded.failure)
        regraded += graded.regraded
    return GroupResult(uid=request.uid, scores=scores, failures=failures, regraded=regraded)


def failure_metrics(results: Iterable[GroupResult]) -> dict[str, int]:
    """``reward/failed/<kind>`` counts over ``results`` (every kind present, zeros
    included, so a dashboard shows a flat line rather than a gap), plus
    ``reward/graded``, the number of responses graded without failure, and
    ``reward/retried``, the group calls made again after their actor died, and
    ``reward/regraded``, the responses graded again after their grading process was killed."""
    results = list(results)
    counts = Counter(kind for result in results for kind in result.failures)
    metrics = {f"reward/failed/{kind}": counts[kind] for kind in FAILURE_KINDS}
    metrics["reward/graded"] = counts[None]
    metrics["reward/retried"] = sum(result.retries for result in results)
    metrics["reward/regraded"] = sum(result.regraded for result in results)
    return metrics
