"""Ray dashboard metrics on a real local Ray cluster: recorded inside an actor and
read back from the node's Prometheus endpoint, where the dashboard's Prometheus
scrapes them."""

from __future__ import annotations

import logging
import re
import time
import urllib.request
import uuid
import warnings

import pytest
import ray
import torch

from mapo_ray.algo import advantage_diagnostics, compute_advantages
from mapo_ray.telemetry.catalog import RAY_METRICS
from mapo_ray.telemetry.ray_metrics import RayMetricsExporter

pytestmark = pytest.mark.integration

# Ray's agent exports on its report interval (seconds); this bounds the wait, it times nothing.
EXPORT_DEADLINE_S = 60.0
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def step_metrics(step: int) -> dict[str, float]:
    """What the training loop logs for one step, with real certainty diagnostics."""
    scores = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    group_ids = torch.arange(3).repeat_interleave(4)
    advantages = compute_advantages(scores, group_ids)
    metrics = advantage_diagnostics(scores, group_ids, advantages).metrics()
    metrics.update({"reward/mean": 0.1 * step, "reward/accuracy": 0.05 * step, "reward/failed/timeout": step})
    return metrics


def scrape(run: str) -> dict[tuple[str, frozenset], float]:
    """{(metric, tags without Ray's own): value} of ``run``'s series on every node."""
    series = {}
    for node in ray.nodes():
        url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        for line in text.splitlines():
            if line.startswith("ray_mapo_"):
                name, _, rest = line.partition("{")
                labels, _, value = rest.rpartition("} ")
                tags = dict(LABEL.findall(labels))
                if tags.get("run") == run:
                    kept = frozenset((k, v) for k, v in tags.items() if k in ("bin", "kind"))
                    series[(name, kept)] = float(value)
    return series


def test_gauges_recorded_in_an_actor_reach_the_metrics_endpoint(ray_cluster, tmp_path):
    run = f"telemetry-{uuid.uuid4().hex[:8]}"

    @ray.remote(num_cpus=0.5)
    class Learner:
        """Stands where learner rank 0 logs: inside a Ray worker process."""

        def log(self, run_dir: str, run_name: str, steps: list[dict[str, float]]) -> list[str]:
            import io

            from mapo_ray.telemetry import RunLogger

            logger = RunLogger(run_dir, total_steps=len(steps), run_name=run_name, stream=io.StringIO())
            for step, metrics in enumerate(steps, start=1):
                logger.log(step, metrics)
            logger.log_eval(len(steps), {"accuracy": 0.375})
            return [path.name for path in logger.close()]

    # Built here: the worker cannot import this test module by name.
    steps = [{**step_metrics(step), "weight_version": step} for step in (1, 2)]
    learner = Learner.remote()
    written = ray.get(learner.log.remote(str(tmp_path), run, steps), timeout=120)
    assert written == ["curves.png", "certainty.png"]

    expected = {
        ("ray_mapo_step", frozenset()): 2.0,
        ("ray_mapo_weight_version", frozenset()): 2.0,
        ("ray_mapo_reward_mean", frozenset()): 0.2,
        ("ray_mapo_eval_accuracy", frozenset()): 0.375,
        ("ray_mapo_reward_failed", frozenset({("kind", "timeout")})): 2.0,
        # p is 1, 1/4 and 0 for the three groups.
        ("ray_mapo_certainty_p_hist", frozenset({("bin", "0.00-0.10")})): 1.0,
        ("ray_mapo_certainty_p_hist", frozenset({("bin", "0.20-0.30")})): 1.0,
        ("ray_mapo_certainty_p_hist", frozenset({("bin", "0.50-0.60")})): 0.0,
        ("ray_mapo_certainty_p_hist", frozenset({("bin", "0.90-1.00")})): 1.0,
        ("ray_mapo_certainty_p_extreme_frac", frozenset()): pytest.approx(2 / 3),
    }
    deadline = time.monotonic() + EXPORT_DEADLINE_S
    while True:
        series = scrape(run)
        if all(key in series for key in expected) or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    ray.kill(learner)
    assert {key: series.get(key) for key in expected} == expected


def test_ray_accepts_every_catalog_name_and_reports_unknown_keys_once(ray_cluster, caplog):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exporter = RayMetricsExporter("catalog-check")
    assert [str(w.message) for w in caught] == []  # Ray warns about (and drops) invalid names

    with caplog.at_level(logging.WARNING, logger="mapo_ray.telemetry.ray_metrics"):
        exporter.record({"reward/mean": 0.5, "custom/thing": 1.0})
        exporter.record({"custom/thing": 2.0})
    warned = [r for r in caplog.records if "custom/thing" in r.getMessage()]
    assert len(warned) == 1 and "RAY_METRICS" in warned[0].getMessage()
    assert len({spec.prometheus_name for spec in RAY_METRICS}) == len(RAY_METRICS)
