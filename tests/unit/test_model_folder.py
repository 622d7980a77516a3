"""``model_folder_here``: a worker that cannot find the model folder the driver named says so."""

from __future__ import annotations

import socket

import pytest

from mapo_ray.models import model_folder_here


def test_a_folder_on_this_machine_is_returned(tmp_path):
    assert model_folder_here(str(tmp_path), "learner rank 0") == tmp_path


def test_a_missing_folder_names_the_worker_the_machine_and_the_path(tmp_path):
    missing = tmp_path / "models" / "tiny-qwen2.5-vl-v1"
    message = rf"rollout actor 'rollout-1' on {socket.gethostname()}: the model folder {missing} is not on this machine"
    with pytest.raises(FileNotFoundError, match=message):
        model_folder_here(missing, "rollout actor 'rollout-1'")
    (tmp_path / "file").write_text("")
    with pytest.raises(FileNotFoundError, match="storage every node mounts at the same path"):
        model_folder_here(tmp_path / "file", "the prompt reader")
