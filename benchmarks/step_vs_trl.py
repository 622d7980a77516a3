"""Seconds per optimizer step: mapo-ray (on-policy and async) against TRL's GRPOTrainer, on CPU.

    python benchmarks/step_vs_trl.py [--rounds 3] [--steps 8] [--warmup 2] [--prompts 16]
                                     [--group 4] [--max-new-tokens 48] [--trl-threads 1]
                                     [--output DIR]

Each round runs three jobs one after the other, each in its own process: TRL's
``GRPOTrainer``, then ``jobs/train_geo3k.py`` with ``trainer.mode=on_policy``, then
with ``trainer.mode=async`` (``max_staleness`` 1). Rounds alternate the three so that
a busy machine slows all of them alike; the table reports medians over rounds.

Both sides train the tiny Qwen2.5-VL of ``mapo_ray.models`` (TRL through the image
path of the stock ``Qwen2_5_VLProcessor``, see ``ImageOnlyQwen2_5_VLProcessor``) on
the train split of the synthetic task, with images decoded and resized by
``mapo_ray.data.images``, prompts rendered by ``mapo_ray.data.prompts``, and the
reward of ``mapo_ray.reward.math.score_math``. Both take their settings from one
``cpu-tiny`` config with the overrides below: B prompts x G responses per step, one
optimizer step per batch (``learner.updates_per_step=1``, TRL
``steps_per_generation=1``), the same response length, temperature and top-p, lr,
weight decay, gradient clip, clip ratios, no KL term and no warm-start. GRPO
advantages on both (``algo.estimator=grpo``; TRL ``scale_rewards="group"``), token-mean
loss (TRL ``loss_type="dapo"``), no gradient checkpointing, a constant lr.

Seconds per optimizer step are wall-clock seconds between the end of step ``warmup``
and the end of the last step, over the steps in between: TRL's from a
``TrainerCallback``'s ``on_step_end``, mapo-ray's from the ``time`` of each line of
``metrics.jsonl``. Start-up (Ray, Ray Train, model loading, the first steps) is left
out of both. CPU seconds per step are the user + system time of each run's whole
process tree (for mapo-ray: the job, Ray's daemons, its workers and the grading child
processes) over the same steps, read by the driver as each step end appears: on a
machine that others share, they move less than wall time.

What differs by design: mapo-ray runs its rollout actor and its learner as separate
processes (Ray gives each of its ``cpu-tiny`` CPU shares one torch thread) and grades
in a sandboxed reward actor; TRL runs generation, grading and training one after the
other in one process, with ``--trl-threads`` torch threads (default 1: on a shared
two-core machine two OpenMP threads made TRL's steps slower and erratic, so the
baseline gets its faster setting; 0 keeps torch's default). TRL also runs the vision
tower on each of the B x G copies of the prompts, where mapo-ray's rollout runs it
once per prompt and its learner once per distinct image.

Needs TRL, from the ``dev`` extra (``pip install -c constraints/cpu.txt -e ".[dev]"``).
Prints a table and ends with one JSON line (``ours_s``: mapo-ray async, ``baseline_s``:
TRL, both median wall seconds per optimizer step).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIDES = ("trl", "on_policy", "async")
LABELS = {
    "trl": "TRL GRPOTrainer (baseline)",
    "on_policy": "mapo-ray on-policy",
    "async": "mapo-ray async, staleness 1 (ours)",
}
# A run that takes longer than this is stuck, not slow.
RUN_TIMEOUT_S = 1800
# How often the driver looks for new step ends (and then reads the runs' CPU time).
POLL_S = 0.2


def overrides(args: argparse.Namespace, steps: int) -> list[str]:
    """The ``cpu-tiny`` overrides both sides read their settings from."""
    return [
        f"trainer.total_steps={steps}",
        f"trainer.prompts_per_step={args.prompts}",
        f"rollout.group_size={args.group}",
        f"rollout.max_new_tokens={args.max_new_tokens}",
        "rollout.temperature=1.0",
        "rollout.top_p=1.0",
        "learner.updates_per_step=1",
        "learner.ppo_epochs=1",
        "learner.lr_warmup_steps=0",
        "algo.estimator=grpo",
        "algo.kl_coef=0.0",
        "algo.loss_agg_mode=token-mean",
        "sft.steps=0",
        "trainer.eval_every=0",
        # One checkpoint, after the last step: outside the timed steps.
        f"trainer.checkpoint_every={steps}",
    ]


def load(args: argparse.Namespace, steps: int):
    """The shared config, with the synthetic task written and the model folder found."""
    from mapo_ray.config import load_config
    from mapo_ray.job import resolve_inputs

    return resolve_inputs(load_config(preset="cpu-tiny", overrides=overrides(args, steps)))


def per_step(marks: dict[int, tuple[float, float]], warmup: int) -> tuple[float, float]:
    """Wall and CPU seconds per step from ``{step: (wall, cpu)}`` at step ends, after step ``warmup``."""
    last = max(marks, default=0)
    if warmup not in marks or last <= warmup:
        raise RuntimeError(f"need step ends after step {warmup}; got steps {sorted(marks)}")
    (wall_0, cpu_0), (wall_1, cpu_1) = marks[warmup], marks[last]
    return (wall_1 - wall_0) / (last - warmup), (cpu_1 - cpu_0) / (last - warmup)


# ------------------------------------------------------------------------- TRL side


def run_trl(args: argparse.Namespace, out: Path) -> None:
    """Train with TRL's GRPOTrainer in this process; append each step's end to ``out`` (JSON lines)."""
    import pyarrow.parquet as pq
    import torch
    from datasets import Dataset
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer, TrainerCallback
    from transformers import Qwen2_5_VLProcessor
    from trl import GRPOConfig, GRPOTrainer

    from mapo_ray.data.images import load_image
    from mapo_ray.data.pipeline import pixel_budget
    from mapo_ray.data.prompts import chat_messages
    from mapo_ray.reward.math import score_math

    class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
        """The stock processor without its video processor, which imports torchvision (it
        does not load beside the CPU torch build); the image path is the stock one."""

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    class StepEnds(TrainerCallback):
        """Appends ``{"step", "time"}`` to ``out`` at the end of each optimizer step."""

        def on_step_end(self, args, state, control, **kwargs):
            with out.open("a") as handle:
                handle.write(json.dumps({"step": state.global_step, "time": time.time()}) + "\n")

    steps = args.warmup + args.steps
    config, model_path = load(args, steps)
    budget = pixel_budget(config.data)
    rows = pq.read_table(config.data.train).to_pylist()
    dataset = Dataset.from_list(
        [
            {
                "prompt": chat_messages(row["problem"]),
                "images": [Image.fromarray(load_image(cell, budget)) for cell in row["images"]],
                "answer": row["answer"],
            }
            for row in rows
        ]
    )
    reward_cfg = config.reward

    def reward(prompts, completions, answer, **kwargs) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        weights = dict(accuracy_weight=reward_cfg.accuracy_weight, format_weight=reward_cfg.format_weight)
        return [score_math(text, gold, **weights)["overall"] for text, gold in zip(texts, answer)]

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    processor = ImageOnlyQwen2_5_VLProcessor(
        AutoImageProcessor.from_pretrained(model_path), tokenizer, chat_template=tokenizer.chat_template
    )
    from mapo_ray.algo import policy_loss_settings

    rollout, learner, algo, trainer = config.rollout, config.learner, config.algo, config.trainer
    # The clip ratios mapo-ray trains with (algo.clip_ratio_* null: the policy loss's own).
    clips = policy_loss_settings(algo)
    grpo = GRPOConfig(
        output_dir=str(out.parent / "trl-output"),
        use_cpu=True,
        bf16=False,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=config.seed,
        max_steps=steps,
        # One generation of B x G responses feeds exactly one optimizer step.
        per_device_train_batch_size=trainer.prompts_per_step * rollout.group_size,
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        num_iterations=learner.ppo_epochs,
        num_generations=rollout.group_size,
        max_completion_length=rollout.max_new_tokens,
        temperature=rollout.temperature,
        top_p=rollout.top_p,
        top_k=0,
        learning_rate=learner.lr,
        lr_scheduler_type="constant",
        weight_decay=learner.weight_decay,
        max_grad_norm=learner.grad_clip,
        gradient_checkpointing=learner.gradient_checkpointing,
        beta=algo.kl_coef,
        epsilon=clips.clip_low,
        epsilon_high=clips.clip_high,
        scale_rewards="group",
        loss_type="dapo",
        use_vllm=False,
        dataloader_num_workers=0,
    )
    model = AutoModelForImageTextToText.from_pretrained(model_path, dtype=torch.float32)
    GRPOTrainer(
        model=model,
        reward_funcs=reward,
        args=grpo,
        train_dataset=dataset,
        processing_class=processor,
        callbacks=[StepEnds()],
    ).train()


# ------------------------------------------------------------------------- mapo-ray side


def mapo_command(args: argparse.Namespace, mode: str, run_dir: Path) -> list[str]:
    steps = args.warmup + args.steps
    sets = overrides(args, steps) + [f"trainer.mode={mode}", "trainer.max_staleness=1"]
    command = [sys.executable, str(ROOT / "jobs" / "train_geo3k.py"), "--preset", "cpu-tiny", "--output", str(run_dir)]
    for item in sets:
        command += ["--set", item]
    return command


def step_ends(path: Path) -> dict[int, float]:
    """``{step: time}`` of the training lines of a JSON-lines file so far (mapo-ray's
    ``metrics.jsonl``, or what ``run_trl`` writes); a line still being written is skipped."""
    ends = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not any(key.startswith("eval/") for key in record):
                ends[record["step"]] = record["time"]
    return ends


# ------------------------------------------------------------------------- driver


def tree_cpu_seconds(root) -> float:
    """User + system CPU seconds of ``root`` (a ``psutil.Process``) and all its descendants,
    reaped children included: Ray's daemons and workers descend from the job's process."""
    import psutil

    total = 0.0
    for process in [root, *root.children(recursive=True)]:
        try:
            t = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


def run(command: list[str], log: Path, steps_file: Path, extra_env: dict[str, str] | None = None):
    """Run ``command``; at each step end that appears in ``steps_file``, note ``(wall time of
    the step end, CPU seconds of the process tree)``. Returns ``{step: (wall, cpu)}``."""
    import psutil

    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path, **(extra_env or {}))
    marks: dict[int, tuple[float, float]] = {}
    deadline = time.monotonic() + RUN_TIMEOUT_S
    with log.open("w") as handle:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)
        root = psutil.Process(process.pid)
        while process.poll() is None:
            if time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"{' '.join(command[:3])} ... did not finish in {RUN_TIMEOUT_S} s; see {log}")
            new = {step: t for step, t in step_ends(steps_file).items() if step not in marks}
            if new:
                cpu = tree_cpu_seconds(root)
                marks.update({step: (t, cpu) for step, t in new.items()})
            time.sleep(POLL_S)
    if process.returncode:
        tail = log.read_text()[-3000:]
        what = " ".join(command[:3])
        raise RuntimeError(f"{what} ... failed with exit code {process.returncode}; see {log}:\n{tail}")
    return marks


def one_round(args: argparse.Namespace, index: int, folder: Path) -> dict[str, tuple[float, float]]:
    """``{side: (wall s/step, CPU s/step)}`` of one run of each side, in ``SIDES`` order."""
    result = {}
    for side in SIDES:
        here = folder / f"round{index}-{side}"
        here.mkdir(parents=True)
        started = time.perf_counter()
        if side == "trl":
            steps_file = here / "steps.jsonl"
            command = [sys.executable, __file__, "--side", "trl", "--side-out", str(steps_file)] + side_args(args)
            threads = {"OMP_NUM_THREADS": str(args.trl_threads)} if args.trl_threads else {}
            marks = run(command, here / "log.txt", steps_file, threads)
        else:
            marks = run(mapo_command(args, side, here / "run"), here / "log.txt", here / "run" / "metrics.jsonl")
        result[side] = per_step(marks, args.warmup)
        wall, cpu = result[side]
        print(
            f"round {index}: {LABELS[side]:<36} {wall:7.3f} s/step, {cpu:7.3f} CPU s/step  "
            f"(run {time.perf_counter() - started:.0f} s, load average {os.getloadavg()[0]:.1f})",
            flush=True,
        )
    return result


def side_args(args: argparse.Namespace) -> list[str]:
    return [
        f"--steps={args.steps}",
        f"--warmup={args.warmup}",
        f"--prompts={args.prompts}",
        f"--group={args.group}",
        f"--max-new-tokens={args.max_new_tokens}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds of TRL, on-policy, async (medians over them)")
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="steps per run left out before timing")
    parser.add_argument("--prompts", type=int, default=16, help="prompts per step (B)")
    parser.add_argument("--group", type=int, default=4, help="responses per prompt (G)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--trl-threads", type=int, default=1, help="torch threads of TRL (0: torch's default)")
    parser.add_argument("--output", type=Path, help="folder for the runs (default: a temporary folder)")
    parser.add_argument("--side", choices=("trl",), help=argparse.SUPPRESS)
    parser.add_argument("--side-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if min(args.rounds, args.steps, args.warmup) < 1:
        parser.error("--rounds, --steps and --warmup must be at least 1")
    if args.trl_threads < 0:
        parser.error("--trl-threads must be >= 0")

    if args.side == "trl":
        run_trl(args, args.side_out)
        return
    try:
        import trl
    except ImportError:
        sys.exit('step_vs_trl: TRL is not installed; pip install -c constraints/cpu.txt -e ".[dev]"')

    folder = args.output or Path(tempfile.mkdtemp(prefix="step-vs-trl-"))
    folder.mkdir(parents=True, exist_ok=True)
    config, model_path = load(args, args.warmup + args.steps)
    print(
        f"trl {trl.__version__}; policy: {model_path.name}; task: {config.data.train}\n"
        f"B={args.prompts} prompts x G={args.group}, {args.max_new_tokens} new tokens, one optimizer step per batch; "
        f"{args.warmup} warm-up + {args.steps} timed steps per run, {args.rounds} rounds; "
        f"TRL threads: {args.trl_threads or 'torch default'}; runs in {folder}",
        flush=True,
    )
    rounds = [one_round(args, i, folder) for i in range(1, args.rounds + 1)]
    median = {side: statistics.median(r[side][0] for r in rounds) for side in SIDES}
    cpu = {side: statistics.median(r[side][1] for r in rounds) for side in SIDES}

    print()
    print(f"{'trainer':<38} {'s / step':>9} {'x TRL':>7} {'CPU s / step':>13} {'x TRL':>7}   s / step per round")
    for side in SIDES:
        per_round = " ".join(f"{r[side][0]:.2f}" for r in rounds)
        print(
            f"{LABELS[side]:<38} {median[side]:>9.3f} {median[side] / median['trl']:>7.2f} "
            f"{cpu[side]:>13.3f} {cpu[side] / cpu['trl']:>7.2f}   {per_round}"
        )
    ours, baseline = median["async"], median["trl"]
    print(json.dumps({"benchmark": "step_vs_trl", "ours_s": ours, "baseline_s": baseline, "speedup": baseline / ours}))


if __name__ == "__main__":
    main()
