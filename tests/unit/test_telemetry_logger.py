"""RunLogger's files and console, no Ray cluster needed: metrics.jsonl, TensorBoard
events read back, console lines and the PNGs drawn at close."""

from __future__ import annotations

import io
import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mapo_ray.telemetry import RunLogger, read_metrics


def scalars(run_dir, tag):
    events = EventAccumulator(str(run_dir)).Reload()
    return [(event.step, pytest.approx(event.value)) for event in events.Scalars(tag)]


def test_log_and_log_eval_reach_jsonl_tensorboard_and_console(tmp_path):
    stream = io.StringIO()
    with RunLogger(tmp_path, total_steps=3, stream=stream) as logger:
        logger.log(1, {"step": 1, "reward/mean": 0.25, "reward/accuracy": 0.125, "certainty/p_hist/0.00-0.10": 4})
        logger.log(2, {"reward/mean": 0.5, "reward/accuracy": 0.375, "certainty/p_hist/0.00-0.10": 2})
        logger.log_eval(2, {"accuracy": 0.3, "eval/format": 0.9})

    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [sorted(line) for line in lines] == [
        ["certainty/p_hist/0.00-0.10", "reward/accuracy", "reward/mean", "step", "time"],
        ["certainty/p_hist/0.00-0.10", "reward/accuracy", "reward/mean", "step", "time"],
        ["eval/accuracy", "eval/format", "step", "time"],
    ]
    assert lines[2]["step"] == 2 and lines[2]["eval/accuracy"] == 0.3

    assert scalars(tmp_path, "reward/mean") == [(1, 0.25), (2, 0.5)]
    assert scalars(tmp_path, "certainty/p_hist/0.00-0.10") == [(1, 4.0), (2, 2.0)]
    assert scalars(tmp_path, "eval/accuracy") == [(2, 0.3)]

    console = stream.getvalue().splitlines()
    assert console[0].startswith("step 1/3 | reward 0.250 | acc 0.125 |")
    assert console[2] == "eval at step 2 | accuracy 0.300 | format 0.900"
    assert (tmp_path / "curves.png").stat().st_size > 0 and (tmp_path / "certainty.png").stat().st_size > 0


def test_resume_drops_and_hides_the_interrupted_sessions_later_steps(tmp_path):
    first = RunLogger(tmp_path, total_steps=6, stream=io.StringIO())
    for step in range(1, 6):
        first.log(step, {"reward/mean": step / 10})
    first.close()

    # Resumed from a checkpoint at step 3: steps 4 and 5 are redone.
    with RunLogger(tmp_path, total_steps=6, start_step=3, stream=io.StringIO()) as resumed:
        for step in range(4, 7):
            resumed.log(step, {"reward/mean": step / 100})

    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [
        1, 2, 3, 4, 5, 6,
    ]
    steps, values = [1, 2, 3, 4, 5, 6], [0.1, 0.2, 0.3, 0.04, 0.05, 0.06]
    jsonl_steps, jsonl_values = read_metrics(tmp_path / "metrics.jsonl").series("reward/mean")
    assert jsonl_steps == steps and jsonl_values == pytest.approx(values)
    assert scalars(tmp_path, "reward/mean") == list(zip(steps, values))

    # A fresh run in the folder (the earlier attempts are gone: no checkpoint was kept).
    with RunLogger(tmp_path, total_steps=2, stream=io.StringIO()) as fresh:
        fresh.log(1, {"reward/mean": 0.5})
    assert read_metrics(tmp_path / "metrics.jsonl").series("reward/mean") == ([1], [0.5])
    assert scalars(tmp_path, "reward/mean") == [(1, 0.5)]


def test_steps_must_increase(tmp_path):
    with RunLogger(tmp_path, total_steps=5, start_step=2, stream=io.StringIO()) as logger:
        with pytest.raises(ValueError, match="step 2 logged after step 2"):
            logger.log(2, {"reward/mean": 0.1})
        logger.log(3, {"reward/mean": 0.1})
        with pytest.raises(ValueError, match="step 3 logged after step 3"):
            logger.log(3, {"reward/mean": 0.1})
        with pytest.raises(TypeError, match="step 4: metric 'reward/mean' is not a number"):
            logger.log(4, {"reward/mean": None})


def test_close_without_records_draws_nothing(tmp_path):
    logger = RunLogger(tmp_path / "run", total_steps=1, stream=io.StringIO())
    assert logger.close() == []
    assert logger.close() == []  # closing twice is harmless
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == ""
