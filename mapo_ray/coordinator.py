"""Learner rank 0's other job: the rollout coordinator, and what it tells the other ranks.

``RolloutCoordinator`` owns everything outside the learner: the rollout actors'
calls, the reward pool, the weight sync, the prompt reader, the batches in flight in
async mode, the ledger and the run's logs. Its interface is small: ``next_batch``,
``evaluate``, ``sync_weights``, ``data_position`` and ``close``. Only the coordinator's
bookkeeping passes through rank 0; the data goes through the object store::

    Ray Data ─► PromptReader ─► (shares of prompts) ─► rollout actors
    rollout actors ─► (one request per group) ─► reward pool ─► rewards ─► coordinator
    rollout actors ─► (one payload per group: tokens, log-probs, images) ─► its learner rank

The reader prepares each batch's prompts one step ahead, while the step before is
generated and trained on. The coordinator reads a ``GroupSummary`` per group (lengths,
versions), the rewards, and the prompts' uids. It deals whole groups to learner ranks, balanced by tokens,
before anything is sent, and posts each rank a ``Shard``: its groups' rewards,
successes and object references. ``RankChannel`` carries the few messages between
ranks over the learner's process group: "your shard is posted", "take part in a
weight sync now" (a rollout actor came back mid-step; under ZeRO-3 every rank
gathers parameters), and single values such as the checkpoint's data position.
"""

from __future__ import annotations

import statistics
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import ray
import torch
import torch.distributed as dist
from ray.actor import ActorHandle
from ray.exceptions import RayActorError

from mapo_ray.algo import advantage_diagnostics, dapo_group_filter
from mapo_ray.config import AlgoConfig, Config
from mapo_ray.data import DataError
from mapo_ray.data.stream import DataPosition, PromptReader, Taken
from mapo_ray.learner import Experience, shard_by_group
from mapo_ray.reward import GroupResult, failure_metrics
from mapo_ray.reward.group import RequestRef
from mapo_ray.reward.pool import RewardPool
from mapo_ray.rollout.actor import RolloutError, await_restart, gather, rollout_returns
from mapo_ray.rollout.engine import sampling_params
from mapo_ray.sync import WeightSyncError
from mapo_ray.sync.ray_sync import RayWeightSync
from mapo_ray.telemetry import RunLogger
from mapo_ray.telemetry.ledger import PromptLedger
from mapo_ray.types import GroupPayload, GroupSummary, Prompt, SamplingParams, derive_seed

# Salts of the seed streams, so training and evaluation never share samples.
_TRAIN_SEED, _EVAL_SEED = 1, 2


# ------------------------------------------------------------------------- between ranks


@dataclass(frozen=True)
class Shard:
    """One learner rank's part of a step's batch: whole groups, by their batch-wide ids.

    ``rewards[i]`` and ``successes[i]`` are per sample of group ``group_ids[i]``, whose
    samples and images wait in the object store at ``payloads[i]``.
    """

    step: int
    group_ids: list[int]
    payloads: list[ray.ObjectRef]
    rewards: list[list[float]]
    successes: list[list[bool]]

    def experiences(self, timeout_s: float) -> list[Experience]:
        """The shard's experiences, its groups fetched from the object store (at most ``timeout_s``)."""
        payloads: list[GroupPayload] = ray.get(self.payloads, timeout=timeout_s)
        return experiences_of(payloads, self.group_ids, self.rewards, self.successes)


def experiences_of(
    payloads: Sequence[GroupPayload],
    group_ids: Sequence[int],
    rewards: Sequence[Sequence[float]],
    successes: Sequence[Sequence[bool]],
) -> list[Experience]:
    """One ``Experience`` per sample of each group, in group order; a group's samples share its images."""
    return [
        Experience.from_sample(sample, group_id=group_id, reward=reward, success=ok, images=payload.images)
        for payload, group_id, group_rewards, group_successes in zip(payloads, group_ids, rewards, successes)
        for sample, reward, ok in zip(payload.group.samples, group_rewards, group_successes)
    ]


@ray.remote(num_cpus=0)
class ShardBox:
    """Ray actor: holds each rank's ``Shard`` from the moment rank 0 posts it until the rank takes it.

    A torch collective pickles what it sends outside Ray, which would pin the object
    references in the shards for good; through this actor Ray counts them, and the
    groups are freed once the ranks are done with them.
    """

    def __init__(self) -> None:
        self._shards: dict[int, Shard] = {}

    def put(self, shards: dict[int, Shard]) -> None:
        self._shards.update(shards)

    def take(self, rank: int) -> Shard:
        return self._shards.pop(rank)


@dataclass(frozen=True)
class Message:
    """What rank 0 tells the other learner ranks.

    ``"sync"``: take part in a weight sync now, then listen again; ``"shard"``: your
    shard of the step is posted; ``"value"``: ``value`` is rank 0's answer to what
    every rank asked at this point (a weight version, a checkpoint's state).
    """

    kind: Literal["sync", "shard", "value"]
    value: Any = None


class RankChannel:
    """Rank 0 speaks, the other learner ranks listen, over the learner's own process group.

    Every call is collective: all ranks make the same calls in the same order. While a
    rank listens, it answers each ``"sync"`` with ``on_sync()`` (its part of a weight
    sync) and keeps listening. The shards themselves go through a ``ShardBox`` actor
    that rank 0 starts here.
    """

    def __init__(self, rank: int, world_size: int, on_sync: Callable[[], None], timeout_s: float = 600.0) -> None:
        self.rank, self.world_size = rank, world_size
        self._on_sync = on_sync
        self._timeout_s = timeout_s
        self._box: ActorHandle | None = None
        if world_size > 1:
            name = None
            if rank == 0:
                name = f"mapo-shards-{uuid.uuid4().hex[:12]}"
                self._box = ShardBox.options(name=name).remote()
            name = self.share(name)
            if rank != 0:
                self._box = ray.get_actor(name)

    def share(self, value: Any = None) -> Any:
        """Rank 0's ``value`` on every rank."""
        if self.rank == 0:
            self._send(Message("value", value))
            return value
        return self._expect("value").value

    def announce_sync(self) -> None:
        """Rank 0: every other rank takes part in the weight sync that rank 0 starts next."""
        self._send(Message("sync"))

    def post(self, shards: Sequence[Shard]) -> Shard:
        """Rank 0: hand ``shards[r]`` to rank r (r >= 1); returns rank 0's own."""
        if self.world_size > 1:
            assert self._box is not None
            ray.get(self._box.put.remote({r: s for r, s in enumerate(shards) if r}), timeout=self._timeout_s)
            self._send(Message("shard"))
        return shards[0]

    def receive_shard(self) -> Shard:
        """Ranks >= 1: the shard rank 0 posts next."""
        self._expect("shard")
        assert self._box is not None
        return ray.get(self._box.take.remote(self.rank), timeout=self._timeout_s)

    def close(self) -> None:
        if self._box is not None and self.rank == 0:
            ray.kill(self._box)
        self._box = None

    def _send(self, message: Message) -> None:
        if self.world_size > 1:
            dist.broadcast_object_list([message], src=0)

    def _expect(self, kind: str) -> Message:
        while True:
            box: list[Any] = [None]
            dist.broadcast_object_list(box, src=0)
            message: Message = box[0]
            if message.kind == "sync":
                self._on_sync()
            elif message.kind == kind:
                return message
            else:
                raise RuntimeError(f"learner rank {self.rank} expected a {kind!r} message from rank 0, got {message.kind!r}")


# ------------------------------------------------------------------------- rollout calls


@dataclass(frozen=True)
class Generated:
    """One generated group: its summary in hand, its reward request and payload in the object store."""

    summary: GroupSummary
    request: ray.ObjectRef
    payload: ray.ObjectRef


@dataclass
class Launch:
    """Rollout calls in flight for one batch of prompts.

    ``shares`` (actor name -> its prompts, an object reference), ``sizes`` and ``params``
    let a lost call be made again exactly; ``taken`` resolves to what the prompt reader
    handed out (a ``Taken`` for training prompts).
    """

    taken: ray.ObjectRef
    shares: dict[str, ray.ObjectRef]
    sizes: dict[str, int]
    params: SamplingParams
    actors: Mapping[str, ActorHandle]
    calls: dict[str, list[ray.ObjectRef]] = field(default_factory=dict)
    restarts: int = 0  # actors restarted while this batch was generated


def even_sizes(count: int, names: Sequence[str]) -> dict[str, int]:
    """``count`` prompts split over ``names`` in order, ceil(count / len(names)) each until they run out."""
    share = -(-count // len(names))
    sizes = {name: min(share, max(count - i * share, 0)) for i, name in enumerate(names)}
    return {name: size for name, size in sizes.items() if size}


def launch(
    actors: Mapping[str, ActorHandle],
    shares: Mapping[str, ray.ObjectRef],
    sizes: Mapping[str, int],
    params: SamplingParams,
    taken: ray.ObjectRef,
) -> Launch:
    """Start ``rollout`` on each actor with its share (non-blocking)."""
    pending = Launch(taken, dict(shares), dict(sizes), params, actors)
    for name in pending.shares:
        _call(pending, name)
    return pending


def _call(pending: Launch, name: str) -> None:
    method = pending.actors[name].rollout.options(num_returns=rollout_returns(pending.sizes[name]))
    pending.calls[name] = method.remote(pending.shares[name], pending.params)


def finish(
    pending: Launch, timeout_s: float, revive: Callable[[list[str]], None] | None = None, max_restarts: int = 0
) -> list[Generated]:
    """The groups of ``pending`` in prompt order, their payloads left in the object store.

    An actor lost mid-call (its process died; Ray restarts it) is brought back by
    ``revive(names)``, which must leave it holding the current weights, and only its
    share is generated again, with the same sampling parameters and seed, at most
    ``max_restarts`` restarts in all. Raises ``RolloutError`` naming any actor that
    failed otherwise, or that was lost once more than that.
    """
    what = f"rollout of {sum(pending.sizes.values())} prompts"
    waiting = dict(pending.calls)
    summaries: dict[str, list[GroupSummary]] = {}
    while True:
        results, lost = gather({calls[0]: name for name, calls in waiting.items()}, what, timeout_s)
        summaries.update(results)
        if not lost:
            break
        if revive is None or pending.restarts + len(lost) > max_restarts:
            problems = "; ".join(f"{name!r} {why}" for name, why in lost.items())
            bound = f" (restarted {pending.restarts} already; rollout.max_restarts is {max_restarts})" if revive else ""
            raise RolloutError(f"{what} failed: {problems}{bound}")
        pending.restarts += len(lost)
        revive(list(lost))
        for name in lost:
            _call(pending, name)
        waiting = {name: pending.calls[name] for name in lost}
    generated = []
    for name, size in pending.sizes.items():
        calls = pending.calls[name]
        generated += [Generated(s, calls[1 + i], calls[1 + size + i]) for i, s in enumerate(summaries[name])]
    return generated


# ------------------------------------------------------------------------- scoring


def succeeded(result: GroupResult, definition: str, threshold: float) -> list[bool]:
    """Per response, success by ``algo.success``: "full_marks" is ``overall >= threshold``;
    "accuracy" is the grader's accuracy component at 1, or ``overall >= threshold`` when
    the grader reports none."""
    if definition == "full_marks":
        return [s["overall"] >= threshold for s in result.scores]
    return [s["accuracy"] >= 1.0 if "accuracy" in s else s["overall"] >= threshold for s in result.scores]


def accuracy(results: Sequence[GroupResult], threshold: float) -> float:
    """Fraction of responses with the right answer (``succeeded`` by "accuracy"), whatever ``algo.success``."""
    return statistics.fmean(ok for r in results for ok in succeeded(r, "accuracy", threshold))


def rollout_metrics(
    summaries: Sequence[GroupSummary], results: Sequence[GroupResult], algo: AlgoConfig
) -> dict[str, float]:
    """Reward, accuracy, success, format and length statistics of one batch of scored groups."""
    rewards = [r for result in results for r in result.rewards]
    scores = [s for result in results for s in result.scores]
    return {
        "reward/mean": statistics.fmean(rewards),
        "reward/std": statistics.pstdev(rewards),
        "reward/accuracy": accuracy(results, algo.success_threshold),
        "reward/success": statistics.fmean(
            ok for r in results for ok in succeeded(r, algo.success, algo.success_threshold)
        ),
        "reward/format": statistics.fmean(s.get("format", 0.0) for s in scores),
        "response/length_mean": statistics.fmean(n for g in summaries for n in g.response_lengths),
        "response/clipped_frac": statistics.fmean(f == "length" for g in summaries for f in g.finish_reasons),
        **{k: float(v) for k, v in failure_metrics(results).items()},
    }


def keep_informative(results: Sequence[GroupResult], algo: AlgoConfig) -> list[int]:
    """DAPO's filter: the indices of the groups whose responses neither all succeeded nor all
    failed (``algo.success``), in order."""
    success = torch.tensor(
        [float(ok) for r in results for ok in succeeded(r, algo.success, algo.success_threshold)]
    )
    group_ids = torch.tensor([i for i, r in enumerate(results) for _ in r.scores])
    keep = dapo_group_filter(success, group_ids)
    return sorted(set(group_ids[keep].tolist()))


def deal(
    step: int, generated: Sequence[Generated], results: Sequence[GroupResult], algo: AlgoConfig, world_size: int
) -> list[Shard]:
    """The batch's groups, ids 0..K-1 in batch order, dealt whole to ``world_size`` learner ranks,
    balanced by prompt plus response tokens (``shard_by_group``)."""
    group_ids = [i for i, g in enumerate(generated) for _ in range(g.summary.size)]
    tokens = [g.summary.prompt_length + n for g in generated for n in g.summary.response_lengths]
    shards = []
    for samples in shard_by_group(group_ids, tokens, world_size):
        mine = sorted({group_ids[i] for i in samples})
        shards.append(
            Shard(
                step=step,
                group_ids=mine,
                payloads=[generated[i].payload for i in mine],
                rewards=[results[i].rewards for i in mine],
                successes=[succeeded(results[i], algo.success, algo.success_threshold) for i in mine],
            )
        )
    return shards


def staleness_metrics(learner_version: int, sample_versions: Sequence[int]) -> dict[str, float]:
    """``rollout/staleness`` (the oldest sample's: learner version minus the version that sampled
    it) and ``rollout/staleness_mean`` (over samples; they differ when a batch mixes versions,
    e.g. DAPO's extra rounds in async mode). ``learner_version`` is the version the learner
    holds before this step's update (the last one sent to the actors)."""
    ages = [learner_version - v for v in sample_versions]
    return {"rollout/staleness": float(max(ages)), "rollout/staleness_mean": statistics.fmean(ages)}


# ------------------------------------------------------------------------- the coordinator


class RolloutCoordinator:
    """Learner rank 0's rollout side: prompts, rollouts, rewards, weight sync, ledger and logs.

    Args:
        config: the run's config.
        actors: the rollout actors (name -> handle); the job driver owns them, so they
            outlive a learner restart. Each must serve ``RolloutWorker``.
        model_path: the policy's Hugging Face folder (its tokenizer templates the prompts).
        run_dir: where the logs and the ledger go.
        channel: this rank's ``RankChannel``.
        policy: the current policy model, for a weight sync to a restarted actor.
        start_step: the step the run resumes after (0 for a new run).
        position: the data position it resumes at.

    The reward pool and the prompt reader are made here: their actors belong to this
    process and die with it, so a restarted learner starts them afresh.
    """

    def __init__(
        self,
        config: Config,
        *,
        actors: Mapping[str, ActorHandle],
        model_path: str,
        run_dir: str | Path,
        channel: RankChannel,
        policy: Callable[[], torch.nn.Module],
        start_step: int = 0,
        position: DataPosition = DataPosition(),
    ) -> None:
        trainer = config.trainer
        self.config = config
        self.actors = dict(actors)
        self.channel = channel
        self._policy = policy
        self.reader = PromptReader.remote(config, model_path, position)
        self.eval_skipped: dict[str, int] = _started(self.reader, config.rollout.call_timeout_s)
        self.rewards = RewardPool(config.reward)
        self.sync = RayWeightSync(config.sync)
        # The version after RL step k is k. A restored run's weights (version start_step),
        # or the warm-started policy (version 0), are sent before the first step.
        resend = start_step > 0 or config.sft.steps > 0
        self.sync.version = start_step - 1 if resend else 0
        self._ranks_per_actor = self._sync_ranks()
        try:
            self._connect_sync()  # a bad address shows before the first step
        except WeightSyncError as err:
            if not err.lost:
                raise
            # An actor died as this learner started (maybe with it): sync_weights forms the group.
        self.logger = RunLogger(run_dir, total_steps=trainer.total_steps, start_step=start_step)
        self.ledger = PromptLedger(run_dir, start_step)
        self.pending: deque[Launch] = deque()  # async mode: batches launched ahead
        self._read_ahead: deque[tuple[ray.ObjectRef, dict[str, ray.ObjectRef], dict[str, int]]] = deque()
        self._certainty: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._restarts = 0  # rollout actors restarted since step_metrics last read them

    def next_batch(self, step: int) -> tuple[Shard, dict[str, float]]:
        """Roll out, score and deal step ``step``'s batch; post the other ranks' shards.

        Returns rank 0's own shard and the step's generation, reward, staleness and data
        metrics.
        """
        trainer, algo = self.config.trainer, self.config.algo
        n = trainer.prompts_per_step
        metrics: dict[str, float] = {}
        generate_start = time.perf_counter()
        if not self.pending:
            self.pending.append(self._launch(step))
        batch = self.pending.popleft()
        generated = self._finish(batch)
        taken: Taken = ray.get(batch.taken, timeout=self.config.rollout.call_timeout_s)
        scored = list(zip(taken.uids, taken.epochs))
        self._restarts += batch.restarts
        if trainer.mode == "async":
            ahead = step + len(self.pending) + 1
            while len(self.pending) < trainer.max_staleness and ahead <= trainer.total_steps:
                self.pending.append(self._launch(ahead))
                ahead += 1
        metrics["time/generate_s"] = time.perf_counter() - generate_start
        tokens = sum(n for g in generated for n in g.summary.response_lengths)

        reward_start = time.perf_counter()
        results = self._score(generated)
        metrics.update(rollout_metrics([g.summary for g in generated], results, algo))
        if trainer.dynamic_sampling:
            kept = keep_informative(results, algo)
            generated, results = [generated[i] for i in kept], [results[i] for i in kept]
            rounds = 0
            while len(generated) < n and rounds < trainer.max_extra_rounds:
                rounds += 1
                extra_launch = self._launch(step, salt=rounds)
                extra = self._finish(extra_launch)
                extra_results = self._score(extra)
                extra_taken: Taken = ray.get(extra_launch.taken, timeout=self.config.rollout.call_timeout_s)
                scored += zip(extra_taken.uids, extra_taken.epochs)
                self._restarts += extra_launch.restarts
                kept = keep_informative(extra_results, algo)
                generated += [extra[i] for i in kept]
                results += [extra_results[i] for i in kept]
                tokens += sum(n for g in extra for n in g.summary.response_lengths)
            generated, results = generated[:n], results[:n]
            metrics["dynamic_sampling/extra_rounds"] = float(rounds)
            metrics["dynamic_sampling/kept_groups"] = float(len(generated))
            if not generated:
                raise RuntimeError(f"step {step}: dynamic sampling kept no group in {rounds + 1} rounds")
        metrics["time/reward_s"] = time.perf_counter() - reward_start
        metrics["perf/tokens_per_s"] = tokens / max(metrics["time/generate_s"], 1e-9)
        self.ledger.record(step, scored)

        metrics.update(staleness_metrics(self.sync.version, [v for g in generated for v in g.summary.weight_versions]))
        stale = int(metrics["rollout/staleness"])
        limit = trainer.max_staleness if trainer.mode == "async" else 0
        if stale > limit:
            raise RuntimeError(f"step {step}: a sample is {stale} weight versions old; the bound is {limit}")
        metrics.update(ray.get(self.reader.metrics.remote(), timeout=self.config.rollout.call_timeout_s))

        shards = deal(step, generated, results, algo, self.channel.world_size)
        self._certainty = (
            torch.tensor([r for result in results for r in result.rewards]),
            torch.tensor([i for i, result in enumerate(results) for _ in result.scores]),
            torch.tensor([ok for result in results for ok in succeeded(result, algo.success, algo.success_threshold)]),
        )
        return self.channel.post(shards), metrics

    def step_metrics(self, max_abs_advantage: float) -> dict[str, float]:
        """What is known once the step's update and sync are done: ``certainty/*`` of the last
        batch dealt (``max_abs_advantage`` is the largest over all ranks) and the rollout
        actors restarted during the step's rollouts and weight sync."""
        assert self._certainty is not None, "step_metrics before next_batch"
        scores, group_ids, success = self._certainty
        algo = self.config.algo
        diagnostics = advantage_diagnostics(
            scores, group_ids, torch.tensor([max_abs_advantage]), success=success, std=algo.std, eps=algo.eps
        )
        restarts, self._restarts = self._restarts, 0
        return {**diagnostics.metrics(), "rollout/restarts": float(restarts)}

    def evaluate(self, step: int) -> dict[str, float]:
        """Accuracy and format rate on the evaluation prompts (one response each)."""
        config, trainer = self.config, self.config.trainer
        greedy = trainer.eval_temperature == 0
        params = SamplingParams(
            n=1,
            temperature=trainer.eval_temperature,
            top_p=1.0 if greedy else trainer.eval_top_p,
            max_new_tokens=(
                config.rollout.max_new_tokens if trainer.eval_max_new_tokens is None else trainer.eval_max_new_tokens
            ),
            stop=tuple(config.rollout.stop),
            seed=derive_seed(derive_seed(config.seed, _EVAL_SEED), step),
        )
        count = ray.get(self.reader.eval_count.remote(), timeout=config.rollout.call_timeout_s)
        sizes = even_sizes(count, list(self.actors))
        uids, *shares = self.reader.eval_shares.options(num_returns=1 + len(sizes)).remote(list(sizes.values()))
        results = self._score(self._finish(launch(self.actors, dict(zip(sizes, shares)), sizes, params, uids)))
        scores = [r.scores[0] for r in results]
        return {
            "eval/accuracy": accuracy(results, config.algo.success_threshold),
            "eval/format": statistics.fmean(s.get("format", 0.0) for s in scores),
            "eval/reward_mean": statistics.fmean(s["overall"] for s in scores),
            "eval/prompts": float(len(results)),
            **{f"eval/skipped/{reason}": float(n) for reason, n in self.eval_skipped.items()},
        }

    def sync_weights(self, policy: torch.nn.Module, *, again: bool = False, lost: Sequence[str] = ()) -> int:
        """Send ``policy`` to every rollout actor; returns its weight version.

        Under ZeRO-3 the other ranks gather with it (``named_parameters_for_sync``): for a
        step's update they are in their part of the sync already; for any other send they
        are told first (``announce_sync``). An actor lost during the sync (its process
        died; Ray restarts it) is waited for, every actor joins a new group, since a torch
        process group cannot take a new member, and the update is sent again: at most
        ``rollout.max_restarts`` restarts per sync, counted in ``rollout/restarts``.

        ``lost``: actors known to be restarting, to wait for and bring into a new group
        first. ``again``: send the current version once more, for such actors.
        """
        config = self.config
        announce, restarts = bool(lost), 0
        while True:
            try:
                if lost or not self.sync.connected:
                    for name in lost:
                        await_restart(self.actors[name], name, config.sync.timeout_s)
                    self._connect_sync()
                    lost = ()
                # Nothing may fail between this and the send: each announcement is one gather.
                if announce:
                    self.channel.announce_sync()
                return self.sync.sync_model(policy, again=again)
            except WeightSyncError as err:
                if not err.lost or restarts + len(err.lost) > config.rollout.max_restarts:
                    raise
                restarts += len(err.lost)
                self._restarts += len(err.lost)
                lost, announce = err.lost, True

    def take_prompts(self, n: int) -> list[Prompt]:
        """The next ``n`` training prompts, in hand (for the supervised warm-start)."""
        return ray.get(self.reader.take_prompts.remote(n), timeout=self.config.rollout.call_timeout_s)

    def data_position(self) -> DataPosition:
        """Where the next batch to train on starts: the oldest batch in flight or read ahead, or the stream."""
        timeout = self.config.rollout.call_timeout_s
        oldest = self.pending[0].taken if self.pending else self._read_ahead[0][0] if self._read_ahead else None
        if oldest is not None:
            taken: Taken = ray.get(oldest, timeout=timeout)
            return taken.position
        return ray.get(self.reader.position.remote(), timeout=timeout)

    def close(self) -> None:
        self.logger.close()
        self.ledger.close()
        self.sync.close()
        self.rewards.shutdown()
        ray.kill(self.reader)
        self.channel.close()

    def _sync_ranks(self) -> int:
        """The weight-sync ranks each actor holds (its engine's tensor-parallel workers); all alike."""
        names = list(self.actors)
        ranks = ray.get([self.actors[n].sync_ranks.remote() for n in names], timeout=self.config.sync.timeout_s)
        if len(set(ranks)) > 1:
            held = ", ".join(f"{n!r}: {r}" for n, r in zip(names, ranks))
            raise RolloutError(f"rollout actors hold different numbers of weight-sync ranks ({held}); make them alike")
        return ranks[0]

    def _connect_sync(self) -> None:
        """Form the weight-sync group with every actor, and print its address: the one every
        rollout node must be able to reach."""
        self.sync.connect(self.actors, self._ranks_per_actor)
        address = self.sync.address
        print(
            f"weight sync: {len(self.actors) * self._ranks_per_actor} rollout rank(s) joined the "
            f"{address.backend} group at {address.host}:{address.port}",
            flush=True,
        )

    def _launch(self, step: int, salt: int = 0) -> Launch:
        config = self.config
        params = sampling_params(config.rollout, derive_seed(derive_seed(config.seed, _TRAIN_SEED), step * 1000 + salt))
        if not self._read_ahead:
            self._read_ahead.append(self._take())
        taken, shares, sizes = self._read_ahead.popleft()
        # The reader prepares the next batch's prompts while this one is generated and trained on.
        self._read_ahead.append(self._take())
        return launch(self.actors, shares, sizes, params, taken)

    def _take(self) -> tuple[ray.ObjectRef, dict[str, ray.ObjectRef], dict[str, int]]:
        """Ask the reader for the next batch of prompts, one share per actor (non-blocking)."""
        sizes = even_sizes(self.config.trainer.prompts_per_step, list(self.actors))
        taken, *shares = self.reader.take.options(num_returns=1 + len(sizes)).remote(list(sizes.values()))
        return taken, dict(zip(sizes, shares)), sizes

    def _finish(self, pending: Launch) -> list[Generated]:
        """``finish``, bringing lost rollout actors back with the current weights."""
        config = self.config

        def revive(names: list[str]) -> None:
            self.sync_weights(self._policy(), again=True, lost=names)

        return finish(pending, config.rollout.call_timeout_s, revive, config.rollout.max_restarts)

    def _score(self, generated: Sequence[Generated]) -> list[GroupResult]:
        return self.rewards.score([RequestRef(g.summary.uid, g.summary.size, g.request) for g in generated])


def _started(reader: ActorHandle, timeout_s: float) -> dict[str, int]:
    """Wait for the prompt reader to start (it reads the evaluation prompts first); returns
    the test rows it skipped by reason. A reader that failed to start (e.g. a test split
    with no usable row) raises ``DataError`` with its reason, not Ray's whole traceback."""
    try:
        return ray.get(reader.eval_skipped.remote(), timeout=timeout_s)
    except RayActorError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        ray.kill(reader)
        raise DataError(f"the prompt reader did not start: {lines[-1] if lines else err}") from err
