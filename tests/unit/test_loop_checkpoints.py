"""Which checkpoint folders a run restores from and which it removes (``mapo_ray.loop``),
on real folders named as Ray Train names them; whether a loaded one is complete is
``Learner.load_first_complete``'s to say (``test_learner_deepspeed.py``)."""

from __future__ import annotations

from pathlib import Path

from mapo_ray.loop import checkpoints_to_restore, newest_checkpoint_name, remove_unregistered

C1, C2, C3, C4 = (f"checkpoint_2026-12-02_10-00-0{i}.000000" for i in range(1, 5))


def folders(run_dir: Path, *names: str) -> Path:
    storage = run_dir / "checkpoints"
    for name in names:
        (storage / name).mkdir(parents=True)
    (storage / "checkpoint_manager_snapshot.json").write_text("{}")  # a file, never a candidate
    return storage


def test_the_newest_folder_comes_first_registered_or_not(tmp_path):
    storage = folders(tmp_path, C1, C3, C2)
    # Whichever of them Ray Train registered: one it lost (C3) is newer, so it is tried first.
    assert checkpoints_to_restore(tmp_path, None) == [storage / C3, storage / C2, storage / C1]
    assert checkpoints_to_restore(tmp_path / "fresh", None) == []
    assert newest_checkpoint_name(tmp_path) == C3 and newest_checkpoint_name(tmp_path / "fresh") is None


def test_resume_from_a_folder_skips_the_newer_ones_of_the_run_it_goes_back_in(tmp_path):
    storage = folders(tmp_path, C1, C2, C3)
    # The job started with C3 the newest: C2 and C3 are of the run before, not to be restored.
    assert checkpoints_to_restore(tmp_path, str(storage / C1), earlier=C3) == [storage / C1]
    # After a restart, the job's own checkpoints come first, then the folder it resumed from.
    (storage / C4).mkdir()
    assert checkpoints_to_restore(tmp_path, str(storage / C1), earlier=C3) == [storage / C4, storage / C1]
    # Another run's folder into a fresh run folder: only it, until the job writes its own.
    other = tmp_path / "other" / C2
    assert checkpoints_to_restore(tmp_path / "fresh", str(other), earlier=None) == [other]


def test_unregistered_folders_older_than_the_newest_registered_one_are_removed(tmp_path):
    storage = folders(tmp_path, C1, C2, C3, C4)
    (storage / C2 / "rng_rank0.pt").write_bytes(b"x")
    # Ray Train keeps C1 and C3; C2 was lost by it, C4 is newer than anything it registered.
    assert remove_unregistered(tmp_path, [C1, C3]) == [storage / C2]
    assert sorted(p.name for p in storage.iterdir()) == [C1, C3, C4, "checkpoint_manager_snapshot.json"]
    # Nothing registered yet: nothing to compare with, nothing removed.
    assert remove_unregistered(tmp_path, []) == []
    assert remove_unregistered(tmp_path, [C4]) == [storage / C1, storage / C3]
    assert sorted(p.name for p in storage.glob("checkpoint_*") if p.is_dir()) == [C4]
