"""A job command's mistakes are named before Ray starts (``mapo_ray.job.preflight``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from mapo_ray.job import job_parser, preflight

ROOT = Path(__file__).resolve().parents[2]


def check(tmp_path: Path, *argv: str) -> str:
    """The SystemExit message of ``preflight`` for ``argv`` (with --output in ``tmp_path``)."""
    args = job_parser("test").parse_args(["--preset", "cpu-tiny", "--output", str(tmp_path / "run"), *argv])
    connected = ray.is_initialized()  # the suite's own cluster may be up already
    with pytest.raises(SystemExit) as error:
        preflight(args)
    assert ray.is_initialized() == connected  # preflight neither started nor joined one
    assert not (tmp_path / "run").exists()  # nothing is left behind by a refused command
    return str(error.value)


def test_a_wrong_key_or_value_is_named(tmp_path):
    assert "unknown config key 'algo.estimater'; did you mean 'algo.estimator'?" in check(
        tmp_path, "--set", "algo.estimater=mapo"
    )
    assert "algo.clip_ratio_low must be in [0, 1)" in check(tmp_path, "--set", "algo.clip_ratio_low=1.5")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("algo.estimator=mapoo", "algo.estimator: unknown advantage estimator 'mapoo'; did you mean 'mapo'?"),
        ("algo.policy_loss=ppoo", "algo.policy_loss: unknown policy loss 'ppoo'; did you mean 'ppo'?"),
        ("algo.kl_estimator=k4", "algo.kl_estimator: unknown KL estimator 'k4'"),
        ("reward.function=maths", "reward.function: unknown reward function 'maths'; did you mean 'math'?"),
        ("data.synthetic_kinds=[fill, circles]", "data.synthetic_kinds: synthetic task: unknown kind(s) ['circles']"),
    ],
)
def test_a_wrong_name_is_named(tmp_path, override, message):
    # Checked by check_names, not by load_config (mapo_ray.config imports none of the registries).
    assert message in check(tmp_path, "--set", override)


def test_batch_arithmetic_that_cannot_work_is_named(tmp_path):
    message = check(tmp_path, "--set", "learner.updates_per_step=1000")
    assert "learner.updates_per_step (1000)" in message and "gives 128" in message


def test_a_missing_or_malformed_config_file_is_named(tmp_path):
    assert f"config file {tmp_path / 'none.yaml'}: No such file" in check(tmp_path, "--config", str(tmp_path / "none.yaml"))
    broken = tmp_path / "broken.yaml"
    broken.write_text("trainer: {total_steps: 3\n")
    assert f"config file {broken} is not valid YAML" in check(tmp_path, "--config", str(broken))


def test_a_missing_data_file_or_column_is_named(tmp_path):
    missing = tmp_path / "none.parquet"
    assert f"'{missing}': no such file" in check(tmp_path, "--set", f"data.train={missing}")
    no_answer = tmp_path / "no_answer.parquet"
    pq.write_table(pa.table({"problem": ["?"], "images": [[{"bytes": b"", "path": None}]]}), no_answer)
    assert "missing column 'answer'" in check(tmp_path, "--set", f"data.test={no_answer}")


def test_a_resume_folder_that_does_not_exist_is_named(tmp_path):
    assert f"--resume {tmp_path / 'ckpt'}: no such checkpoint folder" in check(
        tmp_path, "--resume", str(tmp_path / "ckpt")
    )


def test_the_job_script_refuses_before_starting_ray(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(
        [sys.executable, "jobs/train_geo3k.py", "--set", "trainer.totl_steps=3", "--output", str(tmp_path / "run")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1
    assert "error: unknown config key 'trainer.totl_steps'; did you mean 'trainer.total_steps'?" in done.stderr
    assert "Traceback" not in done.stderr
    assert "Started a local Ray instance" not in done.stdout + done.stderr
    assert not (tmp_path / "run").exists()


def test_a_run_folder_with_a_checkpoint_needs_resume_but_a_failed_first_attempt_does_not(tmp_path):
    from mapo_ray.job import run_folder

    folder = tmp_path / "run"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / ".validate_storage_marker").touch()  # all a run that failed early leaves
    assert run_folder(folder, "cpu-tiny", None) == folder.resolve()
    (folder / "checkpoints" / "checkpoint_2026-12-02_06-39-04.487023").mkdir()
    with pytest.raises(SystemExit, match="already holds a run: pass --resume auto"):
        run_folder(folder, "cpu-tiny", None)
    assert run_folder(folder, "cpu-tiny", "auto") == folder.resolve()


def test_a_run_folder_can_go_back_to_one_of_its_own_checkpoints_only(tmp_path):
    from mapo_ray.job import run_folder

    folder = tmp_path / "run"
    older = folder / "checkpoints" / "checkpoint_2026-12-02_06-39-04.487023"
    older.mkdir(parents=True)
    (folder / "checkpoints" / "checkpoint_2026-12-02_06-40-11.120931").mkdir()
    assert run_folder(folder, "cpu-tiny", str(older)) == folder.resolve()
    other = tmp_path / "other" / "checkpoints" / older.name
    other.mkdir(parents=True)
    with pytest.raises(SystemExit, match=f"--resume {other} is not one of its checkpoint folders"):
        run_folder(folder, "cpu-tiny", str(other))
    assert run_folder(tmp_path / "fresh", "cpu-tiny", str(other)) == (tmp_path / "fresh").resolve()


def test_a_submitted_job_with_a_working_dir_keeps_its_runs_outside_the_copy():
    import json

    from mapo_ray.job import RAY_JOB_CONFIG, runs_root

    assert runs_root({}) == Path("runs")
    assert runs_root({RAY_JOB_CONFIG: json.dumps({"runtime_env": {}, "metadata": {}})}) == Path("runs")
    submitted = {RAY_JOB_CONFIG: json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_1.zip"}})}
    assert runs_root(submitted) == Path.home() / "mapo-ray" / "runs"


def test_the_dashboard_line_says_where_the_token_is_never_what_it_is():
    from mapo_ray.job import dashboard_login

    assert dashboard_login({}) == f"its token is in {Path.home() / '.ray' / 'auth_token'}"
    assert dashboard_login({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": "/run/t"}) == "its token is in /run/t"
    assert dashboard_login({"RAY_AUTH_TOKEN": "s3cret"}) == "its token is in RAY_AUTH_TOKEN"
    assert dashboard_login({"RAY_AUTH_MODE": "disabled"}) == "RAY_AUTH_MODE=disabled: no token asked"
