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
from mapo_ray.reward.sandbox import grading_env, is_secret_name

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
    if kind == "sigkill":  # as if killed from outside: always, or only while the file arg is absent
        if not arg or not Path(arg).exists():
            if arg:
                Path(arg).touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return {"overall": 1.0}
    if kind == "print":
        print("noise " * 20_000)  # far more than a pipe buffer
    if kind == "raise":
        raise RuntimeError("grader bug")
    if kind == "alloc":  # 10 GiB: past any memory limit these tests set
        return {"overall": float(len(bytearray(10 * 2**30)))}
    if kind == "abort":  # how C code such as GMP reacts to a failed allocation
        os.abort()
    if kind == "spin":  # a busy loop: burns CPU time, either forever or for arg CPU seconds
        end = time.process_time() + float(arg or "inf")
        while time.process_time() < end:
            pass
        return {"overall": 1.0}
    if kind == "env":  # which of the names in arg the grading process can see
        return {"overall": 0.0, **{name: float(name in os.environ) for name in arg.split(",")}}
    return {"overall": float(arg == answer)}


def _config(function: str, **limits) -> RewardConfig:
    settings = {"grading_timeout_s": LIMIT_S, "call_timeout_s": 10 * LIMIT_S, **limits}
    return RewardConfig(function=function, **settings)


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


def test_a_grading_process_killed_from_outside_is_graded_again_once(grader, tmp_path):
    marker = tmp_path / "killed-once"
    graded = grader.grade(f"sigkill:{marker}", "4")
    assert marker.exists() and graded.scores == {"overall": 1.0} and graded.regraded
    # An input that kills it every time is a failure after the second try.
    graded = grader.grade("sigkill", "4")
    assert (graded.failure, graded.error) == ("exception", f"grading process died (exit code {-signal.SIGKILL})")
    assert graded.regraded
    assert not grader.grade("ok:4", "4").regraded


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


def _limits(pid: int) -> dict[str, str]:
    """The soft limits of process ``pid`` by name, from ``/proc/<pid>/limits``."""
    lines = Path(f"/proc/{pid}/limits").read_text().splitlines()[1:]
    return {line[:26].strip(): line[26:47].strip() for line in lines}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_grading_process_runs_under_the_default_limits(grader):
    grader.grade("ok:4", "4")
    limits = _limits(grader.pid)
    assert limits["Max address space"] == str(4096 * 2**20)  # reward.grading_memory_mb
    assert limits["Max cpu time"] != "unlimited"  # re-armed before each grading


def test_an_allocation_past_the_memory_limit_is_a_memory_failure_and_the_process_is_replaced(grader):
    # The default limit (4 GiB) applies: without it, 10 GiB of zeroed pages would be
    # granted lazily, and touching them would be a matter for the node's OOM killer.
    grader.grade("ok:4", "4")
    before = grader.pid
    graded = grader.grade("alloc", "4")
    assert graded.failure == "memory" and graded.scores is None
    assert graded.error.startswith("MemoryError")
    assert before is not None and not _alive(before)
    assert grader.grade("ok:4", "4").scores == {"overall": 1.0}
    assert grader.pid != before


def test_an_abort_is_a_memory_failure_only_under_a_memory_limit():
    with TimedGrader(_config(f"{__name__}:by_content")) as limited:
        graded = limited.grade("abort", "4")
        assert graded.failure == "memory" and "reward.grading_memory_mb=4096" in graded.error
        assert limited.grade("ok:4", "4").scores == {"overall": 1.0}
    with TimedGrader(_config(f"{__name__}:by_content", grading_memory_mb=None)) as unlimited:
        assert unlimited.grade("abort", "4").failure == "exception"


def test_a_memory_limit_too_small_for_the_reward_function_fails_at_start(tmp_path, monkeypatch):
    # A user module that needs 300 MiB to import, under a 256 MiB limit.
    (tmp_path / "greedy_reward.py").write_text("TABLE = bytearray(300 * 2**20)\ndef score(r, a):\n    return {}\n")
    monkeypatch.syspath_prepend(str(tmp_path))  # the grading process inherits sys.path
    with pytest.raises(GraderStartError, match=r"MemoryError.*under reward\.grading_memory_mb=256"):
        TimedGrader(_config("greedy_reward:score", grading_memory_mb=256))


def test_a_busy_loop_past_the_cpu_limit_is_a_cpu_failure_and_the_process_is_replaced():
    # The wall-clock limit is far above the CPU limit: the kernel ends the grading.
    with TimedGrader(_config(f"{__name__}:by_content", grading_cpu_s=1, grading_timeout_s=60, call_timeout_s=120)) as g:
        before = g.pid
        start = time.monotonic()
        graded = g.grade("spin", "4")
        assert time.monotonic() - start < 30
        assert (graded.failure, graded.error) == (
            "cpu",
            "grading used more than 1 s of CPU time (reward.grading_cpu_s)",
        )
        assert before is not None and not _alive(before)
        assert g.grade("ok:4", "4").scores == {"overall": 1.0}
        assert g.pid != before


def test_the_cpu_limit_is_per_grading_not_per_process():
    # Three gradings of 0.6 CPU seconds each under a 1 s limit: together they pass it,
    # each alone does not, and the process (with its start-up CPU time) is never replaced.
    with TimedGrader(_config(f"{__name__}:by_content", grading_cpu_s=1, grading_timeout_s=60, call_timeout_s=120)) as g:
        pid = g.pid
        for _ in range(3):
            assert g.grade("spin:0.6", "4").scores == {"overall": 1.0}
        assert g.pid == pid


SECRETS = ("HF_TOKEN", "RAY_AUTH_TOKEN", "AWS_SECRET_ACCESS_KEY", "OPENAI_API_KEY", "HTTPS_PROXY")


def test_the_grading_process_does_not_inherit_secrets(monkeypatch):
    for name in SECRETS:
        monkeypatch.setenv(name, "http://user:hunter2@proxy:3128" if name == "HTTPS_PROXY" else "hunter2")
    monkeypatch.setenv("MAPO_PLAIN_SETTING", "1")
    names = ",".join((*SECRETS, "PATH", "HOME", "LANG", "MAPO_PLAIN_SETTING"))
    with TimedGrader(_config(f"{__name__}:by_content")) as g:
        seen = g.grade(f"env:{names}", "4").scores
    assert seen is not None
    assert {name: seen[name] for name in SECRETS} == dict.fromkeys(SECRETS, 0.0)
    assert seen["PATH"] == seen["MAPO_PLAIN_SETTING"] == 1.0
    assert (seen["HOME"], seen["LANG"]) == (float("HOME" in os.environ), float("LANG" in os.environ))
    # ... unless the config passes one on by name.
    with TimedGrader(_config(f"{__name__}:by_content", grading_env_keep=["OPENAI_API_KEY"])) as g:
        seen = g.grade("env:OPENAI_API_KEY,HF_TOKEN", "4").scores
    assert seen is not None and (seen["OPENAI_API_KEY"], seen["HF_TOKEN"]) == (1.0, 0.0)


@pytest.mark.parametrize(
    "name",
    [
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        "RAY_AUTH_TOKEN",
        "GH_TOKEN",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_ACCESS_KEY_ID",
        "AWS_PROFILE",
        "OPENAI_API_KEY",
        "WANDB_API_KEY",
        "SSH_AUTH_SOCK",
        "PGPASSWORD",
        "db_password",
        "GOOGLE_APPLICATION_CREDENTIALS",
        "AZURE_CLIENT_SECRET",
        "MY_PRIVATE_KEY_PATH",
        "KEY",
    ],
)
def test_secret_names(name):
    assert is_secret_name(name)
    assert grading_env({name: "x", "PATH": "/bin"}) == {"PATH": "/bin"}
    assert grading_env({name: "x"}, keep=[name]) == {name: "x"}


@pytest.mark.parametrize(
    "name",
    ["PATH", "PYTHONPATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "KEYBOARD",
     "MONKEY_MODE", "HF_HOME", "RAY_ADDRESS", "VIRTUAL_ENV"],
)
def test_names_python_needs_are_not_secrets(name):
    assert not is_secret_name(name)


def test_a_url_with_a_password_is_a_secret_whatever_its_name():
    env = {"HTTPS_PROXY": "http://u:p@proxy:3128", "HTTP_PROXY": "http://proxy:3128", "DB": "postgres://me@db/x"}
    assert grading_env(env) == {"HTTP_PROXY": "http://proxy:3128", "DB": "postgres://me@db/x"}
