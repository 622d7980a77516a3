"""Rewards: graders (plain functions, no Ray) and the reward actor pool.

``RewardPool`` lives in ``mapo_ray.reward.pool`` and is not imported here, so that a
grading process (``sandbox``), which imports this package, does not load Ray.
"""

from mapo_ray.reward.contract import (
    FAILURE_KINDS,
    FailureKind,
    Graded,
    RewardFn,
    RewardInputError,
    call_reward_fn,
    check_scores,
)
from mapo_ray.reward.functions import REWARD_FUNCTIONS, load_reward_fn
from mapo_ray.reward.group import GroupRequest, GroupResult, failure_metrics, grade_group
from mapo_ray.reward.label import normalize_label, response_label, score_label
from mapo_ray.reward.math import math_equal, score_math
from mapo_ray.reward.sandbox import GraderStartError, TimedGrader
from mapo_ray.reward.text import has_think_box_format, last_boxed, text_after_think, truncate

__all__ = [
    "FAILURE_KINDS",
    "REWARD_FUNCTIONS",
    "FailureKind",
    "GraderStartError",
    "Graded",
    "GroupRequest",
    "GroupResult",
    "RewardFn",
    "RewardInputError",
    "TimedGrader",
    "call_reward_fn",
    "check_scores",
    "failure_metrics",
    "grade_group",
    "has_think_box_format",
    "last_boxed",
    "load_reward_fn",
    "math_equal",
    "normalize_label",
    "response_label",
    "score_label",
    "score_math",
    "text_after_think",
    "truncate",
]
