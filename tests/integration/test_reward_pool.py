"""The reward actor pool on a real local Ray cluster, with concurrent groups.

The user reward function below is named by import path
(``tests.integration.test_reward_pool:by_content``): Ray workers find it because
they start in the driver's working directory, the repository root.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
import ray

from mapo_ray.config import ConfigError, RewardConfig
from mapo_ray.reward import GroupRequest, failure_metrics
from mapo_ray.reward.group import RequestRef
from mapo_ray.reward.pool import RewardPool

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BY_CONTENT = "tests.integration.test_reward_pool:by_content"


def by_content(response: str, answer: str) -> dict[str, float]:
    """A user reward function whose behaviour the response picks: ``kind:arg``."""
    kind, _, arg = response.partition(":")
    if kind == "raise":
        raise RuntimeError("reward function bug")
    if kind == "hang":
        time.sleep(3600)
    if kind == "nan":
        return {"overall": float("nan")}
    if kind == "slow":
        time.sleep(0.5)
    if kind == "kill_actor":
        os.kill(os.getppid(), signal.SIGKILL)  # this grading process's parent is the reward actor
        time.sleep(3600)
    if kind == "kill_actor_once":  # arg: a marker file; the actor dies only while it is absent
        marker = Path(arg)
        if not marker.exists():
            marker.touch()
            os.kill(os.getppid(), signal.SIGKILL)
            time.sleep(3600)
        return {"overall": 1.0, "pid": float(os.getpid())}
    return {"overall": float(arg == answer), "pid": float(os.getpid())}


@pytest.fixture(autouse=True)
def importable_from_root(monkeypatch):
    # The driver checks the function path before starting actors, whatever the
    # sys.path pytest was started with.
    monkeypatch.syspath_prepend(str(ROOT))


def _config(**overrides) -> RewardConfig:
    settings = {"function": BY_CONTENT, "num_workers": 2, "cpus_per_worker": 0.5, "grading_timeout_s": 1.0}
    return RewardConfig(**{**settings, **overrides})


def test_math_groups_are_graded_concurrently_and_in_order(ray_cluster):
    answers = ["4", "\\frac{1}{2}", "2\\sqrt{3}", "30"]
    requests = [
        GroupRequest(
            uid=f"q{i}",
            answer=answers[i % 4],
            responses=[
                f"<think>t</think> \\boxed{{{answers[i % 4]}}}",  # right, well formed
                f"\\boxed{{{answers[i % 4]}}}",  # right, no thinking
                "<think>t</think> \\boxed{7}",  # wrong
            ],
        )
        for i in range(12)
    ]
    unparsable = GroupRequest(uid="bad", answer="???", responses=["\\boxed{1}", "no box"])
    with RewardPool(_config(function="math")) as pool:
        assert pool.size == 2
        results = pool.score(requests)
        (bad,) = pool.score([unparsable])
    assert bad.failures == ["bad_answer", "bad_answer"] and bad.rewards == [0.0, 0.0]
    assert [r.uid for r in results] == [f"q{i}" for i in range(12)]
    for result in results:
        assert result.rewards == pytest.approx([1.0, 0.9, 0.1])
        assert result.failures == [None, None, None]
        assert [s["format"] for s in result.scores] == [1.0, 0.0, 1.0]
    assert failure_metrics(results)["reward/graded"] == 36


def test_failures_get_zero_are_counted_and_the_pool_survives(ray_cluster):
    mixed = GroupRequest(uid="mixed", answer="4", responses=["ok:4", "raise", "hang", "nan", "ok:5", "ok:4"])
    clean = [GroupRequest(uid=f"c{i}", answer="1", responses=["ok:1", "ok:2"]) for i in range(6)]
    with RewardPool(_config()) as pool:
        results = pool.score([mixed, *clean])
        again = pool.score(clean)  # the same pool, after a hang, an exception and a NaN
    first = results[0]
    assert first.rewards == [1.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    assert first.failures == [None, "exception", "timeout", "nan", None, None]
    assert all(r.rewards == [1.0, 0.0] and r.failures == [None, None] for r in results[1:] + again)
    metrics = failure_metrics(results)
    kinds = ("exception", "timeout", "nan", "invalid", "bad_answer", "call_timeout", "actor_died")
    assert [metrics[f"reward/failed/{kind}"] for kind in kinds] == [1, 1, 1, 0, 0, 0, 0]
    assert metrics["reward/graded"] == 3 + 12
    # Both actors took groups: their grading processes differ.
    assert len({s["pid"] for r in results for s in r.scores if "pid" in s}) >= 2


def test_a_stuck_call_zeroes_at_once_a_group_that_always_kills_zeroes_after_its_retries(ray_cluster):
    slow = GroupRequest(uid="slow", answer="4", responses=["slow:4"] * 8)  # ~4 s of grading
    killer = GroupRequest(uid="killer", answer="4", responses=["kill_actor", "ok:4"])
    after = GroupRequest(uid="after", answer="4", responses=["ok:4"])
    with RewardPool(_config(num_workers=1, call_timeout_s=2.0, max_retries=1)) as pool:
        results = pool.score([slow, killer, after])
    assert results[0].failures == ["call_timeout"] * 8 and results[0].rewards == [0.0] * 8
    assert results[0].retries == 0  # an overrun is not retried: it would overrun again
    assert results[1].failures == ["actor_died"] * 2 and results[1].rewards == [0.0, 0.0]
    assert results[1].retries == 1  # it killed two actors: the first and its replacement
    assert results[2].rewards == [1.0] and results[2].failures == [None]
    metrics = failure_metrics(results)
    assert (metrics["reward/failed/call_timeout"], metrics["reward/failed/actor_died"]) == (8, 2)
    assert metrics["reward/retried"] == 1


@pytest.mark.parametrize("in_object_store", [False, True])
def test_a_group_whose_actor_dies_is_graded_again_by_another_actor(ray_cluster, tmp_path, in_object_store):
    """The reward actor's process is killed (SIGKILL, from its grading process) while it
    grades one group; that group is graded again, in full, by another actor. The same
    when the requests wait in the object store (``RequestRef``, as a run passes them)."""
    marker = tmp_path / "killed-once"
    victim = GroupRequest(uid="victim", answer="4", responses=["ok:4", f"kill_actor_once:{marker}", "ok:5"])
    others = [GroupRequest(uid=f"o{i}", answer="4", responses=["ok:4", "ok:3"]) for i in range(4)]
    requests = [*others[:2], victim, *others[2:]]
    if in_object_store:
        requests = [RequestRef(r.uid, r.size, ray.put(r)) for r in requests]
    with RewardPool(_config()) as pool:
        results = pool.score(requests)
    assert marker.exists()  # an actor did die
    assert [r.uid for r in results] == ["o0", "o1", "victim", "o2", "o3"]
    assert results[2].rewards == [1.0, 1.0, 0.0] and results[2].failures == [None, None, None]
    assert results[2].retries == 1
    assert all(r.rewards == [1.0, 0.0] and r.retries == 0 for i, r in enumerate(results) if i != 2)
    metrics = failure_metrics(results)
    assert metrics["reward/retried"] == 1 and metrics["reward/failed/actor_died"] == 0
    assert metrics["reward/graded"] == 3 + 8


def test_a_reward_actor_killed_while_it_starts_is_replaced(ray_cluster, caplog):
    started = time.time()
    pools: list[RewardPool] = []
    config = _config(function="tests.integration.slow_rewards:score", max_retries=1)
    starting = threading.Thread(target=lambda: pools.append(RewardPool(config)))
    starting.start()
    deadline = time.monotonic() + 120
    while not (workers := _reward_workers(started)):
        assert time.monotonic() < deadline, "no reward actor started"
        time.sleep(0.05)
    workers[0].send_signal(signal.SIGKILL)  # in its constructor: its grading process imports for 3 s
    starting.join(timeout=180)
    (pool,) = pools
    with pool:
        assert pool.score([GroupRequest("g", "4", ["4", "5"])])[0].rewards == [1.0, 0.0]
    assert "reward actor died while it started; starting another" in caplog.text


def _reward_workers(since: float) -> list[psutil.Process]:
    """This cluster's reward actor processes started after ``since``."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.cmdline()[:1] and proc.cmdline()[0].startswith("ray::RewardWorker") and proc.create_time() >= since:
                found.append(proc)
        except psutil.Error:
            pass
    return found


def test_a_wrong_function_path_fails_at_start_up(ray_cluster):
    with pytest.raises(ConfigError, match=r"reward\.function 'tests\.integration\.nope:score': cannot import module"):
        RewardPool(_config(function="tests.integration.nope:score"))

