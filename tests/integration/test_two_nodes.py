"""The training job on a two-node Ray cluster: the learner on the head, the rollout and reward
actors on a second node, placed there by custom resources, and the weights sent from one
node to the other at the node's address.

Both nodes run on this machine (``ray start --head`` and ``ray start --address``, each with
ports and a temporary folder of its own, since other Ray clusters may run here), started
with ``--node-ip-address`` set to the machine's own non-loopback address, as nodes of a real
cluster are: an address that resolves to loopback would work here and nowhere else. The job
is ``jobs/train_geo3k.py`` started the way a user starts it against a cluster
(``RAY_ADDRESS=<head> python jobs/train_geo3k.py``), in a process of its own: this pytest
process may already be connected to the session's local cluster.

What one machine cannot show: its nodes share one file system, so the model folder, the data
and the run folder that the driver names exist for every worker; on separate machines they
must be on storage every node mounts at the same path (README, "On a Ray cluster").
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from mapo_ray.telemetry.records import METRICS_FILE, read_metrics

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 180
JOB_TIMEOUT_S = 600
STEPS = 2
# Custom resources: the head alone has the learner's, the second node alone the actors'.
HEAD_RESOURCES = {"learner_node": 1}
ROLLOUT_NODE_RESOURCES = {"rollout_node": 4}
SYNC_LINE = re.compile(r"weight sync: (\d+) rollout rank\(s\) joined the (\w+) group at (\S+):(\d+)")


def machine_address() -> str | None:
    """This machine's first IPv4 address that is not loopback, or None."""
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET and not address.address.startswith("127."):
                return address.address
    return None


def free_port() -> int:
    """A TCP port free on every interface."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def node_ports(*names: str) -> list[str]:
    """``--NAME=PORT`` with a free port for each of ``names``."""
    return [f"--{name}={free_port()}" for name in names]


# Ports every node opens; 0 for the workers' ports: each worker binds one the OS picks.
NODE_PORTS = (
    "object-manager-port",
    "node-manager-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "metrics-export-port",
    "runtime-env-agent-port",
)
WORKER_PORTS = ("--min-worker-port=0", "--max-worker-port=0")


def start_node(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    """``ray start --block ARGS`` in a session of its own: its processes can be ended by group."""
    return subprocess.Popen(
        [Path(sys.executable).parent / "ray", "start", "--block", "--disable-usage-stats", *args],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip


def stop_nodes(nodes: list[subprocess.Popen], temp_dirs: list[str]) -> None:
    """End every process the ``ray start`` commands started, and nothing else: SIGTERM to each
    one's process group (``ray start --block`` then stops its node), then SIGKILL to whatever
    is left of their process trees or still runs from their temporary folders."""
    survivors = {p for node in nodes for p in _tree(node.pid)}
    for node in nodes:
        try:
            os.killpg(node.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for node in nodes:
        try:
            node.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(node.pid, signal.SIGKILL)
            node.wait(timeout=30)
    for proc in psutil.process_iter(["cmdline"]):
        if any(temp in arg for arg in proc.info["cmdline"] or () for temp in temp_dirs):
            survivors.add(proc)
    for proc in survivors:
        try:
            proc.kill()
        except psutil.Error:  # gone already
            pass


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


@pytest.fixture
def two_nodes(monkeypatch) -> Iterator[dict]:
    """A head (``learner_node``) and a second node (``rollout_node``), both at this machine's
    address; yields their address, dashboard URL, node address and the environment to run
    the job in."""
    host = machine_address()
    if host is None:
        pytest.skip("this machine has no address but loopback to start a second node at")
    gcs_port, dashboard_port = free_port(), free_port()
    bin_dir = Path(sys.executable).parent
    env = {
        **os.environ,
        # The nodes' workers import this checkout's mapo_ray (the venv's may be another one's).
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "RAY_AUTH_MODE": "disabled",  # a throw-away cluster: no token for its dashboard
    }
    env.pop("RAY_ADDRESS", None)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # for this process's state API queries
    # Short: Ray's unix socket paths under them must stay within the OS's 107 characters.
    temp_dirs = [tempfile.mkdtemp(prefix="ray2n-", dir="/tmp") for _ in range(2)]
    nodes = [
        start_node(
            ["--head", f"--node-ip-address={host}", f"--port={gcs_port}", "--num-cpus=2",
             f"--resources={json.dumps(HEAD_RESOURCES)}", "--include-dashboard=true",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
             f"--temp-dir={temp_dirs[0]}", *node_ports(*NODE_PORTS, "ray-client-server-port"), *WORKER_PORTS],
            env,
        )
    ]  # fmt: skip
    try:
        dashboard = f"http://127.0.0.1:{dashboard_port}"
        wait_for_nodes(dashboard, 1, nodes)
        nodes.append(
            start_node(
                [f"--address={host}:{gcs_port}", f"--node-ip-address={host}", "--num-cpus=2",
                 f"--resources={json.dumps(ROLLOUT_NODE_RESOURCES)}", f"--temp-dir={temp_dirs[1]}",
                 *node_ports(*NODE_PORTS), *WORKER_PORTS],
                env,
            )
        )  # fmt: skip
        wait_for_nodes(dashboard, 2, nodes)
        yield {"address": f"{host}:{gcs_port}", "dashboard": dashboard, "host": host, "env": env}
    finally:
        stop_nodes(nodes, temp_dirs)
        for temp in temp_dirs:
            shutil.rmtree(temp, ignore_errors=True)


def wait_for_nodes(dashboard: str, count: int, nodes: list[subprocess.Popen]) -> None:
    """Block until ``count`` nodes are alive (the state API answers through the head's dashboard)."""
    from ray.util.state import list_nodes

    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            if len(list_nodes(address=dashboard, filters=[("state", "=", "ALIVE")])) >= count:
                return
        except Exception:  # noqa: BLE001 - the dashboard is not up yet; any error means "not yet"
            pass
        assert all(node.poll() is None for node in nodes), "a `ray start` exited"
        assert time.monotonic() < deadline, f"{count} node(s) were not up within {START_TIMEOUT_S}s"
        time.sleep(1)


def actor_nodes(dashboard: str, class_name: str) -> list[str]:
    """The node id of every actor of ``class_name`` this cluster has had (alive or dead)."""
    from ray.util.state import list_actors

    return [a.node_id for a in list_actors(address=dashboard, filters=[("class_name", "=", class_name)], limit=1000)]


def test_the_job_trains_with_its_actors_on_another_node(two_nodes, tmp_path):
    from ray.util.state import list_nodes

    run_dir = tmp_path / "run"
    overrides = [
        f"trainer.total_steps={STEPS}", "trainer.prompts_per_step=4", "trainer.eval_every=0",
        "rollout.group_size=2", "rollout.max_new_tokens=8", "sft.steps=0",
        "data.synthetic_train=32", "data.synthetic_test=8",
        "rollout.resources={rollout_node: 1}", "reward.resources={rollout_node: 1}",
        "trainer.resources_per_learner={learner_node: 1}",
    ]  # fmt: skip
    job = subprocess.run(
        [sys.executable, "jobs/train_geo3k.py", "--preset", "cpu-tiny", "--output", str(run_dir),
         *[arg for o in overrides for arg in ("--set", o)]],
        cwd=ROOT, env={**two_nodes["env"], "RAY_ADDRESS": two_nodes["address"]},
        capture_output=True, text=True, timeout=JOB_TIMEOUT_S,
    )  # fmt: skip
    output = job.stdout + job.stderr
    assert job.returncode == 0, output[-5000:]

    # Placement: the learner on the head, every rollout and reward actor on the second node.
    dashboard = two_nodes["dashboard"]
    nodes = list_nodes(address=dashboard)
    (head,) = [n.node_id for n in nodes if n.is_head_node]
    (rollout_node,) = [n.node_id for n in nodes if not n.is_head_node]
    assert actor_nodes(dashboard, "RayTrainWorker") == [head]
    assert actor_nodes(dashboard, "RolloutActor") == [rollout_node]
    assert actor_nodes(dashboard, "RewardWorker") == [rollout_node]

    # The weight-sync group formed at the learner node's address, the one given to `ray start`.
    joined = SYNC_LINE.findall(output)
    assert joined, output[-5000:]
    ranks, backend, host, _ = joined[0]
    assert (ranks, backend, host) == ("1", "gloo", two_nodes["host"])
    assert not host.startswith("127.")

    # Every weight version reached the actors: a step's weight_version is the version every
    # actor reported loading (RayWeightSync.sync refuses any other answer), and each step
    # after the first sampled with the version of the step before.
    steps = read_metrics(run_dir / METRICS_FILE).train
    assert sorted(steps) == list(range(1, STEPS + 1))
    assert [steps[s]["weight_version"] for s in sorted(steps)] == list(range(1, STEPS + 1))
    assert all(steps[s]["rollout/staleness"] == 0 for s in steps)
    assert (run_dir / "policy" / "model.safetensors").exists()
