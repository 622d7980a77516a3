"""The data plane of one training step, previous design against new, at growing batch sizes.

    PYTHONPATH=. python benchmarks/data_plane.py [--sizes 64,128,256,512] [--group-size 12]
                                                 [--repeats 3] [--design both|previous|new] [--quick]

Measures the cost of moving ONE step's data, from "prompts wanted" to "every learner
rank holds its shard of experiences and its advantages", on a local Ray cluster with
2 learner ranks (two Ray actors joined in a torch.distributed gloo group). Generation,
grading and the update are not what is measured:

- generation is a double, ``ReplayEngine`` (a ``RolloutEngine`` inside the real
  ``RolloutActor``s), that replays fixed token sequences at once: per prompt, G
  samples whose ``prompt_ids`` have the prompt's real length (its text tokens plus one
  ``<|image_pad|>`` per merged 28 x 28 patch of each image as resized), whose
  responses are 1 to ``rollout.max_new_tokens`` (2,048) tokens long, seeded per
  (uid, sample index), with float log-probs and a ``<think>..</think> \\boxed{..}`` text
  of ~4 characters per token holding the right answer or a wrong one, so that rewards
  vary inside a group; token ids are drawn from Qwen2.5-VL's 151,643 text tokens, so
  their pickled size is the real model's;
- grading is the real thing, but the same in both designs: ``RewardPool`` with the
  ``cpu-tiny`` preset's reward config and the built-in math grader;
- there is no update: the step ends when each rank has its shard and advantages.

The data is the benchmark's own parquet in the Geo3K layout (``images``: a list of one
``{bytes, path}`` PNG struct; ``problem`` with its ``<image>``; ``answer``, an integer),
line drawings of a random size of 448 to 1,000 px per side per row, read by the real
Ray Data pipeline with ``data.max_pixels`` at the default 1280 x 28 x 28, so they reach
the model at nearly full size (up to 1,280 vision tokens). The file holds
``max(sizes) x (1 + repeats)`` rows, so no timed step crosses an epoch.

The two designs:

- previous: a replica of ``mapo_ray/loop.py`` before the coordinator (227d73c; the same calls,
  copied here so that it survives the loop's change): rank 0 pulls the prompts from
  Ray Data (``PromptStream``) into its heap, sends them to the rollout actors
  (``generate.remote``), gets the groups back, builds ``GroupRequest``s for
  ``RewardPool.score``, builds the ``Experience``s, ``dist.broadcast_object_list``s
  the whole batch to every rank, and each rank computes the advantages of the whole
  batch and takes its shard (``shard_by_group``);
- new: ``mapo_ray.coordinator.RolloutCoordinator`` on rank 0, as ``mapo_ray/loop.py``
  drives it: prompts go from Ray Data into a ``PromptReader`` actor and from the object
  store into the rollout actors (``RolloutActor.rollout``), the reward actors read the
  responses from the object store, rank 0 reads small summaries and the rewards, deals
  the groups and posts each other rank its ``Shard`` (a ``ShardBox`` actor and a
  one-line message on the ``RankChannel``); each rank fetches its own groups
  (``Shard.experiences``) and computes their advantages (``batch_advantages``). The
  reader takes each batch's prompts from Ray Data one step ahead, while the step before
  runs (here, during the idle time below); the previous design pulled them when the
  step asked.

The previous design grades with a ``RewardPool`` made by the driver, as the job driver
made it then; the coordinator makes its own, of the same config. Both are set up
before the warm-up step, as a run sets them up before its first.

Per size and design: one untimed warm-up step, then ``--repeats`` timed steps, each
after ``--settle`` seconds of idling, in which Ray Data prepares the next batch as it
does while a real step generates and trains (generation takes minutes). Reported:

- s/step (median): rank 0's clock at "prompts wanted" to the later of the two ranks'
  clocks once its shard and advantages are in hand (one machine, one clock);
- grading s: of that, the reward pool's grading (``RewardPool.score``, which the
  coordinator times as ``time/reward_s``): the same work in both designs, and not the
  data plane; data s is s/step less grading s, the data plane's own cost;
- rank-0 MB: the pickled size of what learner rank 0's process receives and sends to
  orchestrate the step. Previous: the prompts pulled from Ray Data, the prompts sent
  to the actors, the groups received, the reward requests sent and results received,
  and the broadcast batch once per other rank. New: every object rank 0 gets with
  ``ray.get``, puts with ``ray.put`` and passes as an argument to a remote call in
  the step (summaries, reward results, shard messages; an object ref counts as its own
  small pickle), by the remote method that made or takes it;
- own shard MB: rank 0's shard of experiences (pickled), reported apart since every
  rank receives its shard alike (in the previous design rank 0 already holds it; in
  the new one it fetches it from the object store);
- peak +MB: rank 0's peak resident memory in the step over its resident memory before
  (the peak is reset with ``/proc/self/clear_refs`` and read as ``VmHWM``). The images
  of a shard fetched from the object store are shared-memory pages (Ray's zero-copy
  numpy), resident only once read: the update would read them, this step does not.

Byte counts are taken after each step, from the objects kept aside, so counting costs
neither time nor peak memory. Prints a table and ends with one JSON line:
``speedup`` (previous / new data seconds at the largest size; ``speedup_with_grading``
the same with the grading left in), ``rank0_bytes_ratio`` (new / previous rank-0 bytes
there) and the numbers of every size.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import pickle
import random
import socket
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw

from mapo_ray.config import AlgoConfig, Config, RolloutConfig, load_config
from mapo_ray.coordinator import RankChannel, RolloutCoordinator, succeeded
from mapo_ray.data.stream import DataPosition, PromptStream
from mapo_ray.job import start_local_ray
from mapo_ray.learner import Experience, batch_advantages, shard_by_group
from mapo_ray.models.tiny import tiny_vl_path
from mapo_ray.reward import GroupRequest, GroupResult
from mapo_ray.reward.pool import RewardPool
from mapo_ray.rollout.actor import RolloutError, create_rollout_actors, gather
from mapo_ray.rollout.engine import sampling_params
from mapo_ray.sync import GroupAddress, SyncPlan, WeightReceiver
from mapo_ray.telemetry.ledger import PromptLedger
from mapo_ray.types import Group, Prompt, Sample, SamplingParams, derive_seed

SIZES = (64, 128, 256, 512)
QUICK_SIZES = (8, 16)
WORLD_SIZE = 2
DESIGNS = ("previous", "new")
# Geo3K-like figures: each side 448..1000 px, drawn per row.
MIN_SIDE, MAX_SIDE = 448, 1000
# Qwen2.5-VL's pixel cap (DataConfig's default): a 1000 x 1000 figure keeps ~980 x 980 px.
MAX_PIXELS = 1280 * 28 * 28
QWEN_TEXT_TOKENS = 151_643  # Qwen2.5-VL's text vocabulary: response token ids are drawn from it
QWEN_IMAGE_PAD = 151_655  # its <|image_pad|> id
CHARS_PER_TOKEN = 4
_TRAIN_SEED = 1  # the loop's (now the coordinator's) salt of the training seed stream
MB = 1e6


# ------------------------------------------------------------------------- data


def write_data(path: Path, rows: int, seed: int) -> None:
    """``rows`` Geo3K-layout rows: a line drawing of a random 448..1000 px per side, an integer answer."""
    rng = random.Random(seed)
    images, problems, answers = [], [], []
    for index in range(rows):
        width, height = rng.randint(MIN_SIDE, MAX_SIDE), rng.randint(MIN_SIDE, MAX_SIDE)
        image = Image.new("RGB", (width, height), (255, 255, 255))
        draw = ImageDraw.Draw(image)
        corners = [(rng.randint(20, width - 20), rng.randint(20, height - 20)) for _ in range(rng.randint(3, 6))]
        draw.polygon(corners, outline=(0, 0, 0), width=3)
        for a, b in zip(corners, corners[1:]):
            draw.line([a, ((a[0] + b[0]) // 2, (a[1] + b[1]) // 2)], fill=(90, 90, 90), width=2)
        for corner, letter in zip(corners, "ABCDEF"):
            draw.text((corner[0] + 6, corner[1] + 6), letter, fill=(0, 0, 0))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        images.append([{"bytes": buffer.getvalue(), "path": f"figure-{index:06d}.png"}])
        sides = rng.randint(2, 30)
        problems.append(f"<image>Find x. The marked segment is {sides} units long; x is its length in units.")
        answers.append(str(sides))
    schema = pa.schema(
        [
            ("images", pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))),
            ("problem", pa.string()),
            ("answer", pa.string()),
        ]
    )
    table = pa.table({"images": images, "problem": problems, "answer": answers}, schema=schema)
    pq.write_table(table, path, row_group_size=64)


def bench_config(data: Path, prompts: int, group_size: int, rollout_actors: int) -> Config:
    """The cpu-tiny preset at ``prompts`` x ``group_size`` rollouts of up to 2,048 tokens, 2 learner ranks, on ``data``."""
    return load_config(
        preset="cpu-tiny",
        overrides=[
            f"data.train={data}",
            f"data.test={data}",
            f"data.max_pixels={MAX_PIXELS}",
            f"trainer.prompts_per_step={prompts}",
            f"trainer.num_learners={WORLD_SIZE}",
            f"rollout.group_size={group_size}",
            "rollout.max_new_tokens=2048",
            f"rollout.num_actors={rollout_actors}",
            "rollout.max_restarts=0",
            "sync.enabled=false",
            "sft.steps=0",
            "trainer.eval_every=0",
        ],
    )


# ------------------------------------------------------------------------- the generation double


class ReplayEngine:
    """A ``RolloutEngine`` that replays fixed token sequences at once (a benchmark double).

    Each sample's ``prompt_ids`` are the prompt's tokens with each image's pad widened
    to its merged patches; its response is a slice, of a length in [1, max_new_tokens]
    seeded by (uid, sample index), of one fixed sequence of ids and log-probs, and its
    text holds the right answer or a wrong one (seeded alike, even odds).
    """

    sync_ranks = 1

    def __init__(self, cfg: RolloutConfig, model_path: str, seed: int = 0) -> None:
        from transformers import AutoTokenizer

        self._receiver: WeightReceiver | None = None

        self._tokenizer = AutoTokenizer.from_pretrained(model_path)
        self._image_pad = self._tokenizer.convert_tokens_to_ids("<|image_pad|>")
        rng = np.random.default_rng(seed)
        longest = 2 * cfg.max_new_tokens
        self._ids = rng.integers(0, QWEN_TEXT_TOKENS, longest).tolist()
        self._logprobs = (-rng.exponential(0.5, longest)).tolist()
        self._filler = ("we know the two sides so x follows " * (longest * CHARS_PER_TOKEN // 30 + 1))[
            : cfg.max_new_tokens * CHARS_PER_TOKEN
        ]

    @property
    def weight_version(self) -> int:
        return 0

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[Group]:
        return [
            Group(p.uid, p.answer, [self._sample(p, i, ids, params) for i in range(params.n)])
            for p, ids in ((p, self._prompt_ids(p)) for p in prompts)
        ]

    def _prompt_ids(self, prompt: Prompt) -> list[int]:
        patches = iter([_height_width(image)[0] * _height_width(image)[1] // (28 * 28) for image in prompt.images])
        ids: list[int] = []
        for token in self._tokenizer.encode(prompt.text, add_special_tokens=False):
            ids += [QWEN_IMAGE_PAD] * next(patches) if token == self._image_pad else [token]
        return ids

    def _sample(self, prompt: Prompt, index: int, prompt_ids: list[int], params: SamplingParams) -> Sample:
        rng = random.Random(f"{prompt.uid}:{index}")
        length = rng.randint(1, params.max_new_tokens)
        start = rng.randrange(len(self._ids) - length + 1)
        answer = prompt.answer if rng.random() < 0.5 else f"{prompt.answer}1"
        text = f"<think>{self._filler[: max(0, length * CHARS_PER_TOKEN - 30)]}</think> \\boxed{{{answer}}}"
        return Sample(
            group_uid=prompt.uid,
            prompt_ids=prompt_ids,
            response_ids=self._ids[start : start + length],
            response_logprobs=self._logprobs[start : start + length],
            response_text=text,
            finish_reason="length" if length == params.max_new_tokens else "stop",
            weight_version=0,
        )

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        raise NotImplementedError("ReplayEngine replays fixed sequences; the benchmark runs with sync off")

    def join_weight_sync(self, address: GroupAddress, first_rank: int) -> None:
        # The coordinator forms the weight-sync group even with sync off; no update ever comes.
        self._receiver = WeightReceiver.join(address, first_rank, torch.device("cpu"))

    def receive_weights(self, plan: SyncPlan) -> int:
        raise NotImplementedError("ReplayEngine replays fixed sequences; the benchmark runs with sync off")


def replay_engine(cfg: RolloutConfig, model_path: str, seed: int) -> ReplayEngine:
    """The ``engine_factory`` of the rollout actors."""
    return ReplayEngine(cfg, model_path, seed)


def _height_width(image: Any) -> tuple[int, int]:
    return (image.height, image.width) if isinstance(image, Image.Image) else image.shape[:2]


def create_replay_actors(cfg: RolloutConfig, model_path: str) -> dict[str, Any]:
    """The real rollout actors, each around a ``ReplayEngine``."""
    return create_rollout_actors(cfg, model_path, engine_factory=replay_engine, prefix="replay")


# ------------------------------------------------------------------------- measuring


class _Counter:
    def __init__(self) -> None:
        self.bytes = 0

    def write(self, data: Any) -> int:
        size = memoryview(data).nbytes
        self.bytes += size
        return size


def pickled_size(obj: Any) -> int:
    """Bytes of ``pickle.dumps(obj, protocol=5)``, counted without building them."""
    counter = _Counter()
    try:
        pickle.Pickler(counter, protocol=5).dump(obj)
    except (pickle.PicklingError, AttributeError, TypeError):  # a function, as Ray pickles it
        counter = _Counter()
        ray.cloudpickle.CloudPickler(counter, protocol=5).dump(obj)
    return counter.bytes


@dataclass
class Traffic:
    """Objects rank 0 received or sent in one step, by what they are, sized once the step is over."""

    items: list[tuple[str, Any, int]] = field(default_factory=list)  # (what, object, times)

    def add(self, what: str, obj: Any, times: int = 1) -> None:
        self.items.append((what, obj, times))

    def sizes(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for what, obj, times in self.items:
            out[what] = out.get(what, 0) + pickled_size(obj) * times
        return out


class RayTraffic:
    """While entered, records in ``traffic`` what this process sends and receives through Ray:
    the arguments of every remote call (by method), every ``ray.put``, every object
    ``ray.get`` returns (by the method that made it) and what rank 0 broadcasts over the
    learners' process group (once per other rank). Only references are kept: the sizes
    are counted later, by ``Traffic.sizes``."""

    def __init__(self, traffic: Traffic, world_size: int) -> None:
        self._traffic = traffic
        self._world_size = world_size
        self._made_by: dict[str, str] = {}  # object ref (hex) -> the remote method that returns it
        self._saved: list[tuple[Any, str, Any]] = []

    def __enter__(self) -> RayTraffic:
        from ray.actor import ActorMethod
        from ray.remote_function import RemoteFunction

        traffic, made_by = self._traffic, self._made_by

        def calls(owner: Any, attr: str, name_of: Callable[[Any], str]) -> None:
            real = getattr(owner, attr)

            def wrapper(method: Any, args: Any = None, kwargs: Any = None, *rest: Any, **options: Any) -> Any:
                name = name_of(method)
                traffic.add(f"sent: {name} arguments", (args or (), kwargs or {}))
                out = real(method, args, kwargs, *rest, **options)
                for ref in out if isinstance(out, list) else [out]:
                    if isinstance(ref, ray.ObjectRef):
                        made_by[ref.hex()] = name
                return out

            self._saved.append((owner, attr, real))
            setattr(owner, attr, wrapper)

        calls(ActorMethod, "_remote", lambda m: m._method_name)
        calls(RemoteFunction, "_remote", lambda f: f._function_name)
        real_get, real_put, real_broadcast = ray.get, ray.put, dist.broadcast_object_list

        def get(refs: Any, *args: Any, **kwargs: Any) -> Any:
            values = real_get(refs, *args, **kwargs)
            for ref, value in zip(refs, values) if isinstance(refs, list) else [(refs, values)]:
                traffic.add(f"received: {made_by.get(ref.hex(), 'other')}", value)
            return values

        def put(value: Any, *args: Any, **kwargs: Any) -> Any:
            traffic.add("sent: ray.put", value)
            return real_put(value, *args, **kwargs)

        def broadcast(objects: list[Any], src: int = 0, *args: Any, **kwargs: Any) -> None:
            if dist.get_rank() == src:
                traffic.add("sent: broadcast to the other ranks", list(objects), times=self._world_size - 1)
            return real_broadcast(objects, src, *args, **kwargs)

        for owner, attr, new in ((ray, "get", get), (ray, "put", put), (dist, "broadcast_object_list", broadcast)):
            self._saved.append((owner, attr, getattr(owner, attr)))
            setattr(owner, attr, new)
        return self

    def __exit__(self, *exc: object) -> None:
        for owner, attr, real in reversed(self._saved):
            setattr(owner, attr, real)
        self._saved.clear()


def _status_kb(name: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {name}")


def reset_peak() -> int:
    """Reset this process's peak resident memory; returns its resident memory now, in bytes."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    return _status_kb("VmRSS") * 1024


def peak() -> int:
    """This process's peak resident memory since ``reset_peak``, in bytes."""
    return _status_kb("VmHWM") * 1024


# ------------------------------------------------------------------------- the previous design


def rollout_metrics(groups: Sequence[Group], results: Sequence[GroupResult], algo: AlgoConfig) -> dict[str, float]:
    """The reward and length statistics the previous loop computed on rank 0 in the step."""
    rewards = [r for result in results for r in result.rewards]
    lengths = [len(s.response_ids) for g in groups for s in g.samples]
    return {
        "reward/mean": statistics.fmean(rewards),
        "reward/std": statistics.pstdev(rewards),
        "reward/success": statistics.fmean(
            ok for r in results for ok in succeeded(r, algo.success, algo.success_threshold)
        ),
        "response/length_mean": statistics.fmean(lengths),
    }


def to_experiences(
    groups: Sequence[Group], results: Sequence[GroupResult], prompts: Mapping[str, Prompt], algo: AlgoConfig
) -> list[Experience]:
    batch = []
    for group_id, (group, result) in enumerate(zip(groups, results)):
        images = prompts[group.uid].images
        successes = succeeded(result, algo.success, algo.success_threshold)
        for sample, reward, ok in zip(group.samples, result.rewards, successes):
            batch.append(Experience.from_sample(sample, group_id=group_id, reward=reward, success=ok, images=images))
    return batch


class PreviousRank0:
    """Rank 0's rollout side in the previous loop: prompts, rollouts, rewards, ledger, experiences."""

    def __init__(
        self, config: Config, actors: Mapping[str, Any], rewards: RewardPool, model_path: str, run_dir: Path
    ) -> None:
        self.config = config
        self.actors = dict(actors)
        self.rewards = rewards
        self.stream = PromptStream(config, model_path, DataPosition())
        self.ledger = PromptLedger(run_dir, 0)
        self.grade_s = 0.0  # the last step's grading, the same work in both designs

    def rollout_batch(self, step: int, traffic: Traffic) -> list[Experience]:
        """``mapo_ray.loop.rollout_batch`` before the coordinator, on-policy, no actor lost."""
        config, algo = self.config, self.config.algo
        # _launch_next
        params = sampling_params(config.rollout, derive_seed(derive_seed(config.seed, _TRAIN_SEED), step * 1000))
        prompts, epochs = self.stream.take_with_epochs(config.trainer.prompts_per_step)
        traffic.add("prompts pulled from Ray Data", prompts)
        # launch
        names = list(self.actors)
        share = -(-len(prompts) // len(names))
        shares = {name: prompts[i * share : (i + 1) * share] for i, name in enumerate(names)}
        shares = {name: part for name, part in shares.items() if part}
        refs = {self.actors[name].generate.remote(part, params): name for name, part in shares.items()}
        for part in shares.values():
            traffic.add("prompts sent to rollout actors", (part, params))
        # finish
        results_by_actor, lost = gather(refs, f"rollout of {len(prompts)} prompts", config.rollout.call_timeout_s)
        if lost:
            raise RolloutError(f"rollout actors lost: {lost}")
        groups = [g for name in shares for g in results_by_actor[name]]
        for name in shares:
            traffic.add("groups received", results_by_actor[name])
        scored = list(zip((p.uid for p in prompts), epochs))
        # score
        requests = [GroupRequest(g.uid, g.answer, [s.response_text for s in g.samples]) for g in groups]
        grade_start = time.perf_counter()
        results = self.rewards.score(requests)
        self.grade_s = time.perf_counter() - grade_start
        traffic.add("reward requests sent", requests)
        traffic.add("reward results received", results)
        rollout_metrics(groups, results, algo)
        self.ledger.record(step, scored)
        batch = to_experiences(groups, results, {p.uid: p for p in prompts}, algo)
        ages = [0 - e.weight_version for e in batch]  # staleness_metrics (sync off: version 0)
        if max(ages) > 0:
            raise RuntimeError(f"step {step}: a sample is {max(ages)} weight versions old")
        return batch

    def close(self) -> None:
        self.ledger.close()


# ------------------------------------------------------------------------- the learner ranks


@ray.remote
class LearnerRank:
    """One learner rank: a process in the learners' gloo group, running one design's data plane."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank = rank
        self.world_size = world_size
        self._config: Config | None = None
        self._previous: PreviousRank0 | None = None
        self._channel: RankChannel | None = None
        self._coordinator: RolloutCoordinator | None = None
        import ray.data

        # As the previous loop set rank 0's (the coordinator's PromptReader sets its own alike).
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True
        context.enable_progress_bars = False

    def free_port(self) -> int:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]

    def join(self, port: int) -> None:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=self.rank, world_size=self.world_size)

    def open(
        self, design: str, config: Config, actors: Mapping[str, Any], rewards: RewardPool, model_path: str, run_dir: str
    ) -> None:
        """Set up ``design`` for ``config`` (collective): rank 0 its rollout side, every rank its channel."""
        self._config = config
        if design == "previous":
            if self.rank == 0:
                self._previous = PreviousRank0(config, actors, rewards, model_path, Path(run_dir))
            return
        self._channel = RankChannel(self.rank, self.world_size, on_sync=lambda: None, timeout_s=config.rollout.call_timeout_s)
        if self.rank == 0:
            # It starts its own reward pool (the same config) and prompt reader.
            self._coordinator = RolloutCoordinator(
                config, actors=actors, model_path=model_path, run_dir=run_dir, channel=self._channel, policy=lambda: None
            )

    def close(self) -> None:
        if self._previous is not None:
            self._previous.close()
        if self._coordinator is not None:
            self._coordinator.close()  # its channel too
        elif self._channel is not None:
            self._channel.close()
        self._previous = self._coordinator = self._channel = None
        gc.collect()

    def step_previous(self, step: int) -> dict[str, Any]:
        """One step of the previous design: rank 0 gathers the batch and broadcasts it whole;
        every rank computes the whole batch's advantages and takes its shard."""
        config = self._config
        assert config is not None
        traffic = Traffic()
        before = reset_peak()
        start = time.time()
        batch = self._previous.rollout_batch(step, traffic) if self._previous else None
        box = [batch]
        dist.broadcast_object_list(box, src=0)
        batch = box[0]
        advantages = batch_advantages(batch, config, step, torch.device("cpu"))  # the whole batch
        shards = shard_by_group([e.group_id for e in batch], [e.num_tokens for e in batch], self.world_size)
        mine = shards[self.rank]
        shard, shard_advantages = [batch[i] for i in mine], advantages[mine]
        end = time.time()
        traffic.add("broadcast batch", batch, times=self.world_size - 1)
        grade_s = self._previous.grade_s if self._previous else 0.0
        return self._report(start, end, before, shard, shard_advantages, traffic, grade_s)

    def step_new(self, step: int) -> dict[str, Any]:
        """One step of the new design: rank 0's coordinator deals the batch and posts the shards;
        every rank fetches its own groups and computes their advantages."""
        config = self._config
        assert config is not None and self._channel is not None
        traffic = Traffic()
        before = reset_peak()
        start = time.time()
        grade_s = 0.0
        if self._coordinator is not None:
            with RayTraffic(traffic, self.world_size):
                shard, metrics = self._coordinator.next_batch(step)
            grade_s = metrics["time/reward_s"]
        else:
            shard = self._channel.receive_shard()
        batch = shard.experiences(config.rollout.call_timeout_s)
        advantages = batch_advantages(batch, config, step, torch.device("cpu"))
        end = time.time()
        return self._report(start, end, before, batch, advantages, traffic, grade_s)

    def _report(
        self,
        start: float,
        end: float,
        before: int,
        shard: list[Experience],
        advantages: torch.Tensor,
        traffic: Traffic,
        grade_s: float,
    ) -> dict[str, Any]:
        """The step's clock times and, on rank 0, its peak memory, traffic and own shard (sized after the step)."""
        if len(shard) != len(advantages) or not shard:
            raise RuntimeError(f"rank {self.rank}: {len(shard)} experiences and {len(advantages)} advantages")
        out: dict[str, Any] = {"start": start, "end": end, "samples": len(shard)}
        if self.rank == 0:
            out["grade_s"] = grade_s
            out["peak_bytes"] = peak() - before
            out["traffic"] = traffic.sizes()
            out["own_shard_bytes"] = pickled_size(shard)
        return out


def start_ranks(world_size: int, cpus: float) -> list[Any]:
    """``world_size`` learner ranks joined in one gloo process group."""
    ranks = [LearnerRank.options(num_cpus=cpus).remote(r, world_size) for r in range(world_size)]
    port = ray.get(ranks[0].free_port.remote())
    ray.get([rank.join.remote(port) for rank in ranks])
    return ranks


def run_design(
    design: str,
    ranks: list[Any],
    config: Config,
    actors: Mapping[str, Any],
    rewards: RewardPool,
    model_path: str,
    run_dir: Path,
    repeats: int,
    settle_s: float,
) -> dict[str, Any]:
    """A warm-up step and ``repeats`` timed steps of ``design``: the median seconds, and rank 0's
    traffic and own shard of the median step and its largest peak over the timed steps."""
    run_dir.mkdir(parents=True)
    ray.get([rank.open.remote(design, config, actors, rewards, model_path, str(run_dir)) for rank in ranks])
    steps = []
    try:
        for step in range(1, repeats + 2):
            time.sleep(settle_s)
            outs = ray.get([getattr(rank, f"step_{design}").remote(step) for rank in ranks])
            samples = sum(o["samples"] for o in outs)
            if samples != config.trainer.prompts_per_step * config.rollout.group_size:
                raise RuntimeError(f"{design} step {step}: the ranks hold {samples} samples in all")
            if step > 1:  # step 1 warms up
                steps.append({"seconds": max(o["end"] for o in outs) - outs[0]["start"], **outs[0]})
    finally:
        ray.get([rank.close.remote() for rank in ranks])
    median = sorted(steps, key=lambda s: s["seconds"])[len(steps) // 2]
    return {
        "seconds": statistics.median(s["seconds"] for s in steps),
        "grade_s": statistics.median(s["grade_s"] for s in steps),
        "data_s": statistics.median(s["seconds"] - s["grade_s"] for s in steps),
        "rank0_bytes": sum(median["traffic"].values()),
        "own_shard_bytes": median["own_shard_bytes"],
        "peak_bytes": max(s["peak_bytes"] for s in steps),
        "traffic": median["traffic"],
    }


def _mb(n: int) -> str:
    """``n`` bytes in MB, with the decimals its size needs."""
    return f"{n / MB:.0f}" if n >= 10 * MB else f"{n / MB:.2f}" if n >= 0.1 * MB else f"{n / MB:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="prompts per step, comma-separated")
    parser.add_argument("--group-size", type=int, default=12, help="rollouts per prompt")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per size and design, after a warm-up")
    parser.add_argument("--quick", action="store_true", help=f"smoke run: sizes {','.join(map(str, QUICK_SIZES))}")
    parser.add_argument("--design", choices=("both", *DESIGNS), default="both")
    parser.add_argument("--rollout-actors", type=int, default=2)
    parser.add_argument("--settle", type=float, default=None, help="idle seconds before each step (default: 0.03 per prompt, at least 2)")
    parser.add_argument("--cpus", type=int, default=4, help="logical CPUs of the local Ray cluster")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    sizes = list(QUICK_SIZES) if args.quick else [int(s) for s in args.sizes.split(",")]
    designs = DESIGNS if args.design == "both" else (args.design,)

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    model_path = str(tiny_vl_path())
    with tempfile.TemporaryDirectory(prefix="data-plane-") as tmp:
        data = Path(tmp) / "train.parquet"
        rows = max(sizes) * (1 + args.repeats)
        started = time.perf_counter()
        write_data(data, rows, args.seed)
        print(f"wrote {rows} rows ({data.stat().st_size / MB:.0f} MB) in {time.perf_counter() - started:.0f}s", flush=True)
        start_local_ray(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
        results: dict[int, dict[str, dict[str, Any]]] = {}
        try:
            base = bench_config(data, sizes[0], args.group_size, args.rollout_actors)
            actors = create_replay_actors(base.rollout, model_path)
            rewards = RewardPool(base.reward)
            ranks = start_ranks(WORLD_SIZE, base.trainer.cpus_per_learner)
            for size in sizes:
                config = bench_config(data, size, args.group_size, args.rollout_actors)
                settle = args.settle if args.settle is not None else max(2.0, 0.03 * size)
                results[size] = {}
                for design in designs:
                    run_dir = Path(tmp) / f"{size}-{design}"
                    result = run_design(
                        design, ranks, config, actors, rewards, model_path, run_dir, args.repeats, settle
                    )
                    results[size][design] = result
                    print(
                        f"  {size} x {args.group_size} {design}: {result['seconds']:.2f} s, "
                        f"rank 0 {_mb(result['rank0_bytes'])} MB, peak +{result['peak_bytes'] / MB:.0f} MB",
                        flush=True,
                    )
        finally:
            ray.shutdown()

    print()
    print(
        f"{WORLD_SIZE} learner ranks, {args.rollout_actors} rollout actors, {args.group_size} rollouts per prompt, "
        f"responses 1..2048 tokens, figures {MIN_SIDE}..{MAX_SIDE} px, {os.cpu_count()} CPUs; median of {args.repeats}"
    )
    print(
        f"{'prompts':>8} {'design':<9} {'s/step':>8} {'grading s':>10} {'data s':>8} {'rank-0 MB':>10} "
        f"{'own shard MB':>13} {'peak +MB':>9}"
    )
    for size, by_design in results.items():
        for design, r in by_design.items():
            print(
                f"{size:>8} {design:<9} {r['seconds']:>8.2f} {r['grade_s']:>10.2f} {r['data_s']:>8.2f} "
                f"{_mb(r['rank0_bytes']):>10} {_mb(r['own_shard_bytes']):>13} {r['peak_bytes'] / MB:>9.0f}"
            )
    for size, by_design in results.items():
        for design, r in by_design.items():
            parts = ", ".join(f"{what} {_mb(n)}" for what, n in r["traffic"].items())
            print(f"  rank-0 MB at {size}, {design}: {parts}")
    largest = results[max(results)]
    both = all(d in largest for d in DESIGNS)
    summary = {
        "benchmark": "data_plane",
        "speedup": largest["previous"]["data_s"] / largest["new"]["data_s"] if both else None,
        "speedup_with_grading": largest["previous"]["seconds"] / largest["new"]["seconds"] if both else None,
        "rank0_bytes_ratio": largest["new"]["rank0_bytes"] / largest["previous"]["rank0_bytes"] if both else None,
        "sizes": {
            str(size): {
                design: {
                    "seconds": round(r["seconds"], 3),
                    "grade_s": round(r["grade_s"], 3),
                    "data_s": round(r["data_s"], 3),
                    "rank0_bytes": r["rank0_bytes"],
                    "own_shard_bytes": r["own_shard_bytes"],
                    "peak_bytes": r["peak_bytes"],
                }
                for design, r in by_design.items()
            }
            for size, by_design in results.items()
        },
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
