"""The catalog of exported Ray metrics: valid, unique names and a gauge for every key the loop logs."""

from __future__ import annotations

import torch

from mapo_ray.algo import advantage_diagnostics, compute_advantages
from mapo_ray.data.errors import SKIP_REASONS
from mapo_ray.reward import failure_metrics
from mapo_ray.telemetry.catalog import PROMETHEUS_NAME, RAY_METRICS, RUN_TAG, route

# The keys the training loop reports besides the families checked below.
LOOP_KEYS = [
    "step",
    "weight_version",
    "reward/mean",
    "reward/std",
    "reward/accuracy",
    "reward/format",
    "response/length_mean",
    "adv/mean",
    "adv/max_abs",
    "actor/kl",
    "actor/entropy",
    "actor/clip_frac",
    "actor/grad_norm",
    "actor/rollout_is_weight_mean",
    "actor/rollout_is_truncated_frac",
    "actor/rollout_is_masked_frac",
    "rollout/staleness",
    "rollout/staleness_mean",
    "actor/lr",
    "time/generate_s",
    "time/reward_s",
    "time/learner_s",
    "time/sync_s",
    "time/step_s",
    "perf/tokens_per_s",
    "eval/accuracy",
    "eval/format",
    "eval/reward_mean",
]


def test_names_are_valid_unique_and_described():
    names = [spec.name for spec in RAY_METRICS]
    assert len(set(names)) == len(names)
    assert len({spec.key for spec in RAY_METRICS}) == len(RAY_METRICS)
    for spec in RAY_METRICS:
        assert PROMETHEUS_NAME.match(spec.name), spec
        assert spec.name.startswith("mapo_") and spec.prometheus_name == "ray_" + spec.name
        assert spec.description.strip(), spec
        assert spec.tag_keys[0] == RUN_TAG and len(set(spec.tag_keys)) == len(spec.tag_keys)
        assert (spec.tag is None) == (not spec.key.endswith("/")), spec


def test_every_key_the_loop_logs_has_a_gauge():
    scores = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.1, 0.1])
    group_ids = torch.tensor([0, 0, 1, 1, 2, 2])
    advantages = compute_advantages(scores, group_ids)
    keys = list(advantage_diagnostics(scores, group_ids, advantages).metrics())
    keys += list(failure_metrics([]))
    keys += ["data/prompts"] + [f"data/skipped/{reason}" for reason in SKIP_REASONS]
    missing = [key for key in LOOP_KEYS + keys if route(key) is None]
    assert missing == []


def test_route_maps_families_to_one_gauge_with_a_tag():
    spec, tags = route("certainty/p_hist/0.90-1.00")
    assert spec.name == "mapo_certainty_p_hist" and tags == {"bin": "0.90-1.00"}
    assert spec.tag_keys == ("run", "bin")
    spec, tags = route("reward/failed/timeout")
    assert spec.prometheus_name == "ray_mapo_reward_failed" and tags == {"kind": "timeout"}
    spec, tags = route("reward/mean")
    assert spec.name == "mapo_reward_mean" and tags == {}


def test_route_rejects_unknown_keys_and_bare_family_prefixes():
    assert route("reward/unknown") is None
    assert route("certainty/p_hist/") is None
    assert route("certainty/p_hist") is None
