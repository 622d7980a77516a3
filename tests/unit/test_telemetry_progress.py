"""Console progress: plain lines off a terminal (ray job logs), a tqdm bar on one."""

from __future__ import annotations

import io
import math

from mapo_ray.telemetry.progress import Progress, eval_line, format_duration, progress_line


class Clock:
    """A settable time source, so seconds per step and the ETA are exact."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_line_shows_step_reward_accuracy_rate_and_eta():
    line = progress_line(10, 100, {"reward/mean": 0.41234, "reward/accuracy": 0.375}, 2.0)
    assert line == "step 10/100 | reward 0.412 | acc 0.375 | 2.00 s/step | ETA 0:03:00"
    assert progress_line(1, 5, {}, math.nan) == "step 1/5 | reward - | acc - | - s/step | ETA -"


def test_format_duration():
    assert format_duration(3725.4) == "1:02:05"
    assert format_duration(90000) == "1 day, 1:00:00"
    assert format_duration(-3) == "0:00:00"
    assert format_duration(math.inf) == "-"


def test_plain_lines_off_a_terminal_measure_this_session_only():
    stream, clock = io.StringIO(), Clock()
    progress = Progress(50, start_step=20, stream=stream, clock=clock)  # resumed after step 20
    clock.now += 30.0
    progress.update(21, {"reward/mean": 0.5, "reward/accuracy": 0.25})
    clock.now += 10.0
    progress.update(22, {"reward/mean": 0.75, "reward/accuracy": 0.5})
    progress.note(eval_line(22, {"eval/accuracy": 0.3, "eval/format": 0.9}))
    progress.close()
    assert stream.getvalue().splitlines() == [
        "step 21/50 | reward 0.500 | acc 0.250 | 30.00 s/step | ETA 0:14:30",
        "step 22/50 | reward 0.750 | acc 0.500 | 20.00 s/step | ETA 0:09:20",
        "eval at step 22 | accuracy 0.300 | format 0.900",
    ]
    assert "\r" not in stream.getvalue()


def test_the_rate_starts_with_the_first_step_not_before_it():
    stream, clock = io.StringIO(), Clock()
    progress = Progress(10, stream=stream, clock=clock)
    clock.now += 100.0  # a warm-start and an evaluation, then step 1 takes 4 s of that
    progress.update(1, {"time/step_s": 4.0})
    clock.now += 6.0
    progress.update(2, {"time/step_s": 6.0})
    assert stream.getvalue().splitlines() == [
        "step 1/10 | reward - | acc - | 4.00 s/step | ETA 0:00:36",
        "step 2/10 | reward - | acc - | 5.00 s/step | ETA 0:00:40",
    ]


def test_a_terminal_gets_a_bar_with_reward_and_accuracy():
    stream = Terminal()
    progress = Progress(4, stream=stream)
    progress.update(1, {"reward/mean": 0.5, "reward/accuracy": 0.25})
    progress.update(2, {"reward/mean": 0.625, "reward/accuracy": 0.5})
    progress.note("eval at step 2 | accuracy 0.400")
    progress.close()
    out = stream.getvalue()
    assert "2/4" in out and "reward=0.625" in out and "acc=0.500" in out
    assert "eval at step 2 | accuracy 0.400" in out


def test_eval_line_without_headline_metrics():
    assert eval_line(3, {"eval/other": 1.0}) == "eval at step 3 | no headline metrics"
