"""Run telemetry: metrics.jsonl, TensorBoard, Ray dashboard gauges, console progress, PNGs.

``RAY_METRICS`` (``catalog``, plain data) lists every exported Ray
metric with its description and tag keys. The PNGs come from
``mapo_ray.telemetry.plots`` (``python -m mapo_ray.telemetry.plots RUN_DIR``).
"""

from mapo_ray.telemetry.catalog import RAY_METRICS, RayMetricSpec, route
from mapo_ray.telemetry.logger import RunLogger
from mapo_ray.telemetry.progress import Progress
from mapo_ray.telemetry.records import METRICS_FILE, MetricsHistory, clean_metrics, read_metrics

__all__ = [
    "METRICS_FILE",
    "RAY_METRICS",
    "MetricsHistory",
    "Progress",
    "RayMetricSpec",
    "RunLogger",
    "clean_metrics",
    "read_metrics",
    "route",
]
