"""Fault tolerance of the whole loop on a local Ray cluster, each failure caused for real.

- a rollout actor killed mid-call (``ray.kill`` with restart), driven by the loop's
  ``launch`` / ``finish``: its share is generated again, bit for bit, once Ray has
  restarted it and it holds the current weights; past ``max_restarts``, a RolloutError;
- a rollout actor killed mid-run (``ray.kill`` with restart): Ray restarts it, it
  rejoins the weight sync with the current weights, its prompts are generated again,
  and the ledger shows every prompt scored exactly once;
- a rollout actor that crashes while it loads an update (``crashing_engine``), with two
  ZeRO-3 learners gathering: it is restarted, every actor joins a new group, the update
  is sent again and the step goes on;
- a reward function that hangs: each grading is cut at ``reward.grading_timeout_s``,
  counted in ``metrics.jsonl``, and the step completes;
- a learner worker killed (SIGKILL to its process): Ray Train restarts it from the
  latest checkpoint and the run ends with every step, in the uninterrupted data order;
- a learner whose checkpoint write fails partway (its file-size limit is lowered from
  outside, so the kernel refuses writes past it, as on a full disk, and ``torch.save``
  fails mid-file) and whose run then fails: the run folder still resumes (``--resume
  auto``) from the previous checkpoint.

A reward actor's death is tested in ``test_reward_pool.py``. The learner processes
are found among this test process's own descendants (the local cluster's workers),
never by name alone, so other Ray clusters on the machine are left alone.
"""

from __future__ import annotations

import functools
import json
import resource
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
import ray
import ray.train
import torch

from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

from mapo_ray.config import RolloutConfig, SyncConfig, load_config
from mapo_ray.data.prompts import render_prompt
from mapo_ray.job import resolve_inputs
from mapo_ray.coordinator import even_sizes, finish, launch
from mapo_ray.data.stream import DataPosition, PromptStream
from mapo_ray.loop import train
from mapo_ray.models import tiny_vl_path
from mapo_ray.rollout.actor import RolloutError, await_restart, create_rollout_actors
from mapo_ray.sync import WeightSyncError
from mapo_ray.sync.ray_sync import RayWeightSync
from mapo_ray.telemetry.ledger import LEDGER_FILE, read_ledger
from mapo_ray.telemetry.records import METRICS_FILE, read_metrics
from mapo_ray.types import Prompt, SamplingParams
from tests.integration import crashing_engine

pytestmark = pytest.mark.integration

PROMPTS = 4  # per step


def config(steps: int, *overrides: str):
    cfg = load_config(
        preset="cpu-tiny",
        overrides=[
            f"trainer.total_steps={steps}",
            f"trainer.prompts_per_step={PROMPTS}",
            "trainer.checkpoint_every=1",
            "trainer.keep_checkpoints=0",
            "trainer.eval_every=0",
            "rollout.group_size=2",
            "rollout.max_new_tokens=8",
            # Imported by name in the reward workers, which start in this working directory.
            "reward.function=tests.integration.fault_rewards:spread_reward",
            "sft.steps=0",
            "data.synthetic_train=32",
            "data.synthetic_test=8",
            *overrides,
        ],
    )
    return resolve_inputs(cfg)


def run(cfg, model_path: Path, run_dir: Path, during: Callable[[dict], None] | None = None, engine_factory=None):
    """``train`` with fresh driver-owned actors; ``during(actors)`` starts before it (e.g. a watcher)."""
    actors = create_rollout_actors(cfg.rollout, model_path, seed=cfg.seed, engine_factory=engine_factory)
    try:
        if during is not None:
            during(actors)
        result = train(cfg, run_dir=run_dir, model_path=model_path, rollout_actors=actors)
        versions = ray.get([a.weight_version.remote() for a in actors.values()], timeout=120)
    finally:
        for actor in actors.values():
            ray.kill(actor)
    return result, versions


class When(threading.Thread):
    """Runs ``action`` once, as soon as ``condition`` holds (polled every 50 ms)."""

    def __init__(self, condition: Callable[[], bool], action: Callable[[], object]) -> None:
        super().__init__(daemon=True)
        self._condition, self._action = condition, action
        self._done = threading.Event()
        self.result: object = None
        self.fired = False

    def run(self) -> None:
        while not self._done.is_set():
            if self._condition():
                self.result, self.fired = self._action(), True
                return
            time.sleep(0.05)

    def stop(self) -> None:
        self._done.set()
        self.join(timeout=10)


def logged_lines(run_dir: Path, name: str = METRICS_FILE) -> list[tuple[int, float]]:
    """``(step, time)`` of every line of ``name`` so far, in file order (one read, tolerant of a torn tail)."""
    path = run_dir / name
    if not path.exists():
        return []
    lines = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
            lines.append((record["step"], record["time"]))
        except (json.JSONDecodeError, KeyError):
            pass
    return lines


def logged_steps(run_dir: Path, name: str = METRICS_FILE) -> list[int]:
    """The steps of every line of ``name`` so far, in file order."""
    return [step for step, _ in logged_lines(run_dir, name)]


def learner_processes(since: float) -> list[psutil.Process]:
    """This cluster's Ray Train worker processes started after ``since``."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            title = proc.cmdline()[:1]
            if title and title[0].startswith("ray::RayTrainWorker") and proc.create_time() >= since:
                found.append(proc)
        except psutil.Error:  # gone meanwhile
            pass
    return found


def checkpoint_registered(run_dir: Path) -> bool:
    """Ray Train's controller has registered a checkpoint of this run.

    A worker's ``report`` persists the checkpoint folder at once, but the controller
    registers it only when it next polls the worker; a worker killed in between takes
    the report with it, and the restart resumes from the checkpoint before (the folder
    stays in storage, unused). The controller's snapshot file lists registered ones.
    """
    snapshot = run_dir / "checkpoints" / "checkpoint_manager_snapshot.json"
    try:
        return "checkpoint_" in snapshot.read_text()
    except FileNotFoundError:
        return False


def uninterrupted_order(cfg, model_path: Path, steps: int) -> list[list[tuple[str, int]]]:
    """The (uid, epoch) pairs each step of an uninterrupted run trains on: the loop's own prompt stream."""
    context = ray.data.DataContext.get_current()
    before = context.execution_options.preserve_order
    context.execution_options.preserve_order = True  # as the prompt reader sets it
    try:
        stream = PromptStream(cfg, str(model_path), DataPosition())
        order = []
        for _ in range(steps):
            prompts, epochs = stream.take_with_epochs(cfg.trainer.prompts_per_step)
            order.append([(p.uid, e) for p, e in zip(prompts, epochs)])
        return order
    finally:
        context.execution_options.preserve_order = before


def assert_each_prompt_once_per_epoch(ledger: dict[int, list[tuple[str, int]]]) -> None:
    counts = Counter(pair for step in ledger.values() for pair in step)
    assert counts and max(counts.values()) == 1, [pair for pair, n in counts.items() if n > 1]


def test_a_restarted_actor_generates_its_share_again_exactly_and_the_bound_holds(ray_cluster):
    cfg = RolloutConfig(num_actors=2, num_cpus_per_actor=0.5, group_size=2, max_new_tokens=8, top_p=1.0)
    actors = create_rollout_actors(cfg, tiny_vl_path())
    sync = RayWeightSync(SyncConfig(backend="gloo", timeout_s=120))
    # Weights unlike the model folder's, which a restarted actor would otherwise sample from.
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_vl_path())
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(1.25)

    def revive(names: list[str]) -> None:  # what the coordinator does, without the other learner ranks
        for name in names:
            await_restart(actors[name], name, 120)
        sync.connect(actors)
        sync.sync_model(model, again=True)

    tokenizer = AutoTokenizer.from_pretrained(tiny_vl_path())
    prompts = [Prompt(f"p{i}", render_prompt(tokenizer, f"What is {i} + {i}?"), (), str(2 * i)) for i in range(4)]
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=8, seed=7)
    sizes = even_sizes(len(prompts), list(actors))
    shares = {"rollout-0": ray.put(prompts[:2]), "rollout-1": ray.put(prompts[2:])}
    assert sizes == {"rollout-0": 2, "rollout-1": 2}

    def samples(generated) -> list[list[list[int]]]:
        return [[s.response_ids for s in p.group.samples] for p in ray.get([g.payload for g in generated])]

    try:
        sync.connect(actors)
        assert sync.sync_model(model) == 1
        reference = finish(launch(actors, shares, sizes, params, ray.put(None)), 120)

        pending = launch(actors, shares, sizes, params, ray.put(None))
        ray.kill(actors["rollout-1"], no_restart=False)  # mid-call: its share is lost
        generated = finish(pending, 120, revive, max_restarts=1)
        assert pending.restarts == 1
        assert ray.get([a.weight_version.remote() for a in actors.values()], timeout=120) == [1, 1]
        # Same weights, same share, same seed: the restarted actor's groups are the lost ones.
        assert [g.summary.uid for g in generated] == ["p0", "p1", "p2", "p3"]
        assert samples(generated) == samples(reference)

        pending = launch(actors, shares, sizes, params, ray.put(None))
        ray.kill(actors["rollout-0"], no_restart=False)
        with pytest.raises(RolloutError, match=r"'rollout-0' .*rollout\.max_restarts is 0"):
            finish(pending, 120, revive, max_restarts=0)

        # Restarted between two updates: the group it joined is not its process's, so the
        # next update names it as lost (to bring back in a new group), not as a bug.
        await_restart(actors["rollout-0"], "rollout-0", 120)
        with pytest.raises(WeightSyncError, match="'rollout-0' raised rollout actor 'rollout-0' was restarted") as err:
            sync.sync_model(model)
        assert err.value.lost == ("rollout-0",)
        revive(["rollout-0"])
        assert ray.get([a.weight_version.remote() for a in actors.values()], timeout=120) == [1, 1]
    finally:
        sync.close()
        for actor in actors.values():
            ray.kill(actor)


def test_a_killed_rollout_actor_is_restarted_resynced_and_its_prompts_reissued(ray_cluster, tmp_path):
    # Two learners under ZeRO-3: the resend after the restart gathers parameters from both.
    cfg, model_path = config(
        2, "rollout.num_actors=2", "trainer.num_learners=2", "learner.zero_stage=3", "trainer.checkpoint_every=2"
    )
    run_dir = tmp_path / "run"
    watchers: list[When] = []

    def kill_after_step_one(actors):
        # After step 1's line its weights are synced: the kill lands in step 2's rollout.
        victim = actors["rollout-1"]
        watchers.append(When(lambda: 1 in logged_steps(run_dir), lambda: ray.kill(victim, no_restart=False)))
        watchers[0].start()

    result, versions = run(cfg, model_path, run_dir, during=kill_after_step_one)
    watchers[0].stop()
    assert watchers[0].fired
    assert result.error is None
    assert versions == [2, 2]  # the restarted actor holds the last step's weights too

    history = read_metrics(run_dir / METRICS_FILE)
    assert sorted(history.train) == [1, 2]
    assert [history.train[s]["rollout/restarts"] for s in (1, 2)] == [0, 1]
    assert [history.train[s]["weight_version"] for s in (1, 2)] == [1, 2]
    assert history.train[2]["certainty/num_groups"] == PROMPTS

    ledger = read_ledger(run_dir / LEDGER_FILE)
    assert sorted(ledger) == [1, 2] and all(len(pairs) == PROMPTS for pairs in ledger.values())
    assert_each_prompt_once_per_epoch(ledger)
    assert logged_steps(run_dir, LEDGER_FILE) == [1, 2]  # no step was scored twice either


def test_a_rollout_actor_that_crashes_mid_sync_is_restarted_and_rejoins_and_the_step_goes_on(ray_cluster, tmp_path):
    # Two learners under ZeRO-3 and small buckets: rank 0 is still sending, and both
    # ranks gathering, when the receiver goes; the sync is done again with the other rank.
    cfg, model_path = config(
        2,
        "rollout.num_actors=2",
        "trainer.num_learners=2",
        "learner.zero_stage=3",
        "trainer.checkpoint_every=2",
        "sync.bucket_mb=0.0625",
    )
    markers = tmp_path / "crashes"
    crash = functools.partial(crashing_engine.make, crashes={2: cfg.seed + 1}, marker_dir=str(markers))
    run_dir = tmp_path / "run"
    result, versions = run(cfg, model_path, run_dir, engine_factory=crash)
    assert crashing_engine.crashed_versions(markers) == [2]  # rollout-1 died loading step 2's weights
    assert result.error is None
    assert versions == [2, 2]  # the restarted actor holds the last step's weights

    history = read_metrics(run_dir / METRICS_FILE)
    assert sorted(history.train) == [1, 2]
    assert [history.train[s]["rollout/restarts"] for s in (1, 2)] == [0, 1]
    assert [history.train[s]["weight_version"] for s in (1, 2)] == [1, 2]
    ledger = read_ledger(run_dir / LEDGER_FILE)
    assert logged_steps(run_dir, LEDGER_FILE) == [1, 2] and all(len(ledger[s]) == PROMPTS for s in (1, 2))
    assert_each_prompt_once_per_epoch(ledger)


def test_a_hanging_reward_function_costs_the_grading_time_limit_and_is_counted(ray_cluster, tmp_path):
    cfg, model_path = config(
        1,
        "reward.function=tests.integration.fault_rewards:hang",
        "reward.grading_timeout_s=1.0",
        "reward.call_timeout_s=60",
        "trainer.prompts_per_step=2",  # each overrun also restarts the grading process
    )
    run_dir = tmp_path / "run"
    result, versions = run(cfg, model_path, run_dir)
    assert result.error is None and versions == [1]
    step = read_metrics(run_dir / METRICS_FILE).train[1]
    prompts = cfg.trainer.prompts_per_step
    rollouts = prompts * cfg.rollout.group_size
    # Every grading was cut at the grading limit; no group needed the call time-out.
    assert step["reward/failed/timeout"] == rollouts
    assert step["reward/failed/call_timeout"] == 0 and step["reward/graded"] == 0
    assert step["reward/mean"] == 0.0
    assert len(read_ledger(run_dir / LEDGER_FILE)[1]) == prompts


def test_a_killed_learner_restarts_from_its_checkpoint_and_keeps_the_data_order(ray_cluster, tmp_path):
    steps = 4
    cfg, model_path = config(steps, "trainer.max_failures=1")
    run_dir = tmp_path / "run"
    watchers: list[When] = []
    started = time.time()

    at_kill: list[list[tuple[int, float]]] = []

    def kill_learner():
        (proc,) = learner_processes(started)
        proc.send_signal(signal.SIGKILL)
        at_kill.append(logged_lines(run_dir, LEDGER_FILE))
        return proc.pid

    def kill_once_a_checkpoint_is_registered(actors):
        watchers.append(When(lambda: checkpoint_registered(run_dir), kill_learner))
        watchers[0].start()

    result, versions = run(cfg, model_path, run_dir, during=kill_once_a_checkpoint_is_registered)
    watchers[0].stop()
    assert watchers[0].fired and isinstance(watchers[0].result, int)
    assert result.error is None
    assert versions == [steps]  # the restarted rank 0 re-formed the weight sync and kept sending

    history = read_metrics(run_dir / METRICS_FILE)
    assert sorted(history.train) == list(range(1, steps + 1))
    assert [history.train[s]["weight_version"] for s in range(1, steps + 1)] == list(range(1, steps + 1))
    # The restart resumed from a checkpoint, not from scratch: step 1's line is the one
    # written before the kill (the resume drops and redoes only later steps), and every
    # step has one line.
    assert logged_lines(run_dir, LEDGER_FILE)[0] == at_kill[0][0]
    assert logged_steps(run_dir, LEDGER_FILE) == list(range(1, steps + 1))
    ledger = read_ledger(run_dir / LEDGER_FILE)
    assert [ledger[s] for s in range(1, steps + 1)] == uninterrupted_order(cfg, model_path, steps)
    assert_each_prompt_once_per_epoch(ledger)


def test_a_crash_while_writing_a_checkpoint_leaves_the_previous_one_to_resume_from(ray_cluster, tmp_path):
    # keep_checkpoints=1: the previous checkpoint is deleted only once a newer one is complete.
    steps = 4
    cfg, model_path = config(steps, "trainer.keep_checkpoints=1", "trainer.max_failures=0")
    run_dir = tmp_path / "run"
    watchers: list[When] = []
    started = time.time()
    # Bytes: above every log and metrics file, below a checkpoint's weight file. Python
    # ignores SIGXFSZ, so a write past it fails (EFBIG) instead of killing the process.
    limit = 1_000_000

    def cap_file_size():
        (proc,) = learner_processes(started)
        resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (limit, limit))
        return proc.pid

    def cap_once_checkpoint_one_is_in(actors):
        # A ledger line for step 2 comes after report(1) returned and before checkpoint 2 is written.
        ready = lambda: checkpoint_registered(run_dir) and 2 in logged_steps(run_dir, LEDGER_FILE)  # noqa: E731
        watchers.append(When(ready, cap_file_size))
        watchers[0].start()

    # The failure is DeepSpeed's torch.save of the next checkpoint, part-way through its file.
    with pytest.raises(ray.train.TrainingFailedError, match=r'serialization\.py", line \d+, in save'):
        run(cfg, model_path, run_dir, during=cap_once_checkpoint_one_is_in)
    watchers[0].stop()
    assert watchers[0].fired
    # What is left: the one complete checkpoint the interrupted write was to replace.
    (survivor,) = [p for p in (run_dir / "checkpoints").glob("checkpoint_*") if p.is_dir()]
    saved = torch.load(survivor / "learner" / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    kept_step = saved["client_state"]["step"]
    # Checkpoint 1 normally; a later one only if it was written before the limit was set.
    assert kept_step in range(1, steps)
    before = logged_lines(run_dir, LEDGER_FILE)
    assert before[-1][0] == kept_step + 1  # it died in the step after the checkpoint it kept

    # --resume auto: the same run folder again; Ray Train restores its newest registered checkpoint.
    result, versions = run(cfg, model_path, run_dir)
    assert result.error is None and versions == [steps]
    # The lines of the kept steps stay as they were; the step it died in is done again,
    # its earlier line dropped: one line per step.
    after = logged_lines(run_dir, LEDGER_FILE)
    assert [step for step, _ in after] == list(range(1, steps + 1))
    assert after[:kept_step] == before[:kept_step] and after[kept_step][1] > before[kept_step][1]
    history = read_metrics(run_dir / METRICS_FILE)
    assert sorted(history.train) == list(range(1, steps + 1))
    ledger = read_ledger(run_dir / LEDGER_FILE)
    assert [ledger[s] for s in range(1, steps + 1)] == uninterrupted_order(cfg, model_path, steps)
    assert_each_prompt_once_per_epoch(ledger)


def train_controller(since: float) -> psutil.Process:
    """This cluster's Ray Train controller process started after ``since``."""
    for proc in psutil.Process().children(recursive=True):
        try:
            title = proc.cmdline()[:1]
            if title and title[0].startswith("ray::TrainController") and proc.create_time() >= since:
                return proc
        except psutil.Error:
            pass
    raise AssertionError("no Ray Train controller among this test's processes")


def registered_names(run_dir: Path) -> list[str]:
    """The checkpoint folders in Ray Train's snapshot (what its controller registered and keeps)."""
    state = json.loads((run_dir / "checkpoints" / "checkpoint_manager_snapshot.json").read_text())
    return [r["checkpoint_dir_name"] for r in state["checkpoint_results"]]


def checkpoint_names(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("checkpoint_*") if p.is_dir())


def test_a_checkpoint_that_ray_train_lost_is_restored_then_removed(ray_cluster, tmp_path):
    """A learner killed after its report wrote checkpoint 2 but before the controller
    registered it (the controller is held with SIGSTOP meanwhile, so the window is
    certain): the restart resumes from checkpoint 2, not from the registered checkpoint
    1, and once Ray Train registers a newer one the lost folder goes, so that
    ``keep_checkpoints`` holds. A Ctrl-C abort during a report leaves the same state."""
    steps = 4
    cfg, model_path = config(steps, "trainer.max_failures=1", "trainer.keep_checkpoints=2")
    run_dir = tmp_path / "run"
    started = time.time()
    watchers: list[When] = []
    at_kill: dict[str, object] = {}

    def hold_controller():
        controller = train_controller(started)
        controller.suspend()
        return controller

    def checkpoint_two_written() -> bool:
        # The report copies rank 0's staging folder into checkpoint 2, then deletes it.
        return len(checkpoint_names(run_dir)) == 2 and not (run_dir / ".staging" / "rank0").exists()

    def kill_learner_then_release_controller():
        at_kill.update(registered=registered_names(run_dir), folders=checkpoint_names(run_dir))
        at_kill["ledger"] = logged_lines(run_dir, LEDGER_FILE)
        (proc,) = learner_processes(started)
        proc.send_signal(signal.SIGKILL)
        proc.wait(60)
        watchers[0].result.resume()

    def watch(actors):
        # Step 2's ledger line comes after checkpoint 1's report, before checkpoint 2's.
        held = lambda: checkpoint_registered(run_dir) and 2 in logged_steps(run_dir, LEDGER_FILE)  # noqa: E731
        watchers.append(When(held, hold_controller))
        watchers.append(When(lambda: watchers[0].fired and checkpoint_two_written(), kill_learner_then_release_controller))
        for watcher in watchers:
            watcher.start()

    try:
        result, versions = run(cfg, model_path, run_dir, during=watch)
    finally:
        for watcher in watchers:
            watcher.stop()
        if watchers and isinstance(watchers[0].result, psutil.Process) and watchers[0].result.is_running():
            watchers[0].result.resume()
    assert all(w.fired for w in watchers)
    assert result.error is None and versions == [steps]
    one, two = at_kill["folders"]
    assert at_kill["registered"] == [one]  # checkpoint 2 was in storage, unknown to Ray Train

    # Resumed from checkpoint 2: the lines of steps 1 and 2 are those written before the
    # kill (a resume from checkpoint 1 would have done step 2 again).
    after = logged_lines(run_dir, LEDGER_FILE)
    assert [step for step, _ in after] == list(range(1, steps + 1))
    assert after[:2] == at_kill["ledger"][:2]
    ledger = read_ledger(run_dir / LEDGER_FILE)
    assert [ledger[s] for s in range(1, steps + 1)] == uninterrupted_order(cfg, model_path, steps)

    # Ray Train deleted checkpoint 1 by keep_checkpoints, the loop the lost checkpoint 2.
    assert two not in checkpoint_names(run_dir)
    assert checkpoint_names(run_dir) == registered_names(run_dir) and len(checkpoint_names(run_dir)) == 2
