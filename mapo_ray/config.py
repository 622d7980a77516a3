"""One typed config tree for every mapo-ray job.

A config is built in three layers, each overriding the one before:

1. a named preset (``PRESETS``), else the dataclass defaults;
2. a YAML file (``--config FILE``), nested the same way as the dataclasses;
3. dotted overrides from the command line (``--set algo.estimator=grpo``), whose
   values are parsed as YAML scalars (``1e-6``, ``true``, ``[1, 2]``).

Every key is checked against the dataclass it lands in: an unknown key raises
``ConfigError`` naming its full dotted path and the nearest valid key, and a value
of the wrong type names the key, the value and the expected type.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config key or value that does not fit the schema."""


@dataclass
class AlgoConfig:
    """Advantage estimator, policy loss and KL term (see shared/DESIGN.md)."""

    estimator: str = "mapo"
    std: Literal["population", "unbiased"] = "population"
    eps: float = 1e-6
    success_threshold: float = 1.0
    policy_loss: str = "ppo"
    loss_agg_mode: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = (
        "token-mean"
    )
    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.3
    dual_clip_c: float | None = 3.0
    kl_coef: float = 1e-2
    kl_estimator: str = "low_var_kl"

    def __post_init__(self) -> None:
        # Imported here so that config has no import-time dependency on torch.
        from mapo_ray.algo import ADVANTAGE_ESTIMATORS, KL_ESTIMATORS, POLICY_LOSSES

        ADVANTAGE_ESTIMATORS.check(self.estimator, key="algo.estimator")
        POLICY_LOSSES.check(self.policy_loss, key="algo.policy_loss")
        KL_ESTIMATORS.check(self.kl_estimator, key="algo.kl_estimator")


@dataclass
class Config:
    """The root of the tree; each section is read by the part of mapo-ray it names."""

    seed: int = 0
    algo: AlgoConfig = field(default_factory=AlgoConfig)


# Each preset is a nested dict applied over the defaults, exactly like a YAML file.
PRESETS: dict[str, dict[str, Any]] = {
    # The paper's Geo3K set-up (shared/DESIGN.md).
    "geo3k-qwen25vl-7b": {
        "algo": {
            "estimator": "mapo",
            "loss_agg_mode": "token-mean",
            "clip_ratio_low": 0.2,
            "clip_ratio_high": 0.3,
            "dual_clip_c": 3.0,
            "kl_coef": 1e-2,
            "kl_estimator": "low_var_kl",
        },
    },
    # The tiny CPU policy learns from scratch in minutes; a KL anchor to its random
    # initialisation would only slow it down.
    "cpu-tiny": {"algo": {"kl_coef": 0.0}},
}


def load_config(
    path: str | Path | None = None,
    preset: str | None = None,
    overrides: typing.Sequence[str] = (),
) -> Config:
    """Build a ``Config`` from a preset, a YAML file and ``key=value`` overrides."""
    tree: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}{_hint(preset, PRESETS)}; presets: {sorted(PRESETS)}")
        _merge(tree, PRESETS[preset])
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(loaded).__name__}")
        _merge(tree, loaded or {})
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        node = tree
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node[leaf] = yaml.safe_load(raw)
    return from_dict(Config, tree)


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``, checking every key and value type."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(f"unknown config key {path!r}{_hint(key, fields, prefix)}")
        expected = hints[key]
        if dataclasses.is_dataclass(expected):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {path!r} is a section; got {value!r}")
            kwargs[key] = from_dict(expected, value, prefix=f"{path}.")
        else:
            kwargs[key] = _check_type(path, value, expected)
    try:
        return cls(**kwargs)
    except ValueError as err:  # a section's own check names its key
        raise ConfigError(str(err)) from err


def to_dict(config: Any) -> dict[str, Any]:
    """The plain nested dict of a config, as it would be written to YAML."""
    return dataclasses.asdict(config)


def _check_type(path: str, value: Any, expected: Any) -> Any:
    ok, converted = _coerce(value, expected)
    if not ok:
        raise ConfigError(
            f"config key {path!r}: value {value!r} ({type(value).__name__}) is not of type {_type_name(expected)}"
        )
    return converted


def _coerce(value: Any, expected: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(expected)
    args = typing.get_args(expected)
    if expected is Any:
        return True, value
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            ok, converted = _coerce(value, arg)
            if ok:
                return True, converted
        return False, value
    if origin is Literal:
        return value in args, value
    if expected is type(None):
        return value is None, value
    if expected is bool:
        return isinstance(value, bool), value
    if expected is float:
        if isinstance(value, bool):
            return False, value
        if isinstance(value, (int, float)):
            return True, float(value)
        # YAML 1.1 reads "1e-6" (no dot before the exponent) as a string.
        if isinstance(value, str):
            try:
                return True, float(value)
            except ValueError:
                pass
        return False, value
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if expected is str:
        return isinstance(value, str), value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False, value
        item_type = args[0] if args else Any
        items = [_coerce(v, item_type) for v in value]
        if not all(ok for ok, _ in items):
            return False, value
        return True, origin(v for _, v in items)
    if origin is dict:
        if not isinstance(value, dict):
            return False, value
        key_type, value_type = args if args else (Any, Any)
        pairs = [(_coerce(k, key_type), _coerce(v, value_type)) for k, v in value.items()]
        if not all(k[0] and v[0] for k, v in pairs):
            return False, value
        return True, {k[1]: v[1] for k, v in pairs}
    raise TypeError(f"config schema uses an unsupported type {expected!r}")


def _type_name(expected: Any) -> str:
    origin = typing.get_origin(expected)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(expected))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(expected))
    if expected is type(None):
        return "None"
    return getattr(expected, "__name__", str(expected)) if origin is None else str(expected)


def _hint(key: str, valid: typing.Iterable[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f"; did you mean {prefix + close[0]!r}?" if close else ""


def _merge(base: dict[str, Any], update: dict[str, Any]) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
