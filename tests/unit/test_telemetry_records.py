"""metrics.jsonl: value checks, the writer (append, torn tail, non-finite values) and the reader."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import torch

from mapo_ray.telemetry.records import JsonlWriter, clean_metrics, read_metrics


def test_clean_metrics_converts_numbers_and_prefixes_eval_keys():
    out = clean_metrics(
        3,
        {"step": 3, "a/int": np.int64(4), "a/float": np.float32(0.5), "a/tensor": torch.tensor(2.5), "a/bool": True},
    )
    assert out == {"a/int": 4, "a/float": 0.5, "a/tensor": 2.5, "a/bool": 1}
    assert all(type(v) in (int, float) for v in out.values())
    assert clean_metrics(0, {"accuracy": 0.5, "eval/format": 1.0}, prefix="eval/") == {
        "eval/accuracy": 0.5,
        "eval/format": 1.0,
    }


@pytest.mark.parametrize(
    ("metrics", "error", "match"),
    [
        ({"reward/mean": "high"}, TypeError, r"step 7: metric 'reward/mean' is not a number"),
        ({"reward/mean": [0.1, 0.2]}, TypeError, r"'reward/mean' is not a number"),
        ({"actor/kl": torch.ones(2)}, TypeError, r"'actor/kl' is not a number"),
        ({"step": 6}, ValueError, r"step 7: metrics carry a different 'step' value 6"),
        ({"time": 1.0}, ValueError, r"'time' is reserved"),
        ({"": 1.0}, TypeError, r"non-empty strings"),
        ({3: 1.0}, TypeError, r"non-empty strings"),
    ],
)
def test_clean_metrics_names_the_bad_key(metrics, error, match):
    with pytest.raises(error, match=match):
        clean_metrics(7, metrics)


@pytest.mark.parametrize("step", [-1, 1.5, True, "3"])
def test_clean_metrics_rejects_bad_step(step):
    with pytest.raises(ValueError, match="step must be a non-negative int"):
        clean_metrics(step, {})


def test_writer_lines_and_a_resume_that_drops_the_steps_it_does_again(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    first = JsonlWriter(path)
    first.write(0, {"eval/accuracy": 0.1})  # the warm-start's evaluation
    first.write(1, {"reward/mean": 0.25, "data/skipped/corrupt_image": 2})
    first.write(2, {"reward/mean": 0.5})
    # Each line is on disk as soon as it is written, before close.
    assert len(path.read_text().splitlines()) == 3
    first.close()

    resumed = JsonlWriter(path, start_step=1)  # from the step-1 checkpoint: step 2 again
    resumed.write(2, {"reward/mean": 0.75})
    resumed.write(3, {"eval/accuracy": 0.4})
    resumed.close()

    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["step"] for line in lines] == [0, 1, 2, 3]
    assert lines[1]["data/skipped/corrupt_image"] == 2 and isinstance(lines[1]["data/skipped/corrupt_image"], int)
    assert all(isinstance(line["time"], float) for line in lines)
    assert lines[0]["time"] <= lines[-1]["time"]

    history = read_metrics(path)
    assert history.series("reward/mean") == ([1, 2], [0.25, 0.75])
    assert history.series("eval/accuracy") == ([0, 3], [0.1, 0.4])
    assert 3 not in history.train

    fresh = JsonlWriter(path)  # a fresh run in this folder: the earlier attempt left no checkpoint
    fresh.write(1, {"reward/mean": 0.3})
    fresh.close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1]


def test_non_finite_values_become_null_with_a_warning(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    writer = JsonlWriter(path)
    with caplog.at_level(logging.WARNING):
        writer.write(5, {"actor/kl": math.nan, "actor/grad_norm": math.inf, "reward/mean": 0.5})
    writer.close()
    assert "step 5" in caplog.text and "actor/kl" in caplog.text and "actor/grad_norm" in caplog.text
    line = json.loads(path.read_text())  # strict JSON: no NaN tokens
    assert line["actor/kl"] is None and line["actor/grad_norm"] is None
    history = read_metrics(path)
    assert history.train[5]["actor/kl"] is None
    assert history.series("actor/kl") == ([], [])


def test_torn_last_line_is_dropped_on_resume(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "time": 0.0, "reward/mean": 0.1}\n{"step": 2, "time": 0.0, "rew')
    with caplog.at_level(logging.WARNING):
        writer = JsonlWriter(path, start_step=1)
    assert "unfinished last line" in caplog.text
    writer.write(2, {"reward/mean": 0.2})
    writer.close()
    assert read_metrics(path).series("reward/mean") == ([1, 2], [0.1, 0.2])


def test_torn_only_line_is_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "ti')
    JsonlWriter(path).close()
    assert path.read_text() == ""


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("not json", r"metrics.jsonl:2: not valid JSON"),
        ("[1, 2]", r"metrics.jsonl:2: expected a JSON object"),
        ('{"time": 1.0, "a": 1}', r"metrics.jsonl:2: missing or non-integer 'step'"),
        ('{"step": "2", "a": 1}', r"metrics.jsonl:2: missing or non-integer 'step'"),
        ('{"step": 2, "a": "x"}', r"metrics.jsonl:2: metric 'a' is not a number"),
    ],
)
def test_reader_names_file_and_line(tmp_path, line, match):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "a": 1}\n' + line + "\n")
    with pytest.raises(ValueError, match=match):
        read_metrics(path)
