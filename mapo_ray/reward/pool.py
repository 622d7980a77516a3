"""The reward actor pool: CPU actors that grade whole groups, many groups at a time.

Each ``RewardWorker`` is a thin actor around one ``TimedGrader`` (every grading in a
child process with its own time limit). ``RewardPool`` lives in the process that made
it (in a run, the rollout coordinator on learner rank 0, so the actors die with it
and a restarted learner starts a fresh pool) and hands out one group per idle actor,
so a slow group never queues others behind it and each call's deadline
(``reward.call_timeout_s``) runs from the moment an actor starts on it. When an actor
dies, it is replaced and its group is graded again by the next idle actor, up to
``reward.max_retries`` times (counted in ``GroupResult.retries``); a group still
unlucky after that gets reward 0 (``actor_died``). A call that overruns gets reward 0
(``call_timeout``) at once: a hanging reward function would hang again, so it costs
one time-out, not several. Either way the actor is replaced before it gets more work:
the pool survives anything a reward function does.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from collections.abc import Sequence
from typing import cast

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError

from mapo_ray.config import RewardConfig
from mapo_ray.reward.contract import FailureKind
from mapo_ray.reward.functions import load_reward_fn
from mapo_ray.reward.group import GroupRequest, GroupResult, RequestRef, grade_group, log_failure
from mapo_ray.reward.sandbox import TimedGrader
from mapo_ray.sync.errors import first_line

logger = logging.getLogger(__name__)


@ray.remote
class RewardWorker:
    """One reward actor: grades a group per call with its own grading process."""

    def __init__(self, config: RewardConfig) -> None:
        self._grader = TimedGrader(config)

    def ready(self) -> bool:
        return True

    def score(self, request: GroupRequest) -> GroupResult:
        return grade_group(request, self._grader.grade)


class RewardPool:
    """``config.num_workers`` reward actors behind one blocking ``score`` call.

    Construction fails fast, in the caller, on a reward function that cannot be
    loaded, and waits (up to ``start_timeout_s``) until every actor is ready. Not
    thread-safe: one ``score`` call at a time.
    """

    def __init__(self, config: RewardConfig, start_timeout_s: float = 120.0) -> None:
        load_reward_fn(config)  # a wrong reward.function raises ConfigError here, not mid-run
        self._config = config
        self._start_timeout_s = start_timeout_s
        self._actors = [self._spawn() for _ in range(config.num_workers)]
        self._await_ready(list(range(config.num_workers)))

    @property
    def size(self) -> int:
        return len(self._actors)

    def score(self, requests: Sequence[GroupRequest | RequestRef]) -> list[GroupResult]:
        """Grade every group; results are in the order of ``requests``.

        A ``RequestRef`` goes to its actor as the object reference it is: the actor reads
        the responses from the object store, and they never pass through this process.

        Never raises for a reward function's failure or a lost actor: a group whose
        actor died is retried (``reward.max_retries``), and failed rollouts get
        reward 0 and a failure kind (count both with ``group.failure_metrics``).
        Raises only if a replacement actor cannot start.
        """
        if not self._actors:
            raise RuntimeError("RewardPool.score called after shutdown")
        results: list[GroupResult | None] = [None] * len(requests)
        retries = [0] * len(requests)
        waiting = deque(range(len(requests)))
        idle = list(range(len(self._actors)))
        running: dict[ray.ObjectRef, tuple[int, int, float]] = {}  # call -> (actor slot, request, deadline)
        while waiting or running:
            while idle and waiting:
                slot, index = idle.pop(), waiting.popleft()
                request = requests[index]
                call = self._actors[slot].score.remote(request.ref if isinstance(request, RequestRef) else request)
                running[call] = (slot, index, time.monotonic() + self._config.call_timeout_s)
            nearest = min(deadline for _, _, deadline in running.values())
            ray.wait(list(running), num_returns=1, timeout=max(nearest - time.monotonic(), 0.0))
            # Collect every finished call before judging deadlines, so a call that
            # finished while the loop was busy is never taken for an overrun one.
            done, _ = ray.wait(list(running), num_returns=len(running), timeout=0)
            now = time.monotonic()
            for call in done:
                slot, index, _ = running.pop(call)
                try:
                    results[index] = dataclasses.replace(ray.get(call), retries=retries[index])
                except RayActorError as err:
                    if retries[index] < self._config.max_retries:
                        retries[index] += 1
                        logger.warning(
                            "reward actor died grading group %r (%s); grading it again (retry %d of %d)",
                            requests[index].uid,
                            first_line(err),
                            retries[index],
                            self._config.max_retries,
                        )
                        self._replace(slot)
                        waiting.appendleft(index)
                    else:
                        results[index] = self._lose(slot, requests[index], "actor_died", str(err), retries[index])
                except RayError as err:  # a bug outside the reward function; keep going, loudly
                    results[index] = self._lose(slot, requests[index], "exception", str(err), retries[index])
                idle.append(slot)
            for call, (slot, index, deadline) in list(running.items()):
                if now >= deadline:
                    del running[call]
                    detail = f"actor call took longer than {self._config.call_timeout_s:g} s"
                    results[index] = self._lose(slot, requests[index], "call_timeout", detail, retries[index])
                    idle.append(slot)
        return cast(list[GroupResult], results)  # the loop above fills every slot

    def shutdown(self) -> None:
        """Kill every actor (their grading processes die with them)."""
        for actor in self._actors:
            ray.kill(actor)
        self._actors = []

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def _lose(
        self, slot: int, request: GroupRequest | RequestRef, kind: FailureKind, detail: str, retries: int
    ) -> GroupResult:
        """Zero a group whose call failed, and put a fresh actor in ``slot``."""
        if isinstance(request, GroupRequest):
            first, answer = (request.responses[0] if request.responses else ""), request.answer
        else:
            first, answer = "(in the object store)", "(in the object store)"
        log_failure(kind, detail, request.uid, f"(all {request.size})", first, answer)
        self._replace(slot)
        return GroupResult.all_failed(request, kind, retries)

    def _replace(self, slot: int) -> None:
        ray.kill(self._actors[slot])
        self._actors[slot] = self._spawn()
        self._await_ready([slot])

    def _spawn(self) -> ray.actor.ActorHandle:
        config = self._config
        return RewardWorker.options(num_cpus=config.cpus_per_worker, resources=config.resources).remote(config)

    def _await_ready(self, slots: list[int]) -> None:
        """Wait until the actors in ``slots`` are ready, at most ``start_timeout_s``.

        One whose process died while it started (killed, not failed: its constructor did
        not raise) is replaced, at most ``reward.max_retries`` times in all; past that, a
        constructor that raised or a time-out, the actors are killed and RuntimeError says why.
        """
        retries = 0
        waiting = list(slots)
        while waiting:
            refs = {self._actors[slot].ready.remote(): slot for slot in waiting}
            waiting = []
            try:
                ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=self._start_timeout_s)
                if pending:
                    raise GetTimeoutError(f"{len(pending)} not ready within {self._start_timeout_s:g}s")
                for ref in ready:
                    try:
                        ray.get(ref)
                    except RayActorError as err:
                        if err.actor_init_failed or retries >= self._config.max_retries:
                            raise
                        retries += 1
                        logger.warning("reward actor died while it started; starting another: %s", first_line(err))
                        self._actors[refs[ref]] = self._spawn()
                        waiting.append(refs[ref])
            except RayError as err:
                for slot in slots:
                    ray.kill(self._actors[slot])
                raise RuntimeError(f"reward actors did not start: {err}") from err
