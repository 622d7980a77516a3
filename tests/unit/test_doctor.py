"""mapo_ray.doctor: each check's decision on made-up readings, the two-process all-reduce
(over gloo, as NCCL needs GPUs), the per-node path on a real local Ray cluster, and the
CLI's exit codes and JSON for the CPU and the 8-GPU presets."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mapo_ray import doctor
from mapo_ray.config import load_config
from mapo_ray.doctor import FAIL, NA, OK, WARN, Check

ROOT = Path(__file__).resolve().parents[2]
GIB = 2**30


def needs(preset: str, *overrides: str, cluster_has_gpus: bool = False) -> doctor.Needs:
    return doctor.needs_of(load_config(preset=preset, overrides=overrides), cluster_has_gpus)


# ---------------------------------------------------------------- what a preset needs


def test_needs_of_the_presets():
    tiny = needs("cpu-tiny")
    assert (tiny.gpus, tiny.uses_cuda, tiny.engine, tiny.precision, tiny.hub_needed) == (0, False, "hf", "fp32", False)
    big = needs("geo3k-qwen25vl-7b")
    assert (big.gpus, big.engine, big.precision, big.hub_needed) == (8, "vllm", "bf16", True)
    one = needs("geo3k-qwen25vl-3b-1gpu")
    assert one.gpus == 1.0 and (one.gpus_per_learner, one.gpus_per_actor) == (0.5, 0.5)


def test_use_gpu_unset_follows_the_cluster():
    assert needs("cpu-tiny", "trainer.use_gpu=null").gpus_per_learner == 0
    assert needs("cpu-tiny", "trainer.use_gpu=null", cluster_has_gpus=True).gpus_per_learner == 1.0


# ---------------------------------------------------------------- 1. versions


def test_pins_and_releases():
    pins = doctor.parse_pins("# header\ntorch==2.13.0\nhuggingface_hub==2.4.0  # note\nnot a pin\n")
    assert pins == {"torch": "2.13.0", "huggingface-hub": "2.4.0"}
    assert doctor.same_release("2.13.0+cpu", "2.13.0")
    assert not doctor.same_release("2.14.0", "2.13.0")
    assert doctor.read_pins(doctor.CPU_PINS)["torch"] == "2.13.0"
    assert doctor.pinned_cuda(doctor.read_pins(doctor.GPU_PINS)) == "13.0"


def test_python_version():
    assert doctor.check_python((3, 11, 7)).status == OK
    assert doctor.check_python((3, 12, 1)).status == WARN
    assert doctor.check_python((3, 10, 14)).status == FAIL


def test_package_versions():
    cpu, gpu = {"torch": "2.13.0"}, {"torch": "2.14.0"}
    assert doctor.check_version("torch", "2.13.0+cpu", cpu, "cpu.txt", gpu).status == OK
    # A CPU preset runs on the GPU image too.
    assert doctor.check_version("torch", "2.14.0", cpu, "cpu.txt", gpu).status == OK
    wrong = doctor.check_version("torch", "2.13.0+cpu", gpu, "gpu.txt", None)
    assert wrong.status == FAIL and "2.14.0" in wrong.detail and "constraints/gpu.txt" in wrong.fix
    assert doctor.check_version("torch", None, cpu, "cpu.txt", None).status == FAIL
    absent = doctor.check_version("torch", "2.13.0", None, "cpu.txt", None)
    assert absent.status == WARN and "constraints/ not found" in absent.detail


# ---------------------------------------------------------------- 2. CUDA and driver


def test_cuda_and_driver():
    check = doctor.check_cuda
    assert check(False, 0, None, None, "13.0").status == NA
    assert check(False, 2, "13.0", ["580.65.06"] * 2, "13.0").status == OK
    assert check(True, 0, None, None, "13.0").status == FAIL
    cpu_build = check(True, 0, None, ["580.65.06"], "13.0")
    assert cpu_build.status == FAIL and "CPU build" in cpu_build.detail
    assert check(True, 8, "12.8", ["580.65.06"], "13.0").status == FAIL
    old = check(True, 8, "13.0", ["570.86.10"], "13.0")
    assert old.status == FAIL and ">= 580" in old.detail
    assert check(True, 8, "13.0", ["580.65.06"], "13.0").status == OK
    hidden = check(True, 0, "13.0", ["580.65.06"], "13.0")
    assert hidden.status == FAIL and "CUDA_VISIBLE_DEVICES" in hidden.fix


# ---------------------------------------------------------------- 3. GPUs and placement


def test_gpu_placement():
    big = needs("geo3k-qwen25vl-7b")
    assert doctor.check_gpus(big, {"a": 8}, "the cluster").status == OK
    assert doctor.check_gpus(big, {"a": 4, "b": 4}, "the cluster").status == OK
    short = doctor.check_gpus(big, {"local": 0}, "this machine")
    assert short.status == FAIL and "4 x learner (1 GPU), 4 x rollout actor (1 GPU)" in short.detail
    # Two halves share one GPU; a tensor-parallel actor's GPUs must be on one node.
    assert doctor.check_gpus(needs("geo3k-qwen25vl-3b-1gpu"), {"local": 1}, "this machine").status == OK
    tp = needs("geo3k-qwen25vl-7b", "trainer.num_learners=1", "rollout.num_actors=1", "rollout.tensor_parallel_size=2")
    assert doctor.check_gpus(tp, {"a": 2, "b": 1}, "the cluster").status == OK
    split = doctor.check_gpus(tp, {"a": 1, "b": 1, "c": 1}, "the cluster")
    assert split.status == FAIL and "rollout actor (2 GPU)" in split.detail
    assert doctor.check_gpus(needs("cpu-tiny"), {"local": 0}, "this machine").status == NA


# ---------------------------------------------------------------- 4. /dev/shm


def test_object_store_mirrors_ray(monkeypatch):
    import ray._private.ray_constants as ray_constants
    import ray._private.utils as ray_utils

    assert doctor.OBJECT_STORE_PROPORTION == ray_constants.DEFAULT_OBJECT_STORE_MEMORY_PROPORTION
    assert doctor.OBJECT_STORE_MAX_BYTES == ray_constants.DEFAULT_OBJECT_STORE_MAX_MEMORY_BYTES
    assert doctor.REQUIRE_SHM_SIZE_THRESHOLD == ray_constants.REQUIRE_SHM_SIZE_THRESHOLD
    for memory, shm in [(20e9, 64 * 2**20), (100e9, 8 * GIB), (1e12, 128 * GIB), (1e12, 400 * GIB), (20e9, 24e9)]:
        monkeypatch.setattr(ray_utils, "get_shared_memory_bytes", lambda shm=shm: int(shm))
        expected = ray_utils.resolve_object_store_memory(int(memory))
        assert doctor.ray_default_object_store(int(memory), int(shm)) == expected, (memory, shm)


def test_shm():
    docker_default = 64 * 2**20
    store = doctor.ray_default_object_store(20 * 10**9, docker_default)
    slow = doctor.check_shm(docker_default, store, starting=True, nccl_peers=False)
    assert slow.status == WARN and "/tmp" in slow.detail and "emptyDir" in slow.fix
    assert doctor.check_shm(docker_default, store, starting=True, nccl_peers=True).status == FAIL
    assert doctor.check_shm(24 * GIB, store, starting=True, nccl_peers=True).status == OK
    # An explicit store above 10 GB beyond /dev/shm: Ray refuses to start, unless told to allow slow storage.
    assert doctor.check_shm(8 * GIB, 20 * 10**9, starting=True, nccl_peers=False).status == FAIL
    assert doctor.check_shm(8 * GIB, 20 * 10**9, starting=True, nccl_peers=False, allow_slow=True).status == WARN
    assert doctor.check_shm(8 * GIB, 20 * 10**9, starting=False, nccl_peers=False).status == WARN


# ---------------------------------------------------------------- 5. NCCL


def test_allreduce_verdicts():
    assert doctor.check_allreduce(8, False, [], False, "").status == NA
    assert doctor.check_allreduce(1, True, [], False, "").status == NA
    assert doctor.check_allreduce(2, True, [0, 0], False, "").status == OK
    hung = doctor.check_allreduce(2, True, [None, None], True, "")
    assert hung.status == FAIL and "NCCL_DEBUG=INFO" in hung.fix
    broken = doctor.check_allreduce(8, True, [1, 1], False, "...\nRuntimeError: NCCL error: unhandled system error\n")
    assert broken.status == FAIL and "unhandled system error" in broken.detail


def test_allreduce_between_two_processes():
    """The NCCL probe's processes, over gloo: it sums, and a stuck pair is killed at the limit."""
    codes, timed_out, tail = doctor.run_allreduce("gloo", timeout_s=60)
    assert (codes, timed_out) == ([0, 0], False), tail
    codes, timed_out, _ = doctor.run_allreduce("gloo", timeout_s=0.3)
    assert timed_out and codes == [None, None]


# ---------------------------------------------------------------- 6. vLLM


def test_vllm():
    big = needs("geo3k-qwen25vl-7b")
    assert doctor.check_vllm(needs("cpu-tiny"), 0, "", None, "cpu.txt").status == NA
    assert doctor.check_vllm(big, 0, "0.33.0", "0.33.0", "gpu.txt").status == OK
    assert doctor.check_vllm(big, 0, "0.32.0", "0.33.0", "gpu.txt").status == FAIL
    missing = doctor.check_vllm(big, 1, "ModuleNotFoundError: No module named 'vllm'", "0.33.0", "gpu.txt")
    assert missing.status == FAIL and "No module named" in missing.detail and "[vllm]" in missing.fix
    assert doctor.check_vllm(big, None, "", "0.33.0", "gpu.txt").status == FAIL


# ---------------------------------------------------------------- 7. Ray auth


def test_token_lookup_order(tmp_path):
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("default-token\n")
    path = tmp_path / "tok"
    path.write_text("path-token")
    both = {"RAY_AUTH_TOKEN": "x", "RAY_AUTH_TOKEN_PATH": str(path)}
    assert doctor.token_source(both, home) == ("RAY_AUTH_TOKEN", None)
    assert doctor.token_source({"RAY_AUTH_TOKEN_PATH": str(path)}, home)[0].startswith("RAY_AUTH_TOKEN_PATH")
    # A bad path is an error, not a fall-back to the default file (as Ray's loader does).
    source, error = doctor.token_source({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "none")}, home)
    assert source is None and "missing or empty" in error
    assert doctor.token_source({}, home) == (str(home / ".ray" / "auth_token"), None)
    assert doctor.token_source({"RAY_AUTH_TOKEN": ""}, home)[0] == str(home / ".ray" / "auth_token")
    assert doctor.token_source({"RAY_AUTH_TOKEN": "  "}, home) == (None, None)
    assert doctor.token_source({}, tmp_path) == (None, None)


def test_remote_addresses():
    for local in (None, "auto", "local", "127.0.0.1:6379", "localhost:6379", "http://127.0.0.1:8265", "[::1]:6379"):
        assert not doctor.is_remote(local), local
    for remote in ("10.0.0.5:6379", "http://mapo-ray-head-svc:8265", "ray://head:10001", "[fd00::1]:6379"):
        assert doctor.is_remote(remote), remote


def test_auth(tmp_path):
    remote = {"RAY_AUTH_MODE": "token", "RAY_ADDRESS": "http://head:8265"}
    missing = doctor.check_auth(remote, tmp_path)
    assert missing.status == FAIL and "mapo-ray-auth" in missing.fix
    found = doctor.check_auth({**remote, "RAY_AUTH_TOKEN": "s3cret-value"}, tmp_path)
    assert found.status == OK and "s3cret-value" not in found.detail + found.fix
    assert doctor.check_auth({"RAY_AUTH_MODE": "token"}, tmp_path).status == WARN
    assert doctor.check_auth({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": "/nonexistent"}, tmp_path).status == FAIL
    assert doctor.check_auth({}, tmp_path).status == OK
    assert doctor.check_auth({"RAY_AUTH_MODE": "disabled"}, tmp_path).status == OK
    # ray job submit sends the token only in token mode.
    unsent = doctor.check_auth({"RAY_ADDRESS": "http://head:8265", "RAY_AUTH_TOKEN": "x"}, tmp_path)
    assert unsent.status == WARN and "RAY_AUTH_MODE=token" in unsent.fix


# ---------------------------------------------------------------- 8. Hugging Face cache and model


def test_hf_cache(tmp_path):
    tried, error = doctor.probe_writable(tmp_path / "not" / "yet")
    assert (tried, error) == (tmp_path, None) and list(tmp_path.iterdir()) == []
    assert doctor.check_hf_cache(tmp_path, tmp_path, None, True).status == OK
    assert doctor.check_hf_cache(tmp_path, tmp_path, "PermissionError: denied", True).status == FAIL
    assert doctor.check_hf_cache(tmp_path, tmp_path, "PermissionError: denied", False).status == WARN


def test_model(tmp_path):
    assert doctor.check_model("tiny-vl", tiny_folder=tmp_path, tiny_built=True).status == OK
    assert "offline" in doctor.check_model("tiny-vl", tiny_folder=tmp_path).detail
    assert doctor.check_model("tiny-vl", tiny_folder=tmp_path, tiny_error="read-only").status == FAIL
    assert doctor.check_model(str(tmp_path), local_folder=tmp_path).status == FAIL
    (tmp_path / "config.json").write_text("{}")
    assert doctor.check_model(str(tmp_path), local_folder=tmp_path).status == OK
    assert doctor.check_model("org/m", cached=tmp_path).status == OK
    assert doctor.check_model("org/m").status == OK  # reachable: the job downloads it
    offline = doctor.check_model("org/m", hub_error="ConnectError: no route")
    assert offline.status == FAIL and "hf download org/m" in offline.fix


# ---------------------------------------------------------------- 9. disk


def test_checkpoints_kept():
    assert doctor.checkpoints_kept(100, 10, 2) == 3  # a new one is written before the oldest goes
    assert doctor.checkpoints_kept(40, 10, 0) == 4  # 0 keeps all
    assert doctor.checkpoints_kept(45, 10, 0) == 5  # and one at the end
    assert doctor.checkpoints_kept(5, 10, 2) == 1
    # A length in trainer.total_epochs (steps unknown before the data is opened): a long run's count.
    assert doctor.checkpoints_kept(None, 10, 2) == 3


def test_needs_of_the_paper_preset_whose_length_is_in_epochs():
    from mapo_ray.config import load_config

    config = load_config(preset="geo3k-qwen25vl-7b")
    assert config.trainer.total_steps is None
    assert doctor.needs_of(config, cluster_has_gpus=True).checkpoints_kept == config.trainer.keep_checkpoints + 1


def test_disk(tmp_path):
    big = needs("geo3k-qwen25vl-7b")
    assert big.params == 8_292_166_656  # the memory plan's exact count of Qwen2.5-VL-7B
    short = doctor.check_disk(big, 80 * 10**9, tmp_path)
    # 3 checkpoints of 8.29e9 x 14 B, and the 2-byte policy.
    assert short.status == FAIL and "~365 GB" in short.detail and "80.00 GB free" in short.detail
    assert doctor.check_disk(big, 400 * 10**9, tmp_path).status == OK
    assert doctor.check_disk(needs("cpu-tiny"), 10**9, tmp_path).status == OK
    unknown = dataclasses.replace(big, model="someone/unknown-model", params=None)
    assert doctor.check_disk(unknown, 10**12, tmp_path).status == WARN


# ---------------------------------------------------------------- output


def test_report_and_table():
    checks = [Check("a", OK, "fine"), Check("b", NA, "no GPU"), Check("c", WARN, "slow", "fix it")]
    assert doctor.report(checks, "p")["ok"] is True
    assert doctor.report([*checks, Check("d", FAIL, "broken", "repair")], "p")["ok"] is False
    table = doctor.format_table([*checks, Check("d", FAIL, "broken", "repair")])
    assert "fix: fix it" in table and "fix: repair" in table and len(table.splitlines()) == 6


def test_connect_cluster_without_one(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert doctor.connect_cluster() is None
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    row = doctor.connect_cluster()
    assert row.status == WARN and "ray job submit" in row.fix


@pytest.mark.integration
def test_every_node_is_checked(ray_cluster, tmp_path):
    """On a cluster the per-node checks run as a Ray task on each alive node."""
    nodes = [n for n in ray_cluster.nodes() if n["Alive"]]
    checks = doctor.run_doctor(load_config(preset="cpu-tiny"), str(tmp_path / "run"), cluster=True)
    per_node = [c for c in checks if c.node not in ("local", "cluster")]
    assert {c.node.split()[0] for c in per_node} == {n["NodeManagerAddress"] for n in nodes}
    assert [c.name for c in per_node] == ["cuda/driver", "gpus", "/dev/shm", "nccl", "vllm", "disk"] * len(nodes)
    shm = next(c for c in per_node if c.name == "/dev/shm")
    store = int(nodes[0]["Resources"]["object_store_memory"])
    assert doctor.gb(store) in shm.detail  # the node's real store, not Ray's default
    assert doctor.report(checks, "cpu-tiny")["ok"]
    big = doctor.run_doctor(load_config(preset="geo3k-qwen25vl-7b"), str(tmp_path / "run"), cluster=True)
    placement = next(c for c in big if c.node == "cluster")
    assert placement.status == FAIL and "the cluster has 0" in placement.detail


# ---------------------------------------------------------------- the CLI


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["HF_HUB_OFFLINE"] = "1"  # the same answer with or without network
    return subprocess.run(
        [sys.executable, "-m", "mapo_ray.doctor", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def test_cli_cpu_preset():
    out = run_cli("--preset", "cpu-tiny", "--json")
    result = json.loads(out.stdout)
    assert out.returncode == 0, out.stdout + out.stderr
    assert result["ok"] is True and result["preset"] == "cpu-tiny"
    for check in result["checks"]:
        assert set(check) == {"name", "status", "detail", "fix", "node"}
        assert check["status"] in (OK, FAIL, WARN, NA)
    statuses = {c["name"]: c["status"] for c in result["checks"]}
    if not torch.cuda.is_available():
        assert [statuses[n] for n in ("gpus", "cuda/driver", "nccl", "vllm")] == [NA] * 4
    table = run_cli("--preset", "cpu-tiny")
    assert table.returncode == 0 and "OK: nothing needed is missing" in table.stdout


def test_cli_eight_gpu_preset():
    out = run_cli("--preset", "geo3k-qwen25vl-7b", "--json")
    result = json.loads(out.stdout)
    assert out.returncode == 1, out.stdout + out.stderr
    failed = {c["name"] for c in result["checks"] if c["status"] == FAIL}
    assert result["ok"] is False and "model" in failed
    if not torch.cuda.is_available():
        assert {"gpus", "cuda/driver"} <= failed
    if importlib.util.find_spec("vllm") is None:
        assert "vllm" in failed
