"""One training step, on-policy or async, and the Ray Train loop that repeats it.

Every learner rank runs ``train_loop_per_worker``; rank 0 also drives the rollout
side, which the job driver created and handed over in ``train_loop_config``::

    rank 0:  prompts ─► rollout actors ─► reward pool ─► experiences ─┐
    all:                         advantages ◄── broadcast batch ◄─────┘
                                 ─► update (DeepSpeed) ─► rank 0 syncs weights ─► actors
                                 ─► report metrics / checkpoint to Ray Train

On-policy (the default), batch v+1 is sampled after the weights of step v reached the
actors. Async mode launches the next ``trainer.max_staleness`` batches before the
update, so generation overlaps training; every sample carries the weight version that
sampled it, and a batch older than the bound is an error, not a silent mix.

Failures: a rollout actor whose process dies mid-batch is restarted by Ray; rank 0
waits for it, re-forms the weight-sync group with every actor, sends the current
weights again (all learner ranks take part, for ZeRO-3) and re-issues only that
actor's prompts with the same seed (``rollout.max_restarts`` per batch). Reward
actors are retried inside ``RewardPool``. A learner worker that dies takes Ray
Train's restart (``trainer.max_failures``): every rank restarts from the latest
checkpoint and its data position, and rank 0 connects to the same driver-owned
actors again. ``ledger.jsonl`` records which prompts each step scored.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import statistics
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import torch
import torch.distributed as dist
from ray.actor import ActorHandle

from mapo_ray.algo import advantage_diagnostics, dapo_group_filter
from mapo_ray.config import AlgoConfig, Config
from mapo_ray.data import DataError
from mapo_ray.data.pipeline import PromptBatches, open_split, prompt_dataset
from mapo_ray.learner import Experience, Learner, shard_by_group
from mapo_ray.learner.sft import warm_start
from mapo_ray.reward import GroupRequest, GroupResult, failure_metrics
from mapo_ray.reward.pool import RewardPool
from mapo_ray.rollout.actor import RolloutError, await_restart, gather
from mapo_ray.rollout.engine import sampling_params
from mapo_ray.sync.ray_sync import RayWeightSync
from mapo_ray.telemetry import RunLogger
from mapo_ray.telemetry.ledger import PromptLedger
from mapo_ray.types import Group, Prompt, SamplingParams, count_tokens, derive_seed, prompts_from_batch

# Salts of the seed streams, so training and evaluation never share samples.
_TRAIN_SEED, _EVAL_SEED = 1, 2
STAGING = ".staging"  # under the run folder: each rank's checkpoint before Ray Train copies it
_HEADLINE = ("step", "weight_version", "reward/mean", "reward/accuracy", "actor/pg_loss")


class _Resync:
    """What rank 0 broadcasts in place of a batch or a state: "take part in a weight sync first"."""


# ------------------------------------------------------------------------- prompts


@dataclass(frozen=True)
class DataPosition:
    """Where the training stream stands: ``taken`` prompts into epoch ``epoch``."""

    epoch: int = 0
    taken: int = 0


class PromptStream:
    """Training prompts, epoch after epoch in seeded order, resumable from a ``DataPosition``.

    Ray Data decodes and templates on its own CPU workers; this only pulls finished
    prompts. Resuming is exact when the current ``DataContext`` preserves order.
    """

    def __init__(self, config: Config, tokenizer_path: str, position: DataPosition) -> None:
        self._config = config
        self._tokenizer_path = tokenizer_path
        self._source = open_split(config.data, "train")
        self.position = position
        self._earlier: dict[str, float] = {}  # counts of the epochs already finished
        self._batches: PromptBatches | None = None
        self._open_epoch(position.epoch, skip=position.taken)

    def take(self, n: int) -> list[Prompt]:
        """The next ``n`` prompts, continuing into the next epoch when this one ends."""
        return self.take_with_epochs(n)[0]

    def take_with_epochs(self, n: int) -> tuple[list[Prompt], list[int]]:
        """``take(n)``, and the epoch each prompt was drawn in."""
        out: list[Prompt] = []
        epochs: list[int] = []
        empty_epochs = 0
        while len(out) < n:
            prompt = next(self._iter, None)
            if prompt is None:
                empty_epochs = empty_epochs + 1 if not out else 0
                if empty_epochs > 1:
                    raise RuntimeError(f"data.train {self._config.data.train!r} yields no usable prompt")
                self._open_epoch(self.position.epoch + 1, skip=0)
                continue
            out.append(prompt)
            epochs.append(self.position.epoch)
            self.position = DataPosition(self.position.epoch, self.position.taken + 1)
        return out, epochs

    def metrics(self) -> dict[str, float]:
        """``data/prompts`` and ``data/skipped/<reason>`` since this stream started."""
        assert self._batches is not None
        current = self._batches.metrics()
        return {name: float(self._earlier.get(name, 0) + current[name]) for name in current}

    def _open_epoch(self, epoch: int, skip: int) -> None:
        if self._batches is not None:
            self._earlier = self.metrics()
        dataset = prompt_dataset(
            self._source, self._config.data, tokenizer_path=self._tokenizer_path, seed=self._config.seed, epoch=epoch
        )
        self._batches = PromptBatches(dataset, batch_size=self._config.trainer.prompts_per_step)
        self._iter = (p for batch in self._batches for p in prompts_from_batch(batch))
        self.position = DataPosition(epoch, 0)
        for _ in range(skip):
            if next(self._iter, None) is None:
                break
            self.position = DataPosition(epoch, self.position.taken + 1)


def load_eval_prompts(config: Config, tokenizer_path: str) -> tuple[list[Prompt], dict[str, int]]:
    """The first ``trainer.eval_prompts`` prompts of the test split (all when None), in fixed
    order, and the count of rows skipped on the way, by reason.

    Raises ``DataError`` when the split gives no usable prompt.
    """
    limit = config.trainer.eval_prompts
    dataset = prompt_dataset(
        open_split(config.data, "test"), config.data, tokenizer_path=tokenizer_path, seed=config.seed
    )
    prompts: list[Prompt] = []
    batches = PromptBatches(dataset, batch_size=256)
    for batch in batches:
        prompts += prompts_from_batch(batch)
        if limit is not None and len(prompts) >= limit:
            prompts = prompts[:limit]
            break
    if not prompts:
        skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(batches.skipped.items())) or "none"
        raise DataError(f"the test split {config.data.test} has no usable row (rows skipped: {skipped})")
    return prompts, dict(batches.skipped)


# ------------------------------------------------------------------------- rollouts


@dataclass
class Launch:
    """Rollout calls in flight for one batch of prompts, and where the stream stood before it.

    ``shares`` (actor name -> its prompts, in prompt order) and ``params`` let a lost
    call be made again exactly; ``epochs`` (the data epoch of each prompt) feed the ledger.
    """

    prompts: list[Prompt]
    refs: dict[ray.ObjectRef, str]
    position: DataPosition
    actors: Mapping[str, ActorHandle]
    shares: dict[str, list[Prompt]]
    params: SamplingParams
    epochs: list[int] = field(default_factory=list)
    restarts: int = 0  # actors restarted while this batch was generated
    started: float = field(default_factory=time.perf_counter)


def launch(actors: Mapping[str, ActorHandle], prompts: list[Prompt], params: SamplingParams, position: DataPosition) -> Launch:
    """Split ``prompts`` evenly over ``actors`` and start generating (non-blocking)."""
    names = list(actors)
    share = -(-len(prompts) // len(names))
    shares = {name: prompts[i * share : (i + 1) * share] for i, name in enumerate(names)}
    shares = {name: part for name, part in shares.items() if part}
    refs = {actors[name].generate.remote(part, params): name for name, part in shares.items()}
    return Launch(prompts, refs, position, actors, shares, params)


def finish(
    pending: Launch, timeout_s: float, revive: Callable[[list[str]], None] | None = None, max_restarts: int = 0
) -> list[Group]:
    """The groups of ``pending`` in prompt order.

    An actor lost mid-call (its process died; Ray restarts it) is brought back by
    ``revive(names)``, which must leave it holding the current weights, and only its
    prompts are generated again, with the same sampling parameters and seed, at most
    ``max_restarts`` restarts in all. Raises ``RolloutError`` naming any actor that
    failed otherwise, or that was lost once more than that.
    """
    what = f"rollout of {len(pending.prompts)} prompts"
    refs = pending.refs
    by_actor: dict[str, list[Group]] = {}
    while True:
        results, lost = gather(refs, what, timeout_s)
        by_actor.update(results)
        if not lost:
            return [g for name in pending.shares for g in by_actor[name]]
        if revive is None or pending.restarts + len(lost) > max_restarts:
            problems = "; ".join(f"{name!r} {why}" for name, why in lost.items())
            bound = f" (restarted {pending.restarts} already; rollout.max_restarts is {max_restarts})" if revive else ""
            raise RolloutError(f"{what} failed: {problems}{bound}")
        pending.restarts += len(lost)
        revive(list(lost))
        refs = {pending.actors[name].generate.remote(pending.shares[name], pending.params): name for name in lost}


def score(pool: RewardPool, groups: Sequence[Group]) -> list[GroupResult]:
    requests = [GroupRequest(g.uid, g.answer, [s.response_text for s in g.samples]) for g in groups]
    return pool.score(requests)


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


def rollout_metrics(groups: Sequence[Group], results: Sequence[GroupResult], algo: AlgoConfig) -> dict[str, float]:
    """Reward, accuracy, success, format and length statistics of one batch of scored groups."""
    rewards = [r for result in results for r in result.rewards]
    scores = [s for result in results for s in result.scores]
    lengths = [len(s.response_ids) for g in groups for s in g.samples]
    return {
        "reward/mean": statistics.fmean(rewards),
        "reward/std": statistics.pstdev(rewards),
        "reward/accuracy": accuracy(results, algo.success_threshold),
        "reward/success": statistics.fmean(
            ok for r in results for ok in succeeded(r, algo.success, algo.success_threshold)
        ),
        "reward/format": statistics.fmean(s.get("format", 0.0) for s in scores),
        "response/length_mean": statistics.fmean(lengths),
        "response/clipped_frac": statistics.fmean(s.finish_reason == "length" for g in groups for s in g.samples),
        **{k: float(v) for k, v in failure_metrics(results).items()},
    }


def to_experiences(
    groups: Sequence[Group], results: Sequence[GroupResult], prompts: Mapping[str, Prompt], algo: AlgoConfig
) -> list[Experience]:
    """One ``Experience`` per response; groups get ids 0..K-1 in batch order."""
    batch = []
    for group_id, (group, result) in enumerate(zip(groups, results)):
        images = prompts[group.uid].images
        successes = succeeded(result, algo.success, algo.success_threshold)
        for sample, reward, ok in zip(group.samples, result.rewards, successes):
            batch.append(Experience.from_sample(sample, group_id=group_id, reward=reward, success=ok, images=images))
    return batch


def keep_informative(
    groups: list[Group], results: list[GroupResult], algo: AlgoConfig
) -> tuple[list[Group], list[GroupResult]]:
    """DAPO's filter: drop groups whose responses all succeeded or all failed (``algo.success``)."""
    success = torch.tensor(
        [float(ok) for r in results for ok in succeeded(r, algo.success, algo.success_threshold)]
    )
    group_ids = torch.tensor([i for i, g in enumerate(groups) for _ in g.samples])
    keep = dapo_group_filter(success, group_ids)
    kept_ids = sorted(set(group_ids[keep].tolist()))
    return [groups[i] for i in kept_ids], [results[i] for i in kept_ids]


# ------------------------------------------------------------------------- the loop


@dataclass
class RolloutSide:
    """What rank 0 drives: the actors, the reward pool, the weight sync, the prompts and the logs."""

    actors: dict[str, ActorHandle]
    rewards: RewardPool
    sync: RayWeightSync
    stream: PromptStream
    eval_prompts: list[Prompt]
    eval_skipped: dict[str, int]  # test rows skipped while reading eval_prompts, by reason
    logger: RunLogger
    ledger: PromptLedger
    pending: deque[Launch] = field(default_factory=deque)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point. ``loop_config``: ``config``, ``model_path`` (the policy's
    Hugging Face folder, whose tokenizer templates the prompts), ``rollout_actors`` (name -> handle), ``reward_pool``, ``run_dir`` and ``resume_from``
    (a checkpoint folder or None)."""
    config: Config = loop_config["config"]
    trainer = config.trainer
    learner = Learner(config, loop_config["model_path"])
    rank = dist.get_rank()

    start_step, position = 0, DataPosition()
    candidates = checkpoints_to_restore(Path(loop_config["run_dir"]), loop_config.get("resume_from"))
    if candidates:
        folder, state = learner.load_first_complete(candidates)
        if folder != candidates[0] and rank == 0:
            print(f"restored the learner from {folder}, the newest checkpoint that loads", flush=True)
        start_step, position = state["step"], DataPosition(**state["data"])

    side = None
    if rank == 0:
        context = ray.data.DataContext.get_current()
        # A data position must name the same prompts in a resumed run: keep Ray Data's
        # output in input order (the datasets built below copy this context).
        context.execution_options.preserve_order = True
        # One progress line per training step says more than a bar per dataset.
        context.enable_progress_bars = False
        sync = RayWeightSync(config.sync)
        # The version after RL step k is k. A restored run's weights (version start_step),
        # or the warm-started policy (version 0), are sent before the first step.
        resend = start_step > 0 or config.sft.steps > 0
        sync.version = start_step - 1 if resend else 0
        eval_prompts, eval_skipped = [], {}
        if trainer.eval_every:
            eval_prompts, eval_skipped = load_eval_prompts(config, loop_config["model_path"])
        side = RolloutSide(
            actors=loop_config["rollout_actors"],
            rewards=loop_config["reward_pool"],
            sync=sync,
            stream=PromptStream(config, loop_config["model_path"], position),
            eval_prompts=eval_prompts,
            eval_skipped=eval_skipped,
            logger=RunLogger(loop_config["run_dir"], total_steps=trainer.total_steps, start_step=start_step),
            ledger=PromptLedger(loop_config["run_dir"], start_step),
        )
        side.sync.connect(side.actors)
    warm_metrics: dict[str, float] = {}
    if start_step > 0:
        # The actors loaded the model folder, not the checkpoint: send them the restored weights.
        sync_weights(learner, side)
    elif config.sft.steps:
        # The supervised warm-start runs once; a resumed run has it in its weights.
        warm_metrics = warm_start(learner, config.sft, side.stream.take if side else None).summary()
        sync_weights(learner, side)
        if side and trainer.eval_every:
            side.logger.log_eval(0, evaluate(config, learner, side, 0))

    for step in range(start_step + 1, trainer.total_steps + 1):
        metrics = training_step(step, config, learner, side)
        if step == 1:
            metrics.update(warm_metrics)
        if side:
            side.logger.log(step, metrics)
            if trainer.eval_every and (step % trainer.eval_every == 0 or step == trainer.total_steps):
                eval_metrics = evaluate(config, learner, side, step)
                side.logger.log_eval(step, eval_metrics)
                metrics = {**metrics, **eval_metrics}
        report(step, config, learner, side, metrics, Path(loop_config["run_dir"]))

    learner.export_hf(Path(loop_config["run_dir"]) / "policy")
    if side:
        side.logger.close()
        side.ledger.close()
        side.sync.close()


def checkpoints_to_restore(run_dir: Path, resume_from: str | None) -> list[Path]:
    """The checkpoint folders to restore from, the one to try first first.

    Ray Train's own (a restart after a failure, or --resume auto on the same run folder),
    then the older ones it keeps beside it under ``run_dir/checkpoints``, in case the
    newest is incomplete (a crash while it was written); else the folder of
    --resume PATH alone; else none.
    """
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return [Path(resume_from)] if resume_from else []
    newest = Path(checkpoint.path)
    # Ray Train names them checkpoint_<date>_<time>: newest last in name order.
    older = [p for p in (run_dir / "checkpoints").glob("checkpoint_*") if p.is_dir() and p.name < newest.name]
    return [newest, *sorted(older, reverse=True)]


def training_step(step: int, config: Config, learner: Learner, side: RolloutSide | None) -> dict[str, float]:
    """One step on every rank: rank 0 gathers the batch, all ranks update, rank 0 syncs."""
    start = time.perf_counter()
    metrics: dict[str, float] = {}
    batch = rollout_batch(step, config, learner, side, metrics) if side else None
    batch = broadcast(batch, learner)

    learn_start = time.perf_counter()
    advantages = learner.advantages(batch)
    shards = shard_by_group([e.group_id for e in batch], [e.num_tokens for e in batch], learner.world_size)
    mine = shards[learner.rank]
    metrics.update(learner.update([batch[i] for i in mine], advantages[mine]))
    metrics["time/learner_s"] = time.perf_counter() - learn_start

    sync_start = time.perf_counter()
    # The control run (sync off): the actors keep sampling with the starting weights.
    version = sync_weights(learner, side) if config.sync.enabled else (side.sync.version if side else -1)
    # Only rank 0 talks to the actors; the others learn the version from it.
    metrics["weight_version"] = float(broadcast(version, learner))
    metrics["time/sync_s"] = time.perf_counter() - sync_start

    if side:
        scores = torch.tensor([e.reward for e in batch])
        group_ids = torch.tensor([e.group_id for e in batch])
        success = torch.tensor([bool(e.success) for e in batch])
        diagnostics = advantage_diagnostics(
            scores, group_ids, advantages.cpu(), success=success, std=config.algo.std, eps=config.algo.eps
        )
        metrics.update(diagnostics.metrics())
        metrics["adv/mean"] = advantages.mean().item()
        metrics["adv/max_abs"] = advantages.abs().max().item()
        metrics.update(side.stream.metrics())
    metrics["step"] = float(step)
    metrics["time/step_s"] = time.perf_counter() - start
    return metrics


def rollout_batch(
    step: int, config: Config, learner: Learner, side: RolloutSide, metrics: dict[str, float]
) -> list[Experience]:
    """Rank 0: the step's scored experiences; fills the generation and reward metrics."""
    trainer, algo = config.trainer, config.algo
    n = trainer.prompts_per_step
    generate_start = time.perf_counter()
    if not side.pending:
        side.pending.append(_launch_next(step, config, side))
    pending = side.pending.popleft()
    groups = _finish(pending, config, learner, side)
    prompts = {p.uid: p for p in pending.prompts}
    scored = list(zip((p.uid for p in pending.prompts), pending.epochs))
    restarts = pending.restarts
    if trainer.mode == "async":
        ahead = step + len(side.pending) + 1
        while len(side.pending) < trainer.max_staleness and ahead <= trainer.total_steps:
            side.pending.append(_launch_next(ahead, config, side))
            ahead += 1
    metrics["time/generate_s"] = time.perf_counter() - generate_start
    tokens = count_tokens(groups)

    reward_start = time.perf_counter()
    results = score(side.rewards, groups)
    metrics.update(rollout_metrics(groups, results, algo))
    if trainer.dynamic_sampling:
        groups, results = keep_informative(groups, results, algo)
        rounds = 0
        while len(groups) < n and rounds < trainer.max_extra_rounds:
            rounds += 1
            extra_launch = _launch_next(step, config, side, salt=rounds)
            extra = _finish(extra_launch, config, learner, side)
            extra_results = score(side.rewards, extra)
            prompts.update({p.uid: p for p in extra_launch.prompts})
            scored += zip((p.uid for p in extra_launch.prompts), extra_launch.epochs)
            restarts += extra_launch.restarts
            more, more_results = keep_informative(extra, extra_results, algo)
            groups, results = groups + more, results + more_results
            tokens += count_tokens(extra)
        groups, results = groups[:n], results[:n]
        metrics["dynamic_sampling/extra_rounds"] = float(rounds)
        metrics["dynamic_sampling/kept_groups"] = float(len(groups))
        if not groups:
            raise RuntimeError(f"step {step}: dynamic sampling kept no group in {rounds + 1} rounds")
    metrics["time/reward_s"] = time.perf_counter() - reward_start
    metrics["perf/tokens_per_s"] = tokens / max(metrics["time/generate_s"], 1e-9)
    metrics["rollout/restarts"] = float(restarts)
    side.ledger.record(step, scored)

    batch = to_experiences(groups, results, prompts, algo)
    metrics.update(staleness_metrics(side.sync.version, [e.weight_version for e in batch]))
    stale = int(metrics["rollout/staleness"])
    limit = trainer.max_staleness if trainer.mode == "async" else 0
    if stale > limit:
        raise RuntimeError(f"step {step}: a sample is {stale} weight versions old; the bound is {limit}")
    return batch


def staleness_metrics(learner_version: int, sample_versions: Sequence[int]) -> dict[str, float]:
    """``rollout/staleness`` (the oldest sample's: learner version minus the version that sampled
    it) and ``rollout/staleness_mean`` (over samples; they differ when a batch mixes versions,
    e.g. DAPO's extra rounds in async mode). ``learner_version`` is the version the learner
    holds before this step's update (the last one sent to the actors)."""
    ages = [learner_version - v for v in sample_versions]
    return {"rollout/staleness": float(max(ages)), "rollout/staleness_mean": statistics.fmean(ages)}


def _launch_next(step: int, config: Config, side: RolloutSide, salt: int = 0) -> Launch:
    params = sampling_params(config.rollout, derive_seed(derive_seed(config.seed, _TRAIN_SEED), step * 1000 + salt))
    position = side.stream.position
    prompts, epochs = side.stream.take_with_epochs(config.trainer.prompts_per_step)
    pending = launch(side.actors, prompts, params, position)
    pending.epochs = epochs
    return pending


def _finish(pending: Launch, config: Config, learner: Learner, side: RolloutSide) -> list[Group]:
    """``finish``, bringing lost rollout actors back with the current weights."""

    def revive(names: list[str]) -> None:
        for name in names:
            await_restart(side.actors[name], name, config.sync.timeout_s)
        # A torch process group cannot take a new member: every actor joins a new one.
        broadcast(_Resync(), learner)
        side.sync.connect(side.actors)
        side.sync.sync_model(learner.policy, again=True)

    return finish(pending, config.rollout.call_timeout_s, revive, config.rollout.max_restarts)


def evaluate(config: Config, learner: Learner, side: RolloutSide, step: int) -> dict[str, float]:
    """Rank 0: accuracy and format rate on the evaluation prompts (one response each)."""
    trainer = config.trainer
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
    groups = _finish(launch(side.actors, side.eval_prompts, params, side.stream.position), config, learner, side)
    results = score(side.rewards, groups)
    scores = [r.scores[0] for r in results]
    return {
        "eval/accuracy": accuracy(results, config.algo.success_threshold),
        "eval/format": statistics.fmean(s.get("format", 0.0) for s in scores),
        "eval/reward_mean": statistics.fmean(s["overall"] for s in scores),
        "eval/prompts": float(len(groups)),
        **{f"eval/skipped/{reason}": float(n) for reason, n in side.eval_skipped.items()},
    }


def sync_weights(learner: Learner, side: RolloutSide | None) -> int:
    """Broadcast the policy to the rollout actors; under ZeRO-3 every rank takes part in gathering."""
    if side is not None:
        return side.sync.sync_model(learner.policy)
    if learner.config.learner.zero_stage == 3:
        for _ in learner.named_parameters_for_sync():
            pass
    return -1


def broadcast(obj: Any, learner: Learner) -> Any:
    """Rank 0's ``obj`` on every rank, over the learner's own group.

    While they wait, the other ranks take part in each weight sync rank 0 announces
    with a ``_Resync`` (a rollout actor came back mid-step); under ZeRO-3 it gathers
    the parameters from every rank.
    """
    while True:
        box = [obj]
        if dist.get_world_size() > 1:
            dist.broadcast_object_list(box, src=0)
        if learner.rank == 0 or not isinstance(box[0], _Resync):
            return box[0]
        sync_weights(learner, None)


def report(
    step: int, config: Config, learner: Learner, side: RolloutSide | None, metrics: dict[str, float], run_dir: Path
) -> None:
    """A Ray Train checkpoint every ``checkpoint_every`` steps and at the end (collective).

    Only checkpoint steps report: Ray Train logs each report in full, and the step
    metrics already go to the run's own telemetry. Each rank writes its part in
    ``run_dir/.staging/rank<r>`` first, from where Ray Train copies it; a folder that a
    rank killed while saving left there is removed at its next report.
    """
    trainer = config.trainer
    if step % trainer.checkpoint_every and step != trainer.total_steps:
        return
    state = None
    if side is not None:
        # The next batch to train on starts where the oldest batch still in flight began.
        position = side.pending[0].position if side.pending else side.stream.position
        state = {"step": step, "data": {"epoch": position.epoch, "taken": position.taken}}
    state = broadcast(state, learner)
    # Ray Train keeps (and prints) these with the checkpoint; the full set is in metrics.jsonl.
    headline = {k: v for k, v in metrics.items() if k in _HEADLINE or k.startswith("eval/")}
    staging = run_dir / STAGING / f"rank{learner.rank}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        learner.save(staging, client_state=state)
        ray.train.report(headline, checkpoint=ray.train.Checkpoint.from_directory(staging))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def resolve_run_length(config: Config, train_rows: int | None = None) -> Config:
    """``config`` with its run length in steps: unchanged when ``trainer.total_steps`` is set;
    else ``trainer.total_steps = ceil(total_epochs * train_rows / prompts_per_step)`` and
    ``total_epochs`` null, so that everything downstream reads one step count.

    ``train_rows``: the rows of ``data.train`` (default: counted from its files' metadata,
    which must already be resolved, e.g. by ``mapo_ray.job.resolve_inputs``). Rows the
    pipeline skips (``data/skipped/*``) are counted here, as the epoch is read from them.
    """
    trainer = config.trainer
    if trainer.total_epochs is None:
        return config
    if train_rows is None:
        train_rows = open_split(config.data, "train").num_rows
    steps = max(1, math.ceil(trainer.total_epochs * train_rows / trainer.prompts_per_step))
    return dataclasses.replace(config, trainer=dataclasses.replace(trainer, total_steps=steps, total_epochs=None))


def train(
    config: Config,
    *,
    run_dir: Path,
    model_path: Path,
    rollout_actors: Mapping[str, ActorHandle],
    reward_pool: RewardPool,
    resume_from: Path | None = None,
) -> ray.train.Result:
    """Run ``train_loop_per_worker`` on ``trainer.num_learners`` Ray Train workers.

    Checkpoints go to ``run_dir/checkpoints``; Ray Train restores the newest one there
    after a worker failure, and when a job is started again on the same ``run_dir``.
    A run length in ``trainer.total_epochs`` becomes steps here (``resolve_run_length``).
    """
    from ray.train.torch import TorchTrainer

    epochs = config.trainer.total_epochs
    config = resolve_run_length(config)
    trainer = config.trainer
    if epochs is not None:
        print(f"trainer.total_epochs {epochs}: {trainer.total_steps} steps of {trainer.prompts_per_step} prompts", flush=True)
    use_gpu = trainer.use_gpu if trainer.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": config,
            "model_path": str(model_path),
            "rollout_actors": dict(rollout_actors),
            "reward_pool": reward_pool,
            "run_dir": str(run_dir),
            "resume_from": str(resume_from) if resume_from else None,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=trainer.num_learners,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": trainer.cpus_per_learner, **({"GPU": trainer.gpus_per_learner} if use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name="checkpoints",
            storage_path=str(run_dir.resolve()),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=trainer.keep_checkpoints or None),
            failure_config=ray.train.FailureConfig(max_failures=trainer.max_failures),
        ),
    ).fit()
