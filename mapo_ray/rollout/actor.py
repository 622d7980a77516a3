"""Rollout actors: thin Ray actors that own one engine each, and the driver-side calls to them.

A ``RolloutActor`` holds its engine and its counters; the work is the engine's. The
coordinator calls it through the ``RolloutWorker`` protocol: ``rollout`` takes its
prompts straight from the object store (an ``ObjectRef`` the prompt reader made) and
leaves its output there, one object per group for the reward pool (the response
texts) and one for the learner rank that trains on it (tokens, log-probs, images);
only a small ``GroupSummary`` per group comes back to the caller. ``generate``
returns whole groups, for callers that want them in hand. Weight updates
(``join_weight_sync`` / ``receive_weights``, the methods
``mapo_ray.sync.ray_sync.RayWeightSync`` calls) fit between two calls, and the caller
decides how stale a batch may be. The ``GroupAddress`` that ``join_weight_sync`` gets
holds the group's secret: it goes on to the engine (and from a vLLM engine to its workers,
pickled through ``collective_rpc``) and into no log.

An engine error comes back as ``RolloutError`` naming the actor; ``collect`` turns a
dead, failing or silent actor into one ``RolloutError`` naming each of them.

With ``rollout.max_restarts`` > 0, Ray restarts an actor whose process died (same
name, config and seed; the handle stays valid). The restarted actor holds the model
folder's weights and no weight-sync group, so it refuses to generate
(``ActorRestartedError``) until a weight update loads; ``gather`` reports it, and an
actor lost mid-call, apart from the other failures, so the caller can re-form the
group, resend the weights (``await_restart``, then ``RayWeightSync.connect``) and
re-issue only the lost calls.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import ray
from ray.actor import ActorHandle
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError
from ray.util.annotations import RayDeprecationWarning

from mapo_ray.config import RolloutConfig
from mapo_ray.models.folder import model_folder_here
from mapo_ray.reward.group import GroupRequest
from mapo_ray.rollout.engine import RolloutEngine, make_engine
from mapo_ray.sync import GroupAddress, SyncPlan
from mapo_ray.sync.errors import NotInGroupError, first_line
from mapo_ray.types import Group, GroupPayload, GroupSummary, Prompt, SamplingParams, count_tokens


class RolloutError(RuntimeError):
    """A rollout actor failed; the message names the actor and what it was doing."""


class ActorRestartedError(RolloutError):
    """A restarted rollout actor was asked to generate before a weight update reached it."""


EngineFactory = Callable[[RolloutConfig, str, int], RolloutEngine]


class RolloutWorker(Protocol):
    """What the coordinator calls on a rollout actor, each through Ray's ``.remote``.

    ``rollout`` is called with ``.options(num_returns=rollout_returns(len(prompts)))``:
    its outputs are ``rollout_outputs``'s, each its own object in the object store.
    """

    def rollout(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[Any]: ...

    def sync_ranks(self) -> int: ...

    def join_weight_sync(self, address: GroupAddress, first_rank: int) -> None: ...

    def receive_weights(self, plan: SyncPlan) -> int: ...

    def weight_version(self) -> int | None: ...


def rollout_returns(num_prompts: int) -> int:
    """The ``num_returns`` of a ``rollout`` call on ``num_prompts`` prompts."""
    return 1 + 2 * num_prompts


def rollout_outputs(prompts: Sequence[Prompt], groups: Sequence[Group]) -> list[Any]:
    """``[summaries, request_1..request_k, payload_1..payload_k]`` of k prompts and their groups:
    the ``GroupSummary`` list the coordinator reads, each group's ``GroupRequest`` for the
    reward pool and its ``GroupPayload`` for the learner."""
    requests = [GroupRequest(g.uid, g.answer, [s.response_text for s in g.samples]) for g in groups]
    payloads = [GroupPayload(g, p.images) for p, g in zip(prompts, groups)]
    return [[GroupSummary.of(g) for g in groups], *requests, *payloads]


@ray.remote
class RolloutActor:
    """One engine on one model copy, named ``name`` in every error and metric.

    The engine is ``cfg.engine``'s, or ``engine_factory(cfg, model_path, seed)``'s when
    given: tests and benchmarks hand in their doubles this way.
    """

    def __init__(
        self,
        name: str,
        cfg: RolloutConfig,
        model_path: str | os.PathLike,
        seed: int = 0,
        engine_factory: EngineFactory | None = None,
    ) -> None:
        self.name = name
        folder = model_folder_here(model_path, f"rollout actor {name!r}")
        self._engine = (engine_factory or make_engine)(cfg, str(folder), seed)
        # A restart reloads the model folder: whatever version the run is at, these are not its weights.
        with warnings.catch_warnings():
            # Ray 2.60's property reads its own deprecated ``actor_id``: nothing to change here.
            warnings.simplefilter("ignore", RayDeprecationWarning)
            self._restarted = ray.get_runtime_context().was_current_actor_reconstructed
        self._joined = False  # this process joined a weight-sync group (its predecessor's does not count)
        self._tokens = 0
        self._seconds = 0.0
        self._last_tokens_per_s = 0.0

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[Group]:
        """``params.n`` samples for each prompt, one group per prompt in order."""
        if self._restarted:
            raise ActorRestartedError(
                f"rollout actor {self.name!r} was restarted and has not received the current weights yet"
            )
        start = time.perf_counter()
        try:
            groups = self._engine.generate(prompts, params)
        except Exception as err:
            uids = ", ".join(p.uid for p in prompts[:3]) + (", ..." if len(prompts) > 3 else "")
            raise RolloutError(
                f"rollout actor {self.name!r}: generating for {len(prompts)} prompt(s) ({uids}) failed: "
                f"{type(err).__name__}: {err}"
            ) from err
        seconds = time.perf_counter() - start
        tokens = count_tokens(groups)
        self._tokens += tokens
        self._seconds += seconds
        self._last_tokens_per_s = tokens / seconds if seconds > 0 else 0.0
        return groups

    def rollout(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[Any]:
        """``generate``, its outputs split as ``rollout_outputs`` splits them (see ``RolloutWorker``)."""
        return rollout_outputs(prompts, self.generate(prompts, params))

    def sync_ranks(self) -> int:
        """Ranks this actor holds in a weight-sync group (``RayWeightSync.connect``'s ``ranks_per_actor``)."""
        return self._engine.sync_ranks

    def join_weight_sync(self, address: GroupAddress, first_rank: int) -> None:
        self._engine.join_weight_sync(address, first_rank)
        self._joined = True

    def receive_weights(self, plan: SyncPlan) -> int:
        if not self._joined:
            # The group's sender waits on this actor's rank, which only a new group can fill.
            raise NotInGroupError(f"rollout actor {self.name!r} was restarted since the weight-sync group formed")
        version = self._engine.receive_weights(plan)
        self._restarted = False
        return version

    def weight_version(self) -> int | None:
        """The version of the loaded weights; None after a restart until an update loads."""
        return None if self._restarted else self._engine.weight_version

    def metrics(self) -> dict[str, float]:
        """Generated tokens and seconds spent generating since start, their ratio, and the last
        call's tokens per second."""
        return {
            "rollout/generated_tokens": float(self._tokens),
            "rollout/generate_s": self._seconds,
            "rollout/tokens_per_s": self._tokens / self._seconds if self._seconds > 0 else 0.0,
            "rollout/last_tokens_per_s": self._last_tokens_per_s,
        }


def create_rollout_actors(
    cfg: RolloutConfig,
    model_path: str | os.PathLike,
    seed: int = 0,
    prefix: str = "rollout",
    engine_factory: EngineFactory | None = None,
) -> dict[str, ActorHandle]:
    """``cfg.num_actors`` actors named ``{prefix}-{i}``, each with its CPUs, GPUs and custom resources
    (``cfg.resources``, its placement) and engine seed ``seed + i``;
    restartable by Ray when ``cfg.max_restarts`` > 0. ``engine_factory``: see ``RolloutActor``."""
    # Ray restarts a dead actor as often as it dies; how many restarts one batch may
    # wait for is the loop's bound (cfg.max_restarts), since a long run may lose many.
    restarts = -1 if cfg.max_restarts else 0
    actors = {}
    for i in range(cfg.num_actors):
        name = f"{prefix}-{i}"
        options = RolloutActor.options(
            num_cpus=cfg.num_cpus_per_actor, num_gpus=cfg.gpus_per_actor, resources=cfg.resources, max_restarts=restarts
        )
        actors[name] = options.remote(name, cfg, str(model_path), seed + i, engine_factory)
    return actors


def gather(refs: Mapping[ray.ObjectRef, str], what: str, timeout_s: float) -> tuple[dict[str, Any], dict[str, str]]:
    """The result of each actor call (``ref -> actor name``) by actor name, and the actors lost meanwhile.

    Waits at most ``timeout_s`` for all of them. An actor is lost when its process
    died (``RayActorError``) or it was restarted and has no weights yet
    (``ActorRestartedError``); lost ones map to the first line of the cause. Raises
    ``RolloutError`` naming every actor that raised anything else or did not answer
    in time.
    """
    ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
    results: dict[str, Any] = {}
    lost: dict[str, str] = {}
    problems = []
    for ref in ready:
        name = refs[ref]
        try:
            results[name] = ray.get(ref)
        except RayActorError as err:
            lost[name] = f"died: {first_line(err)}"
        except Exception as err:  # the actor's own error, wrapped in a RayTaskError
            cause = getattr(err, "cause", None) or err
            if isinstance(cause, ActorRestartedError):
                lost[name] = "was restarted"
            else:
                problems.append(f"{name!r} raised {first_line(cause)}")
    problems += [f"{refs[ref]!r} did not answer within {timeout_s:g}s" for ref in pending]
    if problems:
        raise RolloutError(f"{what} failed: " + "; ".join(problems + [f"{n!r} {why}" for n, why in lost.items()]))
    return results, lost


def collect(refs: Mapping[ray.ObjectRef, str], what: str, timeout_s: float) -> dict[str, Any]:
    """The result of each actor call (``ref -> actor name``), by actor name.

    Waits at most ``timeout_s`` for all of them. Raises ``RolloutError`` naming every
    actor that died, raised or did not answer in time, with the first line of each cause.
    """
    results, lost = gather(refs, what, timeout_s)
    if lost:
        raise RolloutError(f"{what} failed: " + "; ".join(f"{name!r} {why}" for name, why in lost.items()))
    return results


def await_restart(actor: ActorHandle, name: str, timeout_s: float) -> None:
    """Block until Ray has restarted ``actor`` (at most ``timeout_s``).

    Raises ``RolloutError`` when it is dead for good (killed without restart, out of
    restarts, or its constructor failed) or not back in time.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            ray.get(actor.weight_version.remote(), timeout=max(deadline - time.monotonic(), 0.0))
            return
        except ActorUnavailableError:  # restarting: Ray refuses calls until the new process is up
            if time.monotonic() >= deadline:
                raise RolloutError(f"rollout actor {name!r} was not restarted within {timeout_s:g}s") from None
            time.sleep(0.2)
        except GetTimeoutError:
            raise RolloutError(f"rollout actor {name!r} was not restarted within {timeout_s:g}s") from None
        except RayActorError as err:
            raise RolloutError(f"rollout actor {name!r} died and will not be restarted: {first_line(err)}") from err
