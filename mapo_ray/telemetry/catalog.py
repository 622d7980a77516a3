"""The Ray metrics mapo-ray exports: one explicit, importable list (no Ray here).

Training code logs flat dicts with slash-separated keys (``reward/mean``,
``certainty/p_hist/0.00-0.10``). Each key is exported to Ray as a gauge whose
name is ``mapo_`` plus the key with slashes turned into underscores; Ray's
Prometheus exporter prefixes ``ray_``, so ``reward/mean`` is scraped as
``ray_mapo_reward_mean``. A *family* of keys sharing a prefix (the certainty
histogram, skip reasons, reward failure kinds) is one gauge whose last key part
becomes a tag, which keeps label values out of metric names and lets a
dashboard sum or stack over the tag.

Every gauge carries a ``run`` tag (the run name), so runs on one cluster do not
overwrite each other. Dashboards and their tests read ``RAY_METRICS``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PREFIX = "mapo_"
# Ray's Prometheus exporter namespaces every application metric with this.
RAY_NAMESPACE_PREFIX = "ray_"
RUN_TAG = "run"

# Prometheus' rule for metric names; Ray discards (with a warning) any name outside it.
PROMETHEUS_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


@dataclass(frozen=True)
class RayMetricSpec:
    """One exported gauge.

    ``key`` is the metrics-dict key it exports, or, when ``tag`` is set, the
    prefix (ending in ``/``) of a family of keys whose remainder is that tag's value.
    """

    key: str
    description: str
    tag: str | None = None

    @property
    def name(self) -> str:
        """The name given to ``ray.util.metrics.Gauge``."""
        return PREFIX + self.key.strip("/").replace("/", "_")

    @property
    def prometheus_name(self) -> str:
        """The name a Prometheus query (or a Grafana panel) uses."""
        return RAY_NAMESPACE_PREFIX + self.name

    @property
    def tag_keys(self) -> tuple[str, ...]:
        return (RUN_TAG,) if self.tag is None else (RUN_TAG, self.tag)


def _family(prefix: str, tag: str, description: str) -> RayMetricSpec:
    return RayMetricSpec(key=prefix, description=description, tag=tag)


RAY_METRICS: tuple[RayMetricSpec, ...] = (
    RayMetricSpec("step", "Training steps completed"),
    RayMetricSpec("weight_version", "Version of the policy weights after the step's update"),
    # Rewards of the step's rollouts.
    RayMetricSpec("reward/mean", "Mean overall reward of the step's rollouts"),
    RayMetricSpec("reward/std", "Standard deviation of the overall reward of the step's rollouts"),
    RayMetricSpec("reward/accuracy", "Fraction of the step's rollouts with a correct answer"),
    RayMetricSpec("reward/format", "Fraction of the step's rollouts in the required format"),
    RayMetricSpec("reward/success", "Fraction of the step's rollouts that succeeded (algo.success)"),
    RayMetricSpec("reward/graded", "Rollouts graded without failure"),
    RayMetricSpec("reward/retried", "Reward group calls made again on another actor after their actor died"),
    RayMetricSpec("reward/regraded", "Responses graded again after their grading process was killed from outside"),
    _family("reward/failed/", "kind", "Rollouts given reward 0 because grading failed, by failure kind"),
    RayMetricSpec("response/length_mean", "Mean response length in tokens"),
    RayMetricSpec("response/clipped_frac", "Fraction of responses cut off at the token limit"),
    RayMetricSpec("rollout/staleness", "Weight versions between the policy and the oldest sample it trains on"),
    RayMetricSpec("rollout/staleness_mean", "Weight versions between the policy and its samples, mean over the batch"),
    RayMetricSpec("rollout/restarts", "Rollout actors restarted in the step (in its rollouts, their prompts re-issued, or its weight sync)"),
    RayMetricSpec("dynamic_sampling/extra_rounds", "Extra rollout rounds DAPO's dynamic sampling took"),
    RayMetricSpec("dynamic_sampling/kept_groups", "Groups kept by DAPO's dynamic sampling"),
    # Advantages and the MAPO certainty diagnostics (mapo_ray.algo.advantage_diagnostics).
    RayMetricSpec("adv/mean", "Mean advantage over the step's rollouts"),
    RayMetricSpec("adv/max_abs", "Largest absolute advantage of the step"),
    RayMetricSpec("certainty/num_groups", "Prompt groups in the step"),
    RayMetricSpec("certainty/p_mean", "Mean trajectory certainty p (fraction of a group that succeeded)"),
    RayMetricSpec("certainty/lambda_mean", "Mean MAPO weight lambda(p) = 1 - 4p(1-p) over groups"),
    RayMetricSpec("certainty/zero_variance_frac", "Fraction of groups whose rewards are all equal"),
    RayMetricSpec("certainty/p_extreme_frac", "Fraction of groups with p = 0 or p = 1"),
    RayMetricSpec("certainty/max_abs_advantage", "Largest absolute advantage of the step (diagnostics)"),
    _family("certainty/p_hist/", "bin", "Groups whose certainty p falls in the bin, one series per bin"),
    # The policy update.
    RayMetricSpec("actor/kl", "KL divergence of the policy from the reference policy"),
    RayMetricSpec("actor/entropy", "Mean token entropy of the policy on the step's responses"),
    RayMetricSpec("actor/clip_frac", "Fraction of response tokens whose ratio was clipped"),
    RayMetricSpec("actor/dual_clip_frac", "Fraction of response tokens capped by the dual clip"),
    RayMetricSpec("actor/pg_loss", "Policy-gradient loss"),
    RayMetricSpec("actor/approx_kl", "Approximate KL between the sampling and the updated policy"),
    RayMetricSpec("actor/rollout_logprob_abs_diff", "Mean |learner - sampler| log-probability of the rollout tokens"),
    RayMetricSpec("actor/rollout_is_weight_mean", "Mean rollout-correction weight on the response tokens (pi_old / mu based)"),
    RayMetricSpec("actor/rollout_is_truncated_frac", "Fraction of response tokens whose rollout-correction weight hit the cap"),
    RayMetricSpec("actor/rollout_is_masked_frac", "Fraction of response tokens dropped by the rollout-correction mask"),
    RayMetricSpec("actor/grad_norm", "Gradient norm before clipping"),
    RayMetricSpec("actor/lr", "Learning rate"),
    # The supervised warm-start before RL (logged with step 1).
    RayMetricSpec("sft/steps", "Optimizer steps of the supervised warm-start"),
    RayMetricSpec("sft/loss_first", "Cross-entropy at the first warm-start step"),
    RayMetricSpec("sft/loss_last", "Cross-entropy at the last warm-start step"),
    RayMetricSpec("time/sft_s", "Seconds the supervised warm-start took"),
    # Where the step's time went.
    RayMetricSpec("time/generate_s", "Seconds spent generating rollouts in the step"),
    RayMetricSpec("time/reward_s", "Seconds spent grading rollouts in the step"),
    RayMetricSpec("time/learner_s", "Seconds spent in the learner update in the step"),
    RayMetricSpec("time/sync_s", "Seconds spent syncing weights to the rollout actors in the step"),
    RayMetricSpec("time/step_s", "Seconds the whole step took"),
    RayMetricSpec("perf/tokens_per_s", "Generated tokens per second in the step"),
    # The prompt pipeline (mapo_ray.data.PromptBatches.metrics).
    RayMetricSpec("data/prompts", "Prompts delivered by the data pipeline"),
    _family("data/skipped/", "reason", "Data rows skipped by the data pipeline, by reason"),
    # Evaluations (RunLogger.log_eval).
    RayMetricSpec("eval/accuracy", "Evaluation accuracy"),
    RayMetricSpec("eval/format", "Fraction of evaluation responses in the required format"),
    RayMetricSpec("eval/reward_mean", "Mean overall reward on the evaluation set"),
    RayMetricSpec("eval/prompts", "Prompts in the evaluation"),
    _family("eval/skipped/", "reason", "Test rows skipped while reading the evaluation prompts, by reason"),
)

_EXACT: dict[str, RayMetricSpec] = {spec.key: spec for spec in RAY_METRICS if spec.tag is None}
# Longest prefix first, so a nested family would win over its parent.
_FAMILIES: tuple[RayMetricSpec, ...] = tuple(
    sorted((spec for spec in RAY_METRICS if spec.tag is not None), key=lambda s: -len(s.key))
)


def route(key: str) -> tuple[RayMetricSpec, dict[str, str]] | None:
    """The gauge that exports metrics key ``key`` and the tags (besides ``run``) it sets.

    ``None`` for a key not in ``RAY_METRICS``.
    """
    spec = _EXACT.get(key)
    if spec is not None:
        return spec, {}
    for family in _FAMILIES:
        if key.startswith(family.key) and len(key) > len(family.key):
            return family, {family.tag: key[len(family.key) :]}  # type: ignore[dict-item]
    return None
