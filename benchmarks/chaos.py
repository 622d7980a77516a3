"""A chaos run: ``cpu-tiny`` under a seeded schedule of real faults, checked by invariants.

    PYTHONPATH=. python benchmarks/chaos.py [--seed 0] [--steps 20] [--out runs/chaos]

Runs the training loop twice with the same seed on a local Ray cluster: once without
faults (the reference), once under faults. The faults, each at a moment drawn from
``--seed`` (a step, then a delay into it, so they land in generation, grading, the
update, the weight sync or a checkpoint, wherever the run happens to be):

- ``rollout_kill``: SIGKILL to a rollout actor's process (Ray restarts it);
- ``rollout_crash_mid_sync``: a rollout actor's process exits half-way through loading
  a weight update (``tests/integration/crashing_engine.py``), on a drawn version;
- ``reward_kill``: SIGKILL to a reward actor's process;
- ``grader_kill``: SIGKILL to a grading process (the child a reward actor grades in);
- ``learner_kill``: SIGKILL to the learner worker (Ray Train restarts it from its
  checkpoint);
- ``reward_hang``: the reward function hangs on some responses (those whose text hashes
  to 0 mod 32: a property of the input, so the reference run meets the same ones) and
  each is cut at ``reward.grading_timeout_s``.

Then, from ``ledger.jsonl``, ``metrics.jsonl``, the actors and the exported policy:
every step has exactly one line in each file; each (prompt, epoch) the reference run
scored, the chaos run scored exactly once (none lost, none twice, across the learner
restart too); the last step's weight version, and every actor's, is the number of
steps; and the final policy equals the reference's, tensor for tensor. It can, because
nothing a fault touches changes a number: a restarted rollout actor generates its share
again with the same weights and seed, a group whose reward actor died is graded again
by the same function, a killed grading is graded again, and the learner resumes from a
checkpoint that holds its optimizer state and data position.

Prints the faults with where they landed, the invariants, the overhead against the
reference, and one JSON line: ``{"benchmark": "chaos", "faults_injected",
"faults_survived", "prompts_lost", "prompts_scored_twice", "overhead_s"}``.
``tests/integration/test_chaos.py`` runs the same as a test.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import psutil
import ray
import torch
from safetensors.torch import load_file

from mapo_ray.config import Config, load_config
from mapo_ray.job import resolve_inputs, start_local_ray
from mapo_ray.loop import train
from mapo_ray.rollout.actor import create_rollout_actors
from mapo_ray.telemetry.ledger import LEDGER_FILE, read_ledger
from mapo_ray.telemetry.records import METRICS_FILE, read_metrics
from tests.integration import crashing_engine

FaultKind = Literal["rollout_kill", "rollout_crash_mid_sync", "reward_kill", "grader_kill", "learner_kill"]
# What a process of each kind that is killed from outside looks like: its command line.
_PROCESS_OF: dict[str, tuple[str, ...]] = {
    "rollout_kill": ("ray::RolloutActor",),
    "reward_kill": ("ray::RewardWorker",),
    "learner_kill": ("ray::RayTrainWorker",),
    "grader_kill": ("-c", "from mapo_ray.reward.sandbox import serve; serve()"),
}
PROMPTS = 4  # per step
STEP_S = 0.4  # about one step of this config on 2 idle cores: a kill's delay into its step is drawn below it


@dataclass(frozen=True)
class Fault:
    """One fault: ``step`` (the weight version, for a crash mid-sync) and, for a kill from
    outside, ``delay_s`` after the line of step ``step - 1``; ``target`` picks among the
    processes of its kind (modulo how many are alive)."""

    kind: FaultKind
    step: int
    delay_s: float = 0.0
    target: int = 0


@dataclass
class Landed:
    """A fault as it happened: the process it hit, when, and what the run was doing."""

    fault: Fault
    pid: int | None = None
    at_s: float = 0.0
    during: str = ""


def schedule(seed: int, steps: int) -> list[Fault]:
    """One fault of each kind, at moments drawn from ``seed``; the learner's mid-run, after a checkpoint."""
    rng = random.Random(seed)
    late = steps - 3  # a kill lands inside the run, before its last weight sync

    def delay() -> float:
        return rng.uniform(0.0, STEP_S)

    faults = [
        Fault("rollout_kill", rng.randint(3, late), delay(), rng.randrange(2)),
        Fault("rollout_crash_mid_sync", rng.randint(2, steps - 1), target=rng.randrange(2)),
        Fault("reward_kill", rng.randint(3, late), delay(), rng.randrange(2)),
        Fault("grader_kill", rng.randint(3, late), delay(), rng.randrange(2)),
        Fault("learner_kill", rng.randint(steps // 3 + 2, 2 * steps // 3 + 1), delay()),
    ]
    return sorted(faults, key=lambda f: (f.step, f.delay_s))


def chaos_config(steps: int, seed: int = 0) -> tuple[Config, Path]:
    """``cpu-tiny`` cut down to seconds per step, with room for the faults; its model folder."""
    cfg = load_config(
        preset="cpu-tiny",
        overrides=[
            f"seed={seed}",
            f"trainer.total_steps={steps}",
            f"trainer.prompts_per_step={PROMPTS}",
            "trainer.checkpoint_every=3",
            "trainer.keep_checkpoints=2",
            "trainer.eval_every=0",
            "trainer.max_failures=1",
            "rollout.num_actors=2",
            "rollout.group_size=2",
            "rollout.max_new_tokens=8",
            "rollout.max_restarts=2",
            # Imported by name in the grading processes, which start in this working directory.
            "reward.function=tests.integration.fault_rewards:spread_or_hang",
            "reward.grading_timeout_s=1.0",
            "sync.timeout_s=60",
            "sync.bucket_mb=0.0625",  # several buckets: a crash mid-load finds the sender mid-send
            "sft.steps=0",
            "data.synthetic_train=64",  # 20 steps of 4 prompts cross an epoch
            "data.synthetic_test=8",
        ],
    )
    return resolve_inputs(cfg)


class Injector(threading.Thread):
    """Fires the kills from outside as the run logs its steps: SIGKILL to a process of
    this cluster started after ``since`` (a descendant of this process, so other Ray
    clusters on the machine are never touched)."""

    def __init__(self, faults: list[Fault], run_dir: Path, since: float, give_up_s: float = 60.0) -> None:
        super().__init__(daemon=True)
        self.faults = [f for f in faults if f.kind in _PROCESS_OF]
        self.run_dir, self.since, self.give_up_s = run_dir, since, give_up_s
        self.landed: list[Landed] = []
        self.missed: list[Fault] = []
        self._halt = threading.Event()

    def run(self) -> None:
        for fault in self.faults:
            while not self._halt.is_set() and fault.step - 1 not in _steps(self.run_dir / METRICS_FILE):
                time.sleep(0.05)
            if self._halt.wait(fault.delay_s):
                return
            landed = self._kill(fault)
            if landed is None:
                self.missed.append(fault)
            else:
                self.landed.append(landed)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)

    def _kill(self, fault: Fault) -> Landed | None:
        deadline = time.monotonic() + self.give_up_s
        while not self._halt.is_set() and time.monotonic() < deadline:
            found = _processes(_PROCESS_OF[fault.kind], self.since)
            if found:
                proc = found[fault.target % len(found)]
                during = " ".join(_processes_doing(self.since))
                try:
                    proc.send_signal(signal.SIGKILL)
                except psutil.NoSuchProcess:
                    continue
                return Landed(fault, proc.pid, time.time() - self.since, during)
            time.sleep(0.2)  # none alive right now (e.g. the learner is restarting)
        return None


def _processes(prefix: tuple[str, ...], since: float) -> list[psutil.Process]:
    """This process's descendants started after ``since`` whose command line starts with ``prefix``
    (its first word only needs to start with ``prefix[0]``: Ray appends the method running)."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            cmd = proc.cmdline()
            if proc.create_time() < since or not cmd:
                continue
            if len(prefix) == 1 and cmd[0].startswith(prefix[0]) or len(prefix) > 1 and tuple(cmd[1:3]) == prefix:
                found.append(proc)
        except psutil.Error:  # gone meanwhile
            pass
    return sorted(found, key=lambda p: p.pid)


def _processes_doing(since: float) -> list[str]:
    """What the run's Ray workers are executing (Ray puts ``Class.method`` in the process title)."""
    titles = set()
    for proc in psutil.Process().children(recursive=True):
        try:
            cmd = proc.cmdline()
            if proc.create_time() >= since and cmd and "." in cmd[0] and cmd[0].startswith("ray::"):
                titles.add(cmd[0].removeprefix("ray::"))
        except psutil.Error:
            pass
    return sorted(titles)


def _steps(path: Path) -> list[int]:
    """The step of every line of ``path`` so far, in file order (tolerant of a torn last line)."""
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except (json.JSONDecodeError, KeyError):
            pass
    return steps


@dataclass
class Run:
    """One finished training run: its folder, wall time, error and the actors' last versions."""

    run_dir: Path
    seconds: float
    error: BaseException | None
    actor_versions: list[int | None]
    landed: list[Landed] = field(default_factory=list)
    missed: list[Fault] = field(default_factory=list)
    crashes: list[int] = field(default_factory=list)


def run_training(cfg: Config, model_path: Path, run_dir: Path, faults: Sequence[Fault] = ()) -> Run:
    """``mapo_ray.loop.train`` with fresh driver-owned rollout actors, under ``faults``."""
    markers = run_dir.parent / f"{run_dir.name}-crashes"
    crashes = {f.step: cfg.seed + f.target for f in faults if f.kind == "rollout_crash_mid_sync"}
    factory = functools.partial(crashing_engine.make, crashes=crashes, marker_dir=str(markers)) if crashes else None
    start = time.time()
    actors = create_rollout_actors(cfg.rollout, model_path, seed=cfg.seed, engine_factory=factory)
    injector = Injector(list(faults), run_dir, since=start)
    injector.start()
    try:
        result = train(cfg, run_dir=run_dir, model_path=model_path, rollout_actors=actors)
        error = result.error
        versions = ray.get([a.weight_version.remote() for a in actors.values()], timeout=120)
    except Exception as err:  # the run failed: a fault it did not survive
        error, versions = err, []
    finally:
        injector.stop()
        for actor in actors.values():
            ray.kill(actor)
    return Run(
        run_dir,
        time.time() - start,
        error,
        versions,
        injector.landed,
        injector.missed,
        crashing_engine.crashed_versions(markers) if crashes else [],
    )


@dataclass
class Verdict:
    """The invariants of a chaos run against its reference."""

    faults_injected: int
    faults_survived: int
    prompts_lost: int
    prompts_scored_twice: int
    steps_not_once: dict[str, list[int]]  # file -> steps without exactly one line
    final_versions: list[int | None]  # the last step's, then each actor's
    hung_gradings: tuple[int, int]  # reward/failed/timeout over the run: chaos, reference
    weights_differ: list[str]  # tensor names whose values differ from the reference's
    overhead_s: float


def verdict(chaos: Run, reference: Run, steps: int) -> Verdict:
    """Check ``chaos`` against ``reference`` (see the module docstring)."""
    lines = {name: Counter(_steps(chaos.run_dir / name)) for name in (METRICS_FILE, LEDGER_FILE)}
    not_once = {name: [s for s in range(1, steps + 1) if count[s] != 1] for name, count in lines.items()}
    scored = Counter(pair for pairs in read_ledger(chaos.run_dir / LEDGER_FILE).values() for pair in pairs)
    expected = Counter(pair for pairs in read_ledger(reference.run_dir / LEDGER_FILE).values() for pair in pairs)
    history = read_metrics(chaos.run_dir / METRICS_FILE).train
    last = history.get(steps, {}).get("weight_version")
    injected = len(chaos.landed) + len(chaos.crashes) + _hung(chaos)
    return Verdict(
        faults_injected=injected,
        faults_survived=injected if chaos.error is None else 0,
        prompts_lost=sum((expected - scored).values()),
        prompts_scored_twice=sum(n - 1 for n in scored.values() if n > 1),
        steps_not_once=not_once,
        final_versions=[None if last is None else int(last), *chaos.actor_versions],
        hung_gradings=(_hung(chaos), _hung(reference)),
        weights_differ=_differing_tensors(chaos.run_dir / "policy", reference.run_dir / "policy"),
        overhead_s=chaos.seconds - reference.seconds,
    )


def _hung(run: Run) -> int:
    """Gradings cut at their time limit over the whole run."""
    history = read_metrics(run.run_dir / METRICS_FILE).train
    return int(sum(m.get("reward/failed/timeout", 0) for m in history.values()))


def _differing_tensors(policy: Path, reference: Path) -> list[str]:
    if not (policy / "model.safetensors").exists():
        return ["<no exported policy>"]
    ours, theirs = load_file(policy / "model.safetensors"), load_file(reference / "model.safetensors")
    names = sorted(set(ours) | set(theirs))
    return [n for n in names if n not in ours or n not in theirs or not torch.equal(ours[n], theirs[n])]


def chaos_run(out: Path, seed: int, steps: int) -> tuple[Verdict, Run]:
    """The reference run, then the chaos run, in ``out``; Ray must be initialised."""
    cfg, model_path = chaos_config(steps, seed)
    reference = run_training(cfg, model_path, out / "reference")
    if reference.error is not None:
        raise RuntimeError(f"the reference run failed: {reference.error}") from reference.error
    chaos = run_training(cfg, model_path, out / "chaos", schedule(seed, steps))
    return verdict(chaos, reference, steps), chaos


def report(result: Verdict, chaos: Run) -> str:
    """The table of faults and invariants, and the JSON line last."""
    rows = ["| fault | step | delay s | landed at s | pid | workers busy then |", "|---|---|---|---|---|---|"]
    for landed in chaos.landed:
        f = landed.fault
        rows.append(f"| {f.kind} | {f.step} | {f.delay_s:.2f} | {landed.at_s:.1f} | {landed.pid} | {landed.during} |")
    rows += [f"| rollout_crash_mid_sync | v{v} | - | - | - | loading the update |" for v in chaos.crashes]
    rows.append(f"| reward_hang | - | - | - | - | {result.hung_gradings[0]} gradings cut at the limit |")
    rows += [f"| {f.kind} (missed: no such process) | {f.step} | {f.delay_s:.2f} | - | - | - |" for f in chaos.missed]
    checks = [
        "",
        "| invariant | value |",
        "|---|---|",
        f"| faults injected / survived | {result.faults_injected} / {result.faults_survived} |",
        f"| prompts lost / scored twice | {result.prompts_lost} / {result.prompts_scored_twice} |",
        f"| steps without exactly one line | {result.steps_not_once} |",
        f"| final weight versions (last step, actors) | {result.final_versions} |",
        f"| hung gradings (chaos, reference) | {result.hung_gradings} |",
        f"| tensors unlike the reference's | {len(result.weights_differ)} |",
        f"| overhead against the reference | {result.overhead_s:.1f} s |",
        f"| run error | {chaos.error!r} |",
    ]
    line = {
        "benchmark": "chaos",
        "faults_injected": result.faults_injected,
        "faults_survived": result.faults_survived,
        "prompts_lost": result.prompts_lost,
        "prompts_scored_twice": result.prompts_scored_twice,
        "overhead_s": round(result.overhead_s, 1),
    }
    return "\n".join(rows + checks + ["", json.dumps(line)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("runs/chaos"))
    args = parser.parse_args()
    if args.steps < 8:
        parser.error("--steps must be at least 8, to fit the schedule")
    out = args.out / f"seed{args.seed}"
    if out.exists():
        parser.error(f"{out} exists; pick another --out")
    start_local_ray(include_dashboard=False, configure_logging=False, log_to_driver=True)
    try:
        result, chaos = chaos_run(out, args.seed, args.steps)
    finally:
        ray.shutdown()
    print(report(result, chaos), flush=True)


if __name__ == "__main__":
    main()
