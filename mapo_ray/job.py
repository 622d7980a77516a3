"""What every training job script does before and after ``mapo_ray.loop.train``.

Kept here so that ``jobs/train_geo3k.py`` and ``jobs/train_emoset.py`` read top to
bottom as recipes: arguments, Ray, config, data and model, actors, train, summary.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import ray
import torch
from ray._private import ray_constants
from ray._private.worker import RayContext

from mapo_ray.algo import ADVANTAGE_ESTIMATORS, KL_ESTIMATORS, POLICY_LOSSES, ROLLOUT_CORRECTIONS
from mapo_ray.config import TINY_VL, Config, ConfigError, load_config
from mapo_ray.data import DataError
from mapo_ray.data.pipeline import open_split
from mapo_ray.data.synthetic import check_kinds, write_task
from mapo_ray.models.tiny import cache_dir, tiny_vl_path
from mapo_ray.reward.functions import check_reward_function
from mapo_ray.telemetry.ledger import LEDGER_FILE
from mapo_ray.telemetry.records import METRICS_FILE, read_metrics

SYNTHETIC = "synthetic"
# Set by Ray in a submitted job's driver: the job's runtime_env and metadata, as JSON.
RAY_JOB_CONFIG = "RAY_JOB_CONFIG_JSON_ENV_VAR"
# What a machine without GPUs runs by default; with GPUs the job needs a preset or config.
CPU_PRESET = "cpu-tiny"
LOOPBACK = "127.0.0.1"
# The exit status of a command stopped by Ctrl-C, as shells report it (128 + SIGINT).
INTERRUPTED = 130


def job_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", type=Path, help="YAML config file (applied over the preset)")
    parser.add_argument("--preset", help=f"named preset (default: {CPU_PRESET} on a cluster without GPUs)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="dotted override, repeatable"
    )
    parser.add_argument(
        "--resume",
        help="'auto': continue from the newest checkpoint in --output; or a checkpoint folder to start from "
        "(one of --output's own goes back to it: the later steps are done again)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        help="run folder (default: runs/<preset>-<time>; ~/mapo-ray/runs/<preset>-<time> in a job submitted with --working-dir)",
    )
    return parser


@dataclasses.dataclass(frozen=True)
class JobInputs:
    """What a job command asks for, checked (``preflight``)."""

    config: Config
    preset: str | None
    run_dir: Path
    model_path: Path
    resume_from: Path | None  # a checkpoint folder; None for a fresh run or --resume auto


def preflight(args: argparse.Namespace, default_preset: str | None = None) -> JobInputs:
    """Check everything the command names before the run starts: the config (keys, values,
    batch arithmetic, the names of ``check_names``), the data sources (files and columns),
    the model, the resume folder and the run folder. Ray is started only when the preset
    depends on the cluster's GPUs (no --preset or --config, no default, and a cluster
    address in RAY_ADDRESS).

    Raises SystemExit with the problem, naming the key, file or folder.
    """
    try:
        preset = job_preset(args, default_preset)
        config = check_names(load_config(args.config, preset=preset, overrides=args.overrides))
        config, model_path = resolve_inputs(config)
        for split in ("train", "test"):
            open_split(config.data, split)
    except (ConfigError, DataError) as error:
        raise SystemExit(f"error: {error}") from None
    resume_from = None
    if args.resume not in (None, "auto"):
        resume_from = Path(args.resume)
        if not resume_from.is_dir():
            raise SystemExit(f"error: --resume {args.resume}: no such checkpoint folder")
    return JobInputs(config, preset, run_folder(args.output, preset, args.resume), model_path, resume_from)


def check_names(config: Config) -> Config:
    """``config``, once the names it gives for things defined outside ``mapo_ray.config``
    are known: ``algo.estimator``, ``algo.policy_loss``, ``algo.kl_estimator`` and
    ``algo.rollout_correction`` in ``mapo_ray.algo``'s registries, ``reward.function`` among
    the graders (or a ``pkg.module:function`` path), ``data.synthetic_kinds`` among the
    synthetic task's kinds.

    ``load_config`` checks only the schema (``mapo_ray.config`` imports none of the packages
    that read it), so whoever loads a config to run it calls this next.

    Raises ConfigError naming the key, the unknown name and the known ones.
    """
    algo = config.algo
    try:
        ADVANTAGE_ESTIMATORS.check(algo.estimator, key="algo.estimator")
        POLICY_LOSSES.check(algo.policy_loss, key="algo.policy_loss")
        KL_ESTIMATORS.check(algo.kl_estimator, key="algo.kl_estimator")
        if algo.rollout_correction not in ("auto", "none"):
            ROLLOUT_CORRECTIONS.check(algo.rollout_correction, key="algo.rollout_correction")
        if config.data.synthetic_kinds is not None:
            try:
                check_kinds(config.data.synthetic_kinds)
            except ValueError as err:
                raise ValueError(f"data.synthetic_kinds: {err}") from err
        check_reward_function(config.reward.function)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    return config


def job_preset(args: argparse.Namespace, default_preset: str | None = None) -> str | None:
    """--preset; with neither --preset nor --config, ``default_preset``, else ``cpu-tiny``
    where the cluster has no GPU (this machine's, for the local cluster the job starts)."""
    if args.preset is not None or args.config is not None:
        return args.preset
    if default_preset is not None:
        return default_preset
    if os.environ.get("RAY_ADDRESS"):
        connect_ray()
        gpus = ray.cluster_resources().get("GPU", 0)
    else:
        gpus = torch.cuda.device_count()
    return None if gpus else CPU_PRESET


def connect_ray() -> None:
    """Join the cluster this job runs in (``ray job submit`` sets RAY_ADDRESS), else start a
    new local one (``start_local_ray``)."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address="auto")
        return
    # Ray's own INFO line on starting says less than the dashboard line below.
    context = start_local_ray(logging_level=logging.WARNING)
    if context.dashboard_url:
        print(f"Ray dashboard: http://{context.dashboard_url} ({dashboard_login()})", flush=True)


def start_local_ray(**init_kwargs: Any) -> RayContext:
    """Start a new local Ray cluster, never one that an earlier ``ray start`` left behind on
    this machine, whose every server (GCS, raylet and object manager, workers, dashboard and
    its agents) listens on 127.0.0.1 only, with Ray's token authentication on unless
    RAY_AUTH_MODE=disabled (the token: RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH, else
    ~/.ray/auth_token, which Ray writes when there is none). ``init_kwargs`` go to ``ray.init``.
    """
    # Ray binds its servers to loopback only when the node's IP is 127.0.0.1, and on Linux it
    # keeps that IP (rather than the machine's address) only in its single-machine mode, its
    # default on macOS and Windows, which it reads from RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once,
    # at import: set the flag it read.
    ray_constants.ENABLE_RAY_CLUSTER = False
    # For the cluster's processes (they inherit this environment). One machine has no other node
    # to be preempted, so Ray Train's preemption watcher has nothing to watch; and progress bars
    # of model loads and saves would reach the console as one line each.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # RAY_AUTH_MODE stays as given: unset, Ray turns token mode on for this process and the
    # cluster's (setting it here, after ray's import, would reach only the cluster's).
    return ray.init(address="local", _node_ip_address=LOOPBACK, **init_kwargs)


def dashboard_login(environ: Mapping[str, str] = os.environ) -> str:
    """How to log in to the dashboard of a cluster that ``start_local_ray`` started (never the token)."""
    if environ.get("RAY_AUTH_MODE", "token").lower() != "token":
        return f"RAY_AUTH_MODE={environ['RAY_AUTH_MODE']}: no token asked"
    if environ.get("RAY_AUTH_TOKEN"):
        return "its token is in RAY_AUTH_TOKEN"
    return f"its token is in {environ.get('RAY_AUTH_TOKEN_PATH') or Path.home() / '.ray' / 'auth_token'}"


@contextlib.contextmanager
def stop_on_startup_interrupt() -> Iterator[None]:
    """Around a job's start-up and ``mapo_ray.loop.train``: a Ctrl-C before training
    starts (KeyboardInterrupt: checking the inputs, downloading the model, starting Ray
    or the actors, loading the model in the learners) stops the job at once, with Ray's
    processes and actors of this job, and exit status 130. Once training runs, Ray
    Train's own handler aborts the run instead."""
    try:
        yield
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C) during start-up: the job stops before training", file=sys.stderr, flush=True)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C would cut the clean-up short
        # A local cluster that connect_ray started goes with it; on a cluster, the job's actors.
        ray.shutdown()
        raise SystemExit(INTERRUPTED) from None


def in_working_dir_copy(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this is a job that ``ray job submit --working-dir`` started: its working
    directory is then Ray's temporary copy, deleted with the cluster."""
    job = json.loads(environ.get(RAY_JOB_CONFIG) or "{}")
    return bool((job.get("runtime_env") or {}).get("working_dir"))


def runs_root(environ: Mapping[str, str] = os.environ) -> Path:
    """Where run folders go without --output: ``runs/`` here, or ``~/mapo-ray/runs`` in
    Ray's temporary copy of a working directory."""
    return Path.home() / "mapo-ray" / "runs" if in_working_dir_copy(environ) else Path("runs")


def run_folder(output: Path | None, preset: str | None, resume: str | None) -> Path:
    """The run folder; a run with a checkpoint there needs ``--resume auto``, or
    ``--resume`` with one of its own checkpoint folders (never overwritten silently). A
    folder whose run failed before its first checkpoint (Ray Train has left only its
    storage marker) is used again, as a fresh run."""
    if output is not None and not output.is_absolute() and in_working_dir_copy():
        print(f"warning: --output {output} is inside Ray's temporary copy of the working directory, "
              "deleted with the cluster; give an absolute path on lasting storage", flush=True)
    folder = output or runs_root() / f"{preset or 'run'}-{time.strftime('%Y%m%d-%H%M%S')}"
    checkpoints = folder / "checkpoints"
    if any(p.is_dir() for p in checkpoints.glob("checkpoint_*")) and resume != "auto":
        if resume is None:
            raise SystemExit(
                f"{folder} already holds a run: pass --resume auto to continue it, --resume with one of "
                f"its checkpoint folders to go back to it, or another --output"
            )
        if Path(resume).resolve().parent != checkpoints.resolve():
            raise SystemExit(
                f"{folder} already holds a run, and --resume {resume} is not one of its checkpoint folders "
                f"(in {checkpoints}): pass another --output to start from it"
            )
    folder.mkdir(parents=True, exist_ok=True)
    return folder.resolve()


def resolve_inputs(config: Config) -> tuple[Config, Path]:
    """Write the synthetic task if the config asks for it, and find the model folder."""
    data = config.data
    if SYNTHETIC in (data.train, data.test):
        name = f"synthetic-s{config.seed}-{data.synthetic_train}x{data.synthetic_test}"
        if data.synthetic_kinds is not None:
            name += "-" + "-".join(data.synthetic_kinds)
        folder = cache_dir().parent / "data" / name
        train, test = folder / "train.parquet", folder / "test.parquet"
        if not (train.exists() and test.exists()):
            print(f"writing the synthetic task to {folder}", flush=True)
            write_task(folder, data.synthetic_train, data.synthetic_test, config.seed, data.synthetic_kinds)
        data = dataclasses.replace(
            data,
            train=str(train) if data.train == SYNTHETIC else data.train,
            test=str(test) if data.test == SYNTHETIC else data.test,
        )
    model = config.trainer.model
    model_path = tiny_vl_path() if model == TINY_VL else Path(model)
    if model != TINY_VL and not model_path.exists():
        from huggingface_hub import snapshot_download

        model_path = Path(snapshot_download(model))
    return dataclasses.replace(config, data=data), model_path


def summarize(run_dir: Path, wall_s: float) -> str:
    """The closing summary: time split, first and last step, evaluation, where outputs are."""
    history = read_metrics(run_dir / METRICS_FILE)
    steps = [history.train[s] for s in sorted(history.train)]

    def value(m: dict[str, float | None], key: str) -> float:
        v = m.get(key)
        return float("nan") if v is None else v

    lines = [f"run folder: {run_dir}", f"wall time: {wall_s:.0f} s"]
    if steps:
        total = sum(value(m, "time/step_s") for m in steps)
        split = []
        for phase in ("generate", "reward", "learner", "sync"):
            seconds = sum(value(m, f"time/{phase}_s") for m in steps)
            split.append(f"{phase} {seconds:.0f} s ({100 * seconds / total:.0f}%)")
        lines.append(f"{len(steps)} steps, {total:.0f} s in steps: " + ", ".join(split))
        first, last = min(history.train), max(history.train)
        for name, step, m in (("first step", first, steps[0]), ("last step", last, steps[-1])):
            lines.append(
                f"{name} {step}: reward {value(m, 'reward/mean'):.3f}, "
                f"accuracy {value(m, 'reward/accuracy'):.3f}, format {value(m, 'reward/format'):.3f}"
            )
    if history.evals:
        last = max(history.evals)
        lines.append(f"evaluation at step {last}: accuracy {value(history.evals[last], 'eval/accuracy'):.3f}")
    lines += [
        f"metrics: {run_dir / METRICS_FILE} (TensorBoard: tensorboard --logdir {run_dir})",
        f"prompt ledger (the prompts each step scored): {run_dir / LEDGER_FILE}",
        f"plots: {run_dir / 'curves.png'}, {run_dir / 'certainty.png'}",
        f"checkpoints: {run_dir / 'checkpoints'}",
        f"final policy (Hugging Face format): {run_dir / 'policy'}",
    ]
    return "\n".join(lines)
