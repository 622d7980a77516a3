"""Ctrl-C during a job's start-up: ``jobs/train_geo3k.py`` run for real in a subprocess
(its own local Ray cluster, not the suite's), SIGINT sent to it before the first step:
once its Ray cluster is up (the actors are being created), and once Ray Train has
started the learner (which then loads the model)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
# The job prints the first once its Ray cluster is up; Ray Train's controller prints the
# second once the learner workers run, before they load the model.
START_UP_LINES = ("Ray dashboard:", "Started training worker group")
GENEROUS_S = 600  # a bound against hanging on a loaded machine, not a measurement


@pytest.mark.parametrize("start_up_line", START_UP_LINES)
def test_ctrl_c_during_start_up_stops_the_job_and_its_ray_processes(tmp_path, start_up_line):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(ROOT)  # this checkout, whatever the installed package points at
    command = [sys.executable, "jobs/train_geo3k.py", "--output", str(tmp_path / "run"), "--set", "trainer.total_steps=2"]
    job = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    lines: list[str] = []
    in_start_up = threading.Event()

    def read() -> None:
        for line in job.stdout:
            lines.append(line)
            if start_up_line in line:
                in_start_up.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    spawned: list[psutil.Process] = []
    try:
        assert in_start_up.wait(GENEROUS_S), "".join(lines[-50:])
        spawned = psutil.Process(job.pid).children(recursive=True)
        job.send_signal(signal.SIGINT)
        assert job.wait(GENEROUS_S) == 130, "".join(lines[-50:])
        reader.join(GENEROUS_S)
        output = "".join(lines)
        assert "interrupted (Ctrl-C) during start-up: the job stops before training" in output
        assert "KeyboardInterrupt" not in output  # no traceback of the interrupt
        assert not (tmp_path / "run" / "metrics.jsonl").exists()
        # Every process the job had started (Ray's own, the actors, the learner) is gone.
        _, alive = psutil.wait_procs(spawned, timeout=GENEROUS_S)
        assert not alive, f"left running: {[p.pid for p in alive]}"
    finally:
        if job.poll() is None:
            job.kill()
        for proc in spawned:
            try:
                proc.kill()
            except psutil.Error:  # gone already
                pass
