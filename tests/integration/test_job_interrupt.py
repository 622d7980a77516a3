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
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
GENEROUS_S = 600  # a bound against hanging on a loaded machine, not a measurement


def printed(text: str):
    """The moment the job has printed a line with ``text`` (it prints the dashboard's once Ray is up)."""
    return lambda job, lines: any(text in line for line in lines)


def learner_started(job: subprocess.Popen, lines: list[str]) -> bool:
    """The moment a Ray Train worker runs among the job's processes (Ray Train logs no line for it
    on the job's console)."""
    for proc in psutil.Process(job.pid).children(recursive=True):
        try:
            if proc.cmdline()[:1] and proc.cmdline()[0].startswith("ray::RayTrainWorker"):
                return True
        except psutil.Error:  # gone meanwhile
            pass
    return False


@pytest.mark.parametrize("in_start_up", [printed("Ray dashboard:"), learner_started], ids=["ray-up", "learner-started"])
def test_ctrl_c_during_start_up_stops_the_job_and_its_ray_processes(tmp_path, in_start_up):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(ROOT)  # this checkout, whatever the installed package points at
    command = [sys.executable, "jobs/train_geo3k.py", "--output", str(tmp_path / "run"), "--set", "trainer.total_steps=2"]
    job = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(job.stdout), daemon=True)
    reader.start()
    spawned: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + GENEROUS_S
        while not in_start_up(job, lines):
            assert job.poll() is None and time.monotonic() < deadline, "".join(lines[-50:])
            time.sleep(0.1)
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
