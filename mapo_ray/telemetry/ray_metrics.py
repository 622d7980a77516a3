"""Export step metrics to the Ray dashboard through ``ray.util.metrics`` gauges.

Gauges, not a ``ray.util.metrics.Histogram``, carry the certainty histogram: the
training loop hands over each step's bin counts, already aggregated, and a gauge
per bin shows exactly that step's distribution. A Ray histogram would need every
group's p, would accumulate over the whole run (a dashboard would have to take
rates to see one step), and cannot have a bucket edge at 0, where the p = 0
groups MAPO cares about sit (Ray requires positive boundaries).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from ray.util.metrics import Gauge

from mapo_ray.telemetry.catalog import RAY_METRICS, RUN_TAG, route

logger = logging.getLogger(__name__)


class RayMetricsExporter:
    """Sets one gauge per ``RAY_METRICS`` entry; needs Ray initialized in this process."""

    def __init__(self, run_name: str) -> None:
        self._run_name = run_name
        self._gauges = {
            spec.name: Gauge(spec.name, description=spec.description, tag_keys=spec.tag_keys)
            for spec in RAY_METRICS
        }
        self._unexported: set[str] = set()

    def record(self, metrics: Mapping[str, float]) -> None:
        """Set the gauge of every key in ``metrics``; a key not in ``RAY_METRICS`` is
        reported once (it still reaches metrics.jsonl and TensorBoard)."""
        for key, value in metrics.items():
            routed = route(key)
            if routed is None:
                if key not in self._unexported:
                    self._unexported.add(key)
                    logger.warning(
                        "metric %r is not exported to Ray: it has no entry in "
                        "mapo_ray.telemetry.catalog.RAY_METRICS",
                        key,
                    )
                continue
            spec, tags = routed
            self._gauges[spec.name].set(float(value), tags={RUN_TAG: self._run_name, **tags})

