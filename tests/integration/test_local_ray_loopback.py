"""The local Ray cluster that a job starts (``mapo_ray.job.connect_ray`` without RAY_ADDRESS)
listens on 127.0.0.1 only and asks for a token.

The cluster runs in a child process (``python -c ...report()``), so that it is a new one beside
the test session's and its process tree holds only its own processes."""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 300
# Processes that a local cluster starts beside the GCS and the raylet, each with a server.
AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")


def listening(processes: list) -> list[dict]:
    """The TCP sockets that ``processes`` (psutil.Process) listen on: address, port, process name."""
    import psutil

    found = []
    for process in processes:
        try:
            connections, name = process.net_connections(kind="tcp"), process.name()
        except psutil.Error:  # a worker that exited meanwhile
            continue
        found += [
            {"ip": c.laddr.ip, "port": c.laddr.port, "process": name}
            for c in connections
            if c.status == psutil.CONN_LISTEN
        ]
    return found


def http_status(url: str, token: str | None = None) -> int:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def report() -> None:
    """In the child: start the job's local cluster, wait until its agents listen, print one
    JSON line (the listening sockets of this process and its descendants, and the dashboard's
    answers without and with the token)."""
    import psutil
    import ray

    from mapo_ray.job import connect_ray

    connect_ray()
    ray.get(ray.remote(lambda: None).remote())  # a worker process, with its own server
    this = psutil.Process()
    deadline = time.monotonic() + TIMEOUT_S / 2
    while True:
        tree = [this, *this.children(recursive=True)]
        sockets = listening(tree)
        if all(any(s["process"] == agent for s in sockets) for agent in AGENTS) or time.monotonic() > deadline:
            break
        time.sleep(1)
    dashboard = f"http://{ray._private.worker._global_node.webui_url}/api/version"
    token = Path(os.environ["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    print(json.dumps({"sockets": sockets, "no_token": http_status(dashboard), "token": http_status(dashboard, token)}))
    ray.shutdown()


def test_the_jobs_local_cluster_listens_on_loopback_only_and_asks_for_a_token(tmp_path):
    token_file = tmp_path / "auth_token"
    token_file.write_text(secrets.token_hex(32))  # not ~/.ray/auth_token, which others may use
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    env.update(RAY_AUTH_TOKEN_PATH=str(token_file), PYTHONPATH=str(ROOT))
    child = subprocess.run(
        [sys.executable, "-c", f"from tests.integration.{Path(__file__).stem} import report; report()"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S,
    )  # fmt: skip
    assert child.returncode == 0, child.stdout[-3000:] + child.stderr[-3000:]
    result = json.loads(child.stdout.strip().splitlines()[-1])
    sockets = result["sockets"]
    names = {s["process"] for s in sockets}
    # Not vacuous: every kind of server a local cluster runs was seen listening.
    assert {"gcs_server", "raylet", *AGENTS} <= names, sockets
    # "::ffff:127.0.0.1" is 127.0.0.1 on a dual-stack socket.
    open_ = [s for s in sockets if not ipaddress.ip_address(s["ip"].removeprefix("::ffff:")).is_loopback]
    assert not open_, f"listening beyond loopback: {open_}"
    assert f"its token is in {token_file}" in child.stdout
    assert result["no_token"] == 401, result
    assert result["token"] == 200, result
