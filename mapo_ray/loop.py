"""One training step, on-policy or async, and the Ray Train loop that repeats it.

Every learner rank runs ``train_loop_per_worker``, top to bottom; rank 0 also holds
the ``RolloutCoordinator`` (``mapo_ray.coordinator``), which drives the rollout side
that the job driver created and handed over in ``train_loop_config``::

    rank 0:  coordinator.next_batch ─► prompts ─► rollout actors ─► reward pool ─► shards
    all:     own shard ─► advantages of its groups ─► update (DeepSpeed)
    rank 0:  coordinator.sync_weights ─► actors   (all ranks gather under ZeRO-3)
    all:     report metrics / checkpoint to Ray Train

Each rank receives only its own groups, from the object store; advantages are per
group, so each rank computes its own exactly, and the batch-wide numbers (advantage
mean and max) are reduced over ranks.

On-policy (the default), batch v+1 is sampled after the weights of step v reached the
actors. Async mode launches the next ``trainer.max_staleness`` batches before the
update, so generation overlaps training; every sample carries the weight version that
sampled it, and a batch older than the bound is an error, not a silent mix.

Failures: a rollout actor whose process dies mid-batch is restarted by Ray; the
coordinator waits for it, tells the other ranks to take part in a weight sync, re-forms
the weight-sync group with every actor, sends the current weights again and re-issues
only that actor's prompts with the same seed (``rollout.max_restarts`` per batch).
Reward actors are retried inside ``RewardPool``. A learner worker that dies takes Ray
Train's restart (``trainer.max_failures``): every rank restarts from the newest
complete checkpoint and its data position, and rank 0 connects to the same
driver-owned rollout actors again. ``ledger.jsonl`` records which prompts each step
scored.

Checkpoints: Ray Train registers a reported checkpoint only when its controller
next polls the workers, after the folder is already in storage; a worker that dies
in between (or a Ctrl-C abort) leaves the folder unregistered, and Ray Train never
restores nor deletes it. The loop restores from the newest complete folder in
storage, registered or not (``checkpoints_to_restore``), and once Ray Train has
registered a newer one, removes those it does not know (``remove_unregistered``),
so that ``trainer.keep_checkpoints`` holds.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import signal
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import FrameType
from typing import Any

import ray
import torch
import torch.distributed as dist
from ray.train.v2._internal.execution import context as ray_train_context
from ray.actor import ActorHandle

from mapo_ray.config import Config
from mapo_ray.coordinator import RankChannel, RolloutCoordinator
from mapo_ray.data.pipeline import open_split
from mapo_ray.data.stream import DataPosition
from mapo_ray.learner import Learner
from mapo_ray.learner.sft import warm_start

STAGING = ".staging"  # under the run folder: each rank's checkpoint before Ray Train copies it
CHECKPOINTS = "checkpoints"  # under the run folder: Ray Train's storage (RunConfig name)
STARTED = ".started"  # under the run folder: rank 0 is past start-up and about to train
# How long rank 0 waits for Ray Train to register a report before cleaning up; past it,
# the next report cleans up instead.
REGISTER_TIMEOUT_S = 60.0
_HEADLINE = ("step", "weight_version", "reward/mean", "reward/accuracy", "actor/pg_loss")


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point. ``loop_config``: ``config``, ``model_path`` (the policy's
    Hugging Face folder, whose tokenizer templates the prompts), ``rollout_actors``
    (name -> handle), ``run_dir``, ``resume_from`` (a checkpoint folder or None) and
    ``earlier`` (the newest checkpoint folder name in ``run_dir`` when the job started)."""
    config: Config = loop_config["config"]
    trainer = config.trainer
    run_dir = Path(loop_config["run_dir"])
    # Ray Train logs every report in full at INFO, under its module's file path, which its
    # LoggingConfig (see ``train``) misses: the console keeps the run's own step lines.
    logging.getLogger(ray_train_context.__file__).setLevel(logging.WARNING)
    learner = Learner(config, loop_config["model_path"])

    start_step, position = 0, DataPosition()
    candidates = checkpoints_to_restore(run_dir, loop_config.get("resume_from"), loop_config.get("earlier"))
    if candidates:
        folder, state = learner.load_first_complete(candidates)
        if folder != candidates[0] and learner.rank == 0:
            print(f"restored the learner from {folder}, the newest checkpoint that loads", flush=True)
        start_step, position = state["step"], DataPosition(**state["data"])

    channel = RankChannel(
        learner.rank, learner.world_size, on_sync=lambda: drain_for_sync(learner), timeout_s=config.rollout.call_timeout_s
    )
    coordinator = None
    if learner.rank == 0:
        coordinator = RolloutCoordinator(
            config,
            actors=loop_config["rollout_actors"],
            model_path=loop_config["model_path"],
            run_dir=run_dir,
            channel=channel,
            policy=lambda: learner.policy,
            start_step=start_step,
            position=position,
        )
    warm_metrics: dict[str, float] = {}
    if start_step > 0:
        # The actors loaded the model folder, not the checkpoint: send them the restored weights.
        sync_weights(learner, coordinator)
    elif config.sft.steps:
        # The supervised warm-start runs once; a resumed run has it in its weights.
        warm_metrics = warm_start(learner, config.sft, coordinator.take_prompts if coordinator else None).summary()
        sync_weights(learner, coordinator)
        if coordinator and trainer.eval_every:
            coordinator.logger.log_eval(0, coordinator.evaluate(0))

    if learner.rank == 0:
        (run_dir / STARTED).touch()  # a Ctrl-C from now on aborts the run; before, it stops the start-up
    for step in range(start_step + 1, trainer.total_steps + 1):
        metrics = training_step(step, config, learner, channel, coordinator)
        if step == 1:
            metrics.update(warm_metrics)
        if coordinator:
            coordinator.logger.log(step, metrics)
            if trainer.eval_every and (step % trainer.eval_every == 0 or step == trainer.total_steps):
                eval_metrics = coordinator.evaluate(step)
                coordinator.logger.log_eval(step, eval_metrics)
                metrics = {**metrics, **eval_metrics}
        report(step, config, learner, channel, coordinator, metrics, run_dir)

    learner.export_hf(run_dir / "policy")
    if coordinator:
        coordinator.close()
    else:
        channel.close()


def checkpoints_to_restore(run_dir: Path, resume_from: str | None, earlier: str | None = None) -> list[Path]:
    """The checkpoint folders to restore from, the one to try first first.

    Without --resume PATH (a fresh run, a restart after a failure, --resume auto):
    every ``checkpoint_*`` folder under ``run_dir/checkpoints``, newest first. That is
    Ray Train's registered one, preceded by newer ones it lost (reported by a worker
    that died, or was aborted, before the controller registered them) and followed by
    the older ones it keeps; ``Learner.load_first_complete`` takes the first that every
    rank loads whole. With --resume PATH, this job's own folders (names after
    ``earlier``, the newest one there when the job started; after a restart), then
    PATH: never a newer folder of the run it goes back in.
    """
    folders = checkpoint_folders(run_dir)[::-1]
    if resume_from is None:
        return folders
    return [p for p in folders if earlier is None or p.name > earlier] + [Path(resume_from)]


def checkpoint_folders(run_dir: Path) -> list[Path]:
    """The ``checkpoint_*`` folders under ``run_dir/checkpoints``, oldest first: Ray Train
    names them checkpoint_<date>_<time>, so name order is the order they were written."""
    return sorted(p for p in (run_dir / CHECKPOINTS).glob("checkpoint_*") if p.is_dir())


def newest_checkpoint_name(run_dir: Path) -> str | None:
    """The name of the newest ``checkpoint_*`` folder under ``run_dir/checkpoints``; None if none."""
    folders = checkpoint_folders(run_dir)
    return folders[-1].name if folders else None


def remove_unregistered(run_dir: Path, registered: list[str]) -> list[Path]:
    """Delete the ``checkpoint_*`` folders under ``run_dir/checkpoints`` that are not in
    ``registered`` (the names Ray Train keeps) and are older than the newest of those;
    returns them.

    Ray Train never registers such a folder later (it registers reports in order), and
    never deletes it (it deletes only folders it registered), so they would outlive
    ``trainer.keep_checkpoints``. One newer than every registered folder is left: it
    may be the newest complete checkpoint of the run.
    """
    if not registered:
        return []
    newest, known = max(registered), set(registered)
    removed = []
    for folder in checkpoint_folders(run_dir):
        if folder.name not in known and folder.name < newest:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def training_step(
    step: int, config: Config, learner: Learner, channel: RankChannel, coordinator: RolloutCoordinator | None
) -> dict[str, float]:
    """One step on every rank: rank 0's coordinator deals the batch, each rank updates on its
    shard, rank 0 syncs the weights."""
    start = time.perf_counter()
    metrics: dict[str, float] = {}
    if coordinator:
        shard, rollout_metrics = coordinator.next_batch(step)
        metrics.update(rollout_metrics)
    else:
        shard = channel.receive_shard()

    learn_start = time.perf_counter()
    batch = shard.experiences(config.rollout.call_timeout_s)
    advantages = learner.advantages(batch)
    metrics.update(learner.update(batch, advantages))
    adv_mean, adv_max_abs = reduce_advantages(advantages)
    metrics["time/learner_s"] = time.perf_counter() - learn_start

    sync_start = time.perf_counter()
    # The control run (sync off): the actors keep sampling with the starting weights.
    version = sync_weights(learner, coordinator) if config.sync.enabled else (coordinator.sync.version if coordinator else -1)
    # Only rank 0 talks to the actors; the others learn the version from it.
    metrics["weight_version"] = float(channel.share(version))
    metrics["time/sync_s"] = time.perf_counter() - sync_start

    if coordinator:
        metrics.update(coordinator.step_metrics(adv_max_abs))
        metrics["adv/mean"] = adv_mean
        metrics["adv/max_abs"] = adv_max_abs
    metrics["step"] = float(step)
    metrics["time/step_s"] = time.perf_counter() - start
    return metrics


def reduce_advantages(advantages: torch.Tensor) -> tuple[float, float]:
    """The mean and the largest absolute value of the step's advantages, over every rank's shard."""
    local = advantages.detach().to(torch.float64)
    sums = torch.stack([local.sum(), torch.tensor(float(local.numel()), dtype=torch.float64, device=local.device)])
    peak = local.abs().max() if local.numel() else torch.zeros((), dtype=torch.float64, device=local.device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sums)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return (sums[0] / sums[1].clamp_min(1)).item(), peak.item()


def sync_weights(learner: Learner, coordinator: RolloutCoordinator | None) -> int:
    """Send the policy to the rollout actors (rank 0); under ZeRO-3 every rank takes part in gathering."""
    if coordinator is not None:
        return coordinator.sync_weights(learner.policy)
    drain_for_sync(learner)
    return -1


def drain_for_sync(learner: Learner) -> None:
    """A rank > 0's part of a weight sync: under ZeRO-3, gather the parameters with rank 0."""
    if learner.config.learner.zero_stage == 3:
        for _ in learner.named_parameters_for_sync():
            pass


def report(
    step: int,
    config: Config,
    learner: Learner,
    channel: RankChannel,
    coordinator: RolloutCoordinator | None,
    metrics: dict[str, float],
    run_dir: Path,
) -> None:
    """A Ray Train checkpoint every ``checkpoint_every`` steps and at the end (collective).

    Only checkpoint steps report: Ray Train logs each report in full, and the step
    metrics already go to the run's own telemetry. Each rank writes its part in
    ``run_dir/.staging/rank<r>`` first, from where Ray Train copies it; a folder that a
    rank killed while saving left there is removed at its next report. Then rank 0
    waits for Ray Train to register the checkpoint and removes the checkpoint folders
    it does not know (``remove_unregistered``).
    """
    trainer = config.trainer
    if step % trainer.checkpoint_every and step != trainer.total_steps:
        return
    state = None
    if coordinator is not None:
        position = coordinator.data_position()
        state = {"step": step, "data": {"epoch": position.epoch, "taken": position.taken}}
    state = channel.share(state)
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
    if learner.rank == 0:
        reported = ray.train.get_all_reported_checkpoints(
            consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED, timeout_s=REGISTER_TIMEOUT_S
        )
        for folder in remove_unregistered(run_dir, [Path(r.checkpoint.path).name for r in reported]):
            print(f"removed checkpoint {folder}, which Ray Train did not register", flush=True)


SignalHandler = Callable[[int, FrameType | None], Any]


def interrupt_until(started: Path, then: SignalHandler) -> SignalHandler:
    """A SIGINT handler: KeyboardInterrupt until the file ``started`` exists, then ``then``'s."""

    def handler(signum: int, frame: FrameType | None) -> None:
        if not started.exists():
            raise KeyboardInterrupt
        then(signum, frame)

    return handler


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
    resume_from: Path | None = None,
) -> ray.train.Result:
    """Run ``train_loop_per_worker`` on ``trainer.num_learners`` Ray Train workers.

    Checkpoints go to ``run_dir/checkpoints``; the loop restores the newest complete
    one there after a worker failure, and when a job is started again on the same
    ``run_dir``; with ``resume_from``, that folder instead (``checkpoints_to_restore``).
    A run length in ``trainer.total_epochs`` becomes steps here (``resolve_run_length``).

    Ctrl-C (SIGINT) before the loop starts its first step raises KeyboardInterrupt here
    at once; from then on, Ray Train's handler aborts the run.
    """
    from ray.train.torch import TorchTrainer

    started = run_dir / STARTED
    started.unlink(missing_ok=True)

    class Trainer(TorchTrainer):
        def _register_sigint_handler(self, controller: ActorHandle) -> None:
            # Ray Train's handler asks the controller to abort, which waits until the
            # controller is done starting the workers (minutes while they load the model).
            super()._register_sigint_handler(controller)
            signal.signal(signal.SIGINT, interrupt_until(started, signal.getsignal(signal.SIGINT)))

    epochs = config.trainer.total_epochs
    config = resolve_run_length(config)
    trainer = config.trainer
    if epochs is not None:
        print(f"trainer.total_epochs {epochs}: {trainer.total_steps} steps of {trainer.prompts_per_step} prompts", flush=True)
    use_gpu = trainer.use_gpu if trainer.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    trainer_run = Trainer(
        train_loop_per_worker,
        train_loop_config={
            "config": config,
            "model_path": str(model_path),
            "rollout_actors": dict(rollout_actors),
            "run_dir": str(run_dir),
            "resume_from": str(resume_from) if resume_from else None,
            "earlier": newest_checkpoint_name(run_dir),
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=trainer.num_learners,
            use_gpu=use_gpu,
            resources_per_worker={
                "CPU": trainer.cpus_per_learner,
                **({"GPU": trainer.gpus_per_learner} if use_gpu else {}),
                **trainer.resources_per_learner,
            },
        ),
        run_config=ray.train.RunConfig(
            name=CHECKPOINTS,
            storage_path=str(run_dir.resolve()),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=trainer.keep_checkpoints or None),
            failure_config=ray.train.FailureConfig(max_failures=trainer.max_failures),
            # The step lines say how training goes; Ray Train's INFO lines (worker group, process
            # group, checkpoints reported) go to its ray-train-sys-*.log in the Ray session's logs.
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )
    try:
        return trainer_run.fit()
    finally:
        started.unlink(missing_ok=True)
