"""Which reward function a run uses: a registered name or a ``pkg.module:function`` path.

A registered entry is a builder that binds the config's settings (weights, label
set) to a grader; a new built-in is one builder and one decorator line.

A user function named by import path keeps the same contract (``contract.py``) and
takes no settings from the config.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable
from functools import partial

from mapo_ray.config import ConfigError, RewardConfig
from mapo_ray.reward.contract import RewardFn
from mapo_ray.reward.label import score_label
from mapo_ray.reward.math import score_math
from mapo_ray.registry import Registry

_IMPORT_PATH = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")


REWARD_FUNCTIONS: Registry[Callable[[RewardConfig], RewardFn]] = Registry("reward function")


@REWARD_FUNCTIONS.register("math")
def _math(config: RewardConfig) -> RewardFn:
    return partial(score_math, accuracy_weight=config.accuracy_weight, format_weight=config.format_weight)


@REWARD_FUNCTIONS.register("label")
def _label(config: RewardConfig) -> RewardFn:
    return partial(
        score_label,
        labels=tuple(config.labels),
        accuracy_weight=config.accuracy_weight,
        format_weight=config.format_weight,
    )


def check_reward_function(name: str) -> None:
    """Raise ``ValueError`` unless ``name`` is a registered grader or looks like an import path."""
    if _IMPORT_PATH.fullmatch(name):
        return
    try:
        REWARD_FUNCTIONS.check(name, key="reward.function")
    except ValueError as err:
        raise ValueError(f"{err}, or a 'pkg.module:function' path") from None


def load_reward_fn(config: RewardConfig) -> RewardFn:
    """The reward function ``config.function`` names, ready to call as ``fn(response, answer)``.

    Raises ``ConfigError`` naming ``reward.function`` and the path when a module
    cannot be imported, an attribute is missing, or the object cannot be called
    with two positional arguments, so a wrong path fails at start-up.
    """
    spec = config.function
    if spec in REWARD_FUNCTIONS:
        return REWARD_FUNCTIONS.get(spec)(config)
    module_name, _, attr_path = spec.partition(":")
    where = f"reward.function {spec!r}"
    try:
        obj = importlib.import_module(module_name)
    except Exception as err:  # any import-time failure of user code is a config error
        raise ConfigError(f"{where}: cannot import module {module_name!r}: {type(err).__name__}: {err}") from err
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{where}: {getattr(obj, '__name__', obj)!r} has no attribute {part!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{where}: {type(obj).__name__} object is not callable")
    try:
        inspect.signature(obj).bind("response", "answer")
    except TypeError as err:
        raise ConfigError(f"{where}: must accept (response, answer): {err}") from err
    except ValueError:
        pass  # some builtins have no inspectable signature; the call itself will tell
    return obj
