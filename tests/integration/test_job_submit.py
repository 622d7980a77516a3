"""``ray job submit --working-dir . -- python jobs/train_geo3k.py --preset cpu-tiny`` against
a local ``ray start --head`` cluster, exactly as a user runs it (with a short run)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 120
JOB_TIMEOUT_S = 600


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_job_submit_runs_the_training_job(tmp_path):
    gcs_port, dashboard_port = free_port(), free_port()
    # The agents' default ports may be taken by another cluster on this machine (the
    # suite's own): give every fixed port of this one a free number.
    agent_ports = [
        f"--{name}={free_port()}"
        for name in (
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "metrics-export-port",
            "runtime-env-agent-port",
            "ray-client-server-port",
        )
    ]
    bin_dir = Path(sys.executable).parent
    # The cluster and the job use this venv's python; the dashboard needs no token locally.
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    # Short: Ray's unix socket paths under it must stay within the OS's 107 characters.
    ray_temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    # --block keeps `ray start` in the foreground; ending it stops every process it started,
    # and nothing else (another cluster may be running on this machine).
    head = subprocess.Popen(
        [bin_dir / "ray", "start", "--head", "--block", f"--port={gcs_port}", "--num-cpus=4",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
         "--disable-usage-stats", f"--temp-dir={ray_temp}", *agent_ports],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=5)
                break
            except OSError:
                assert head.poll() is None, "ray start --head exited"
                assert time.monotonic() < deadline, f"the dashboard did not answer within {START_TIMEOUT_S}s"
                time.sleep(1)
        run_dir = tmp_path / "run"
        while True:
            job = subprocess.run(
                [bin_dir / "ray", "job", "submit", f"--address={address}", "--working-dir", ".", "--",
                 "python", "jobs/train_geo3k.py", "--preset", "cpu-tiny", "--output", str(run_dir),
                 "--set", "trainer.total_steps=2", "--set", "trainer.eval_prompts=8",
                 "--set", "trainer.eval_every=2", "--set", "trainer.prompts_per_step=4",
                 "--set", "sft.steps=2"],
                cwd=ROOT, env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S,
            )  # fmt: skip
            # The dashboard answers before its job agent is up; submitting then is refused.
            if "No available agent" not in job.stdout + job.stderr or time.monotonic() > deadline:
                break
            time.sleep(2)
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=90)
        shutil.rmtree(ray_temp, ignore_errors=True)
    output = job.stdout + job.stderr
    assert job.returncode == 0, output[-5000:]
    assert "succeeded" in output
    assert f"run folder: {run_dir}" in output
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4  # the evaluation after the warm-start, two steps and one evaluation
    assert (run_dir / "policy" / "model.safetensors").exists()
