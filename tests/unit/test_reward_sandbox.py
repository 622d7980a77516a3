"""The time-limited grading process: real child processes, real hangs, no Ray.

The reward functions below are named by import path (``test_reward_sandbox:...``),
as a user's would be; the child process finds this module through the sys.path it
inherits from the test process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from mapo_ray.config import RewardConfig
from mapo_ray.reward import GraderStartError, TimedGrader, call_reward_fn

LIMIT_S = 0.5


def by_content(response: str, answer: str) -> dict[str, float]:
    """A user reward function whose behaviour the response picks: ``kind:arg``."""
    kind, _, arg = response.partition(":")
    if kind == "hang":
        if arg:  # tell the test that the grading has started
            Path(arg).write_text(str(os.getpid()))
        time.sleep(3600)
    if kind == "exit":
        os._exit(3)
    if kind == "print":
        print("noise " * 20_000)  # far more than a pipe buffer
    if kind == "raise":
        raise RuntimeError("grader bug")
    return {"overall": float(arg == answer)}


def _config(function: str) -> RewardConfig:
    return RewardConfig(function=function, grading_timeout_s=LIMIT_S, call_timeout_s=10 * LIMIT_S)


@pytest.fixture(scope="module")
def grader():
    with TimedGrader(_config(f"{__name__}:by_content")) as g:
        yield g


@pytest.fixture(scope="module")
def math_grader():
    with TimedGrader(_config("math")) as g:
        yield g


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting to be reaped counts as dead)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_grades_the_same_as_in_process(grader):
    for response in ["ok:4", "ok:5", "print:4", "raise"]:
        assert grader.grade(response, "4") == call_reward_fn(by_content, response, "4")


def test_a_hang_is_a_timeout_and_the_process_is_replaced(grader):
    grader.grade("ok:4", "4")
    before = grader.pid
    graded = grader.grade("hang", "4")
    assert graded.failure == "timeout" and graded.scores is None
    assert graded.error == f"grading took longer than {LIMIT_S:g} s"
    assert before is not None and not _alive(before)  # killed and reaped, not leaked
    assert grader.grade("ok:4", "4").scores == {"overall": 1.0}
    assert grader.pid != before


def test_a_dying_grader_is_an_exception(grader):
    graded = grader.grade("exit", "4")
    assert (graded.failure, graded.error) == ("exception", "grading process died (exit code 3)")
    assert grader.grade("ok:4", "4").scores == {"overall": 1.0}


@pytest.mark.parametrize(
    "boxed",
    [
        "9^{9^{9^{9}}}",  # a power tower SymPy tries to evaluate
        "{" * 10_000 + "1" + "}" * 10_000,  # 10k nested braces
        "1+" * 50_000 + "1",  # 100k characters
    ],
    ids=["power-tower", "10k-nested-braces", "100k-chars"],
)
def test_adversarial_math_answers_are_counted_timeouts(math_grader, boxed):
    graded = math_grader.grade(f"<think>t</think> \\boxed{{{boxed}}}", "5")
    assert graded.failure == "timeout"
    assert math_grader.grade("<think>t</think> \\boxed{5}", "5").scores["overall"] == 1.0


def test_the_limit_holds_in_threads(grader):
    # math-verify's own (signal-based) timeout would refuse to run here at all.
    with ThreadPoolExecutor(max_workers=2) as pool:
        hung, fine = pool.map(grader.grade, ["hang", "ok:4"], ["4", "4"])
    assert hung.failure == "timeout"
    assert fine.scores == {"overall": 1.0}


def test_a_function_that_cannot_load_fails_at_start():
    with pytest.raises(GraderStartError, match=r"ConfigError: reward\.function 'no_such_module:fn': cannot import"):
        TimedGrader(_config("no_such_module:fn"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux-only")
def test_the_grading_process_dies_with_its_parent(tmp_path):
    # A parent (standing in for a reward actor) is SIGKILLed while its grading
    # process is stuck; the grading process must not outlive it.
    marker = tmp_path / "started"
    script = textwrap.dedent(
        f"""
        from mapo_ray.config import RewardConfig
        from mapo_ray.reward import TimedGrader
        grader = TimedGrader(RewardConfig(function="{__name__}:by_content", grading_timeout_s=600, call_timeout_s=601))
        grader.grade("hang:{marker}", "4")
        """
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    parent = subprocess.Popen([sys.executable, "-c", script], env=env)
    child = None
    try:
        for _ in range(600):  # up to 60 s for the parent and its child to start
            if marker.exists() and marker.read_text():
                break
            assert parent.poll() is None, "the parent exited early"
            time.sleep(0.1)
        child = int(marker.read_text())
        assert _alive(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        for _ in range(100):
            if not _alive(child):
                break
            time.sleep(0.1)
        assert not _alive(child)
    finally:
        parent.kill()
        parent.wait()
        if child is not None and _alive(child):
            os.kill(child, signal.SIGKILL)
