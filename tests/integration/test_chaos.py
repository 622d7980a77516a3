"""A 20-step chaos run on the session's local Ray cluster, checked by invariants.

The harness is ``benchmarks/chaos.py`` (which runs the same from the command line and
prints its table): a reference run without faults, then the same seed under one fault of
each kind at drawn moments (a rollout actor, a rollout actor half-way through loading an
update, a reward actor, a grading process and the learner worker all killed for real,
and reward calls that hang). The run must end where the reference ends: every step
once, every prompt scored once, the same weight version and the same weights.
"""

from __future__ import annotations

import pytest

from benchmarks.chaos import chaos_run, report, schedule

pytestmark = pytest.mark.integration

STEPS = 20
SEED = 0


def test_a_chaos_run_loses_nothing_and_ends_with_the_weights_of_an_uninterrupted_run(ray_cluster, tmp_path):
    result, chaos = chaos_run(tmp_path, SEED, STEPS)
    print(report(result, chaos))  # shown when the test fails: where each fault landed

    assert chaos.error is None
    outside = [f for f in schedule(SEED, STEPS) if f.kind != "rollout_crash_mid_sync"]
    assert [landed.fault for landed in chaos.landed] == outside and not chaos.missed
    (mid_sync,) = [f.step for f in schedule(SEED, STEPS) if f.kind == "rollout_crash_mid_sync"]
    assert chaos.crashes == [mid_sync]
    hung, hung_reference = result.hung_gradings
    assert hung >= 1 and hung == hung_reference  # the same inputs hung, and were cut, in both runs

    assert result.faults_injected == len(outside) + 1 + hung == result.faults_survived
    assert result.steps_not_once == {"metrics.jsonl": [], "ledger.jsonl": []}
    assert result.prompts_lost == 0 and result.prompts_scored_twice == 0
    assert result.final_versions == [STEPS, STEPS, STEPS]
    assert result.weights_differ == []
