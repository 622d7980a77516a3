"""``RolloutCoordinator`` alone, on a local Ray cluster: scripted rollout engines (a test
double, ``tests.integration.scripted_engine``) in the real ``RolloutActor``, with the real
prompt reader, reward pool and weight sync, and one learner rank.

The real engines in the whole loop are covered by ``test_training_loop.py``,
``test_fault_tolerance.py`` and ``test_learning.py``.
"""

from __future__ import annotations

import pytest
import ray

from mapo_ray.config import load_config
from mapo_ray.coordinator import RankChannel, RolloutCoordinator
from mapo_ray.data.stream import DataPosition
from mapo_ray.job import resolve_inputs
from mapo_ray.models.tiny import tiny_vl_path
from mapo_ray.rollout.actor import create_rollout_actors
from mapo_ray.telemetry.ledger import LEDGER_FILE, read_ledger
from tests.integration.scripted_engine import scripted_engine

pytestmark = pytest.mark.integration

TIMEOUT_S = 120.0


@pytest.fixture(scope="module")
def policy():
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(tiny_vl_path())


def start(tmp_path, *overrides: str) -> tuple[RolloutCoordinator, dict]:
    config, model_path = resolve_inputs(
        load_config(
            preset="cpu-tiny",
            overrides=[
                "trainer.prompts_per_step=6",
                "trainer.total_steps=4",
                "trainer.eval_every=2",
                "trainer.eval_prompts=8",
                "rollout.group_size=4",
                "rollout.num_actors=2",
                "rollout.num_cpus_per_actor=0.25",
                "sft.steps=0",
                "data.synthetic_train=24",
                "data.synthetic_test=8",
                *overrides,
            ],
        )
    )
    actors = create_rollout_actors(config.rollout, model_path, engine_factory=scripted_engine, prefix="scripted")
    channel = RankChannel(0, 1, on_sync=lambda: None)
    try:
        coordinator = RolloutCoordinator(
            config, actors=actors, model_path=str(model_path), run_dir=tmp_path, channel=channel, policy=lambda: None
        )
    except BaseException:
        for actor in actors.values():
            ray.kill(actor)
        raise
    return coordinator, actors


def stop(coordinator: RolloutCoordinator, actors: dict) -> None:
    coordinator.close()
    for actor in actors.values():
        ray.kill(actor)


def test_a_batch_is_rolled_out_scored_and_dealt_and_the_samples_carry_the_synced_version(
    ray_cluster, tmp_path, policy
):
    coordinator, actors = start(tmp_path)
    try:
        shard, metrics = coordinator.next_batch(1)
        assert shard.group_ids == list(range(6)) and len(shard.payloads) == 6
        batch = shard.experiences(TIMEOUT_S)
        assert len(batch) == 24 and {e.weight_version for e in batch} == {0}
        assert [e.group_id for e in batch] == [i for i in range(6) for _ in range(4)]
        assert [len(e.response_ids) for e in batch[:4]] == [3, 4, 5, 6]
        assert [e.reward for e in batch] == [r for rewards in shard.rewards for r in rewards]
        assert [e.success for e in batch] == [ok for oks in shard.successes for ok in oks]
        assert metrics["rollout/staleness"] == 0 and metrics["data/prompts"] >= 6
        assert metrics["response/length_mean"] == pytest.approx(4.5)
        assert 0 < metrics["reward/success"] < 1
        assert coordinator.data_position() == DataPosition(0, 6)

        assert coordinator.sync_weights(policy) == 1
        shard, metrics = coordinator.next_batch(2)
        assert {e.weight_version for e in shard.experiences(TIMEOUT_S)} == {1}
        assert metrics["rollout/staleness"] == 0
        evaluation = coordinator.evaluate(2)
        assert evaluation["eval/prompts"] == 8 and 0 <= evaluation["eval/accuracy"] <= 1
        # The certainty metrics of the last batch, with the largest advantage the ranks report.
        certainty = coordinator.step_metrics(1.5)
        assert certainty["rollout/restarts"] == 0
        assert certainty["certainty/num_groups"] == 6 and certainty["certainty/max_abs_advantage"] == 1.5
    finally:
        stop(coordinator, actors)
    ledger = read_ledger(tmp_path / LEDGER_FILE)
    assert sorted(ledger) == [1, 2] and [len(ledger[s]) for s in (1, 2)] == [6, 6]
    assert len({uid for pairs in ledger.values() for uid, _ in pairs}) == 12  # 12 different prompts of 24


def test_async_launches_ahead_and_the_checkpoint_position_is_the_oldest_batch_in_flight(ray_cluster, tmp_path):
    coordinator, actors = start(tmp_path, "trainer.mode=async", "trainer.max_staleness=1")
    try:
        coordinator.next_batch(1)
        assert len(coordinator.pending) == 1  # step 2's batch, sampled with version 0 meanwhile
        assert coordinator.data_position() == DataPosition(0, 6)
        shard, metrics = coordinator.next_batch(2)
        assert metrics["rollout/staleness"] == 0  # no update was sent in between
    finally:
        stop(coordinator, actors)


def test_dynamic_sampling_keeps_only_informative_groups_and_records_every_scored_prompt(ray_cluster, tmp_path):
    coordinator, actors = start(tmp_path, "trainer.dynamic_sampling=true", "trainer.max_extra_rounds=3")
    try:
        shard, metrics = coordinator.next_batch(1)
        # Only the mixed groups (a third of the prompts) are kept, from up to four rounds.
        assert all(0 < sum(oks) < len(oks) for oks in shard.successes)
        assert metrics["dynamic_sampling/kept_groups"] == len(shard.group_ids) > 0
        rounds = int(metrics["dynamic_sampling/extra_rounds"])
        assert rounds >= 1
    finally:
        stop(coordinator, actors)
    (scored,) = read_ledger(tmp_path / LEDGER_FILE).values()
    assert len(scored) == 6 * (rounds + 1)


def test_a_test_split_without_a_usable_row_is_named_when_the_coordinator_starts(ray_cluster, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mapo_ray.data import DataError

    broken = {"bytes": b"\x89PNG\r\n\x1a\n truncated", "path": "broken.png"}
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({"images": pa.array([[broken]], pa.list_(image)), "problem": ["<image>x?"], "answer": ["1"]})
    pq.write_table(table, tmp_path / "unusable.parquet")
    with pytest.raises(DataError, match=r"prompt reader did not start: .*unusable\.parquet has no usable row"):
        start(tmp_path, f"data.test={tmp_path / 'unusable.parquet'}")
