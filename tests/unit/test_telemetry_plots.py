"""PNG summaries drawn from a synthetic metrics.jsonl alone."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from PIL import Image

from mapo_ray.telemetry.plots import main, plot_run


def write_history(path, steps=30, certainty=True):
    """A run whose groups drift from p = 0 to p = 1, with an evaluation every 10 steps."""
    with path.open("w") as f:
        for step in range(1, steps + 1):
            skill = step / steps
            record = {"step": step, "time": float(step), "reward/mean": skill, "reward/std": 0.1}
            record["reward/accuracy"] = skill * 0.9
            if certainty:
                hist = np.zeros(10)
                hist[min(int(skill * 10), 9)] = 6
                hist[0] += 2
                for i, count in enumerate(hist):
                    record[f"certainty/p_hist/{i / 10:.2f}-{(i + 1) / 10:.2f}"] = count
                record["certainty/lambda_mean"] = abs(1 - 2 * skill)
                record["certainty/p_extreme_frac"] = 0.25
                record["certainty/zero_variance_frac"] = 0.25
            f.write(json.dumps(record) + "\n")
            if step % 10 == 0:
                f.write(json.dumps({"step": step, "time": float(step), "eval/accuracy": skill * 0.8}) + "\n")


def assert_drawn(path):
    with Image.open(path) as image:
        image.load()
        assert image.format == "PNG" and image.width > 400 and image.height > 300
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
    # Axes, curves and a colour map: far more than a blank canvas's few colours.
    assert len(np.unique(pixels, axis=0)) > 50


def test_plot_run_writes_curves_and_certainty(tmp_path):
    write_history(tmp_path / "metrics.jsonl")
    written = plot_run(tmp_path)
    assert written == [tmp_path / "curves.png", tmp_path / "certainty.png"]
    for path in written:
        assert_drawn(path)


def test_command_line_prints_the_files(tmp_path, capsys):
    write_history(tmp_path / "metrics.jsonl", steps=3)
    main([str(tmp_path)])
    assert capsys.readouterr().out.split() == [str(tmp_path / "curves.png"), str(tmp_path / "certainty.png")]
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "missing")])
    assert exit_info.value.code == 1
    assert "no metrics.jsonl in" in capsys.readouterr().err


def test_missing_certainty_metrics_skip_that_plot_with_a_warning(tmp_path, caplog):
    write_history(tmp_path / "metrics.jsonl", certainty=False)
    with caplog.at_level(logging.WARNING):
        assert plot_run(tmp_path) == [tmp_path / "curves.png"]
    assert "certainty.png" in caplog.text
    assert not (tmp_path / "certainty.png").exists()


def test_empty_or_missing_metrics_are_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl in"):
        plot_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match="has no records to plot"):
        plot_run(tmp_path)


def test_malformed_histogram_key_is_named(tmp_path):
    record = {"step": 1, "certainty/p_hist/low": 3}
    (tmp_path / "metrics.jsonl").write_text(json.dumps(record) + "\n")
    with pytest.raises(ValueError, match=r"'certainty/p_hist/low' is not of the form"):
        plot_run(tmp_path)
