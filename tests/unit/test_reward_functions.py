"""Choosing a reward function, its contract, and grading a group (in-process, no Ray)."""

from __future__ import annotations

import dataclasses
import logging
import re
import textwrap
from functools import partial

import numpy as np
import pytest

from mapo_ray.config import ConfigError, RewardConfig, load_config
from mapo_ray.job import check_names
from mapo_ray.reward import (
    FAILURE_KINDS,
    REWARD_FUNCTIONS,
    GroupRequest,
    RewardInputError,
    call_reward_fn,
    failure_metrics,
    grade_group,
    load_reward_fn,
)


@pytest.fixture
def user_package(tmp_path, monkeypatch):
    """A user's package ``my_pkg`` on sys.path, the way a job ships its own rewards."""
    pkg = tmp_path / "my_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "rewards.py").write_text(
        textwrap.dedent(
            """
            CONSTANT = 3

            def score(response, answer):
                return {"overall": float(response.strip() == answer)}

            def one_arg(response):
                return {"overall": 0.0}

            class Graders:
                @staticmethod
                def exact(response, answer):
                    return {"overall": float(response == answer)}
            """
        )
    )
    (pkg / "broken.py").write_text("1 / 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return pkg


def test_registered_graders():
    assert REWARD_FUNCTIONS.names() == ["label", "math"]


def test_user_function_by_import_path(user_package):
    assert load_reward_fn(RewardConfig(function="my_pkg.rewards:score"))(" 7", "7") == {"overall": 1.0}
    assert load_reward_fn(RewardConfig(function="my_pkg.rewards:Graders.exact"))("7", "8") == {"overall": 0.0}


@pytest.mark.parametrize(
    ("function", "message"),
    [
        ("no_such_pkg.rewards:score", r"cannot import module 'no_such_pkg\.rewards': ModuleNotFoundError"),
        ("my_pkg.broken:score", r"cannot import module 'my_pkg\.broken': ZeroDivisionError"),
        ("my_pkg.rewards:nope", r"'my_pkg\.rewards' has no attribute 'nope'"),
        ("my_pkg.rewards:Graders.nope", r"has no attribute 'nope'"),
        ("my_pkg.rewards:CONSTANT", r"int object is not callable"),
        ("my_pkg.rewards:one_arg", r"must accept \(response, answer\)"),
    ],
)
def test_a_wrong_import_path_is_a_config_error_naming_it(user_package, function, message):
    with pytest.raises(ConfigError, match=r"reward\.function .*" + message):
        load_reward_fn(RewardConfig(function=function))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("reward.function=maths", r"reward\.function: unknown reward function 'maths'; did you mean 'math'\?"),
        ("reward.function=my_pkg.rewards.score", r"reward\.function: unknown reward function"),  # '.' for ':'
        ("reward.accuracy_weight=1.0", r"must be >= 0 and sum to 1, got \(1\.0, 0\.1\)"),
        ("reward.grading_timeout_s=0", r"reward\.grading_timeout_s must be positive"),
        ("reward.call_timeout_s=2", r"reward\.call_timeout_s \(2\.0\) must exceed reward\.grading_timeout_s \(5\.0\)"),
        ("reward.num_workers=0", r"reward\.num_workers must be positive"),
        ("reward.num_worker=2", r"unknown config key 'reward\.num_worker'; did you mean 'reward\.num_workers'\?"),
        ("reward.grading_memory_mb=100", r"grading_memory_mb must be 0 or null \(no limit\) or at least 256, got 100$"),
        ("reward.grading_memory_mb=-1", r"reward\.grading_memory_mb must be >= 0 \(0 or null: no limit\), got -1"),
        ("reward.grading_memory_mb=2.5", r"key 'reward\.grading_memory_mb': value 2\.5 \(float\) is not of type int"),
        ("reward.grading_cpu_s=-1", r"reward\.grading_cpu_s must be >= 0 \(0 or null: no limit\), got -1"),
        ("reward.grading_cpu_s=0.5", r"config key 'reward\.grading_cpu_s': value 0\.5 \(float\) is not of type int"),
        ("reward.grading_env_keep=['']", r"reward\.grading_env_keep must hold environment variable names, got ''"),
        ("reward.grading_env_keep=['A=1']", r"reward\.grading_env_keep must hold [a-z ]+names, got 'A=1'$"),
    ],
)
def test_reward_config_errors(override, message):
    # The function's name is checked by check_names, the rest by load_config (a job runs both).
    with pytest.raises(ConfigError, match=message):
        check_names(load_config(overrides=[override]))


def test_reward_config_defaults():
    cfg = load_config().reward
    assert (cfg.function, cfg.accuracy_weight, cfg.format_weight) == ("math", 0.9, 0.1)
    assert (cfg.grading_memory_mb, cfg.grading_cpu_s, cfg.grading_env_keep) == (4096, 10, [])


@pytest.mark.parametrize("off", ["0", "null"])
def test_grading_limits_can_be_turned_off(off):
    cfg = load_config(overrides=[f"reward.grading_memory_mb={off}", f"reward.grading_cpu_s={off}"]).reward
    assert not cfg.grading_memory_mb and not cfg.grading_cpu_s


def _raises(response, answer):
    return 1 / 0


def _bad_answer(response, answer):
    raise RewardInputError(f"reference answer {answer!r} is unusable")


@pytest.mark.parametrize(
    ("fn", "kind", "error"),
    [
        (_raises, "exception", r"ZeroDivisionError: division by zero \(at .*test_reward_functions\.py:\d+\)"),
        (_bad_answer, "bad_answer", r"reference answer 'a' is unusable"),
        (lambda r, a: {"overall": float("nan")}, "nan", r"not finite: overall=nan"),
        (lambda r, a: {"overall": 1.0, "format": float("-inf")}, "nan", r"format=-inf"),
        (lambda r, a: 0.5, "invalid", r"returned float, expected a mapping"),
        (lambda r, a: {"accuracy": 1.0}, "invalid", r"no 'overall' key \(keys: \['accuracy'\]\)"),
        (lambda r, a: {"overall": "1"}, "invalid", r"entry 'overall': '1' is not a str -> float pair"),
        (lambda r, a: {"overall": True}, "invalid", r"entry 'overall': True"),
    ],
)
def test_every_contract_breach_is_a_failure_kind(fn, kind, error):
    graded = call_reward_fn(fn, "r", "a")
    assert graded.scores is None and graded.failure == kind
    assert re.search(error, graded.error)


def test_scores_become_plain_floats():
    graded = call_reward_fn(lambda r, a: {"overall": np.float32(0.5), "n": 2}, "r", "a")
    assert graded.failure is None and graded.scores == {"overall": 0.5, "n": 2.0}
    assert all(type(v) is float for v in graded.scores.values())


def _by_content(response, answer):
    if response == "raise":
        raise KeyError("boom")
    if response == "nan":
        return {"overall": float("nan")}
    return {"overall": float(response == answer), "accuracy": float(response == answer)}


def test_grade_group_zeroes_counts_and_logs_failures(caplog):
    request = GroupRequest(uid="q7", answer="4", responses=["4", "raise", "5", "nan", "4"])
    with caplog.at_level(logging.WARNING, logger="mapo_ray.reward.group"):
        result = grade_group(request, partial(call_reward_fn, _by_content))
    assert result.uid == "q7"
    assert result.rewards == [1.0, 0.0, 0.0, 0.0, 1.0]
    assert result.failures == [None, "exception", None, "nan", None]
    assert result.scores[1] == {"overall": 0.0} and result.scores[2] == {"overall": 0.0, "accuracy": 0.0}
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert "reward failed (exception) for group 'q7' response 1: KeyError: 'boom'" in messages[0]
    assert "response='raise'" in messages[0] and "answer='4'" in messages[0]
    assert "reward failed (nan)" in messages[1]


def test_failure_log_truncates_the_offending_input(caplog):
    response = "raise" + "x" * 1000
    fn = lambda r, a: _by_content("raise", a)  # noqa: E731
    with caplog.at_level(logging.WARNING, logger="mapo_ray.reward.group"):
        grade_group(GroupRequest(uid="u", answer="4", responses=[response]), partial(call_reward_fn, fn))
    (record,) = caplog.records
    assert "...[805 more chars]" in record.getMessage()
    assert len(record.getMessage()) < 800


def test_failure_metrics_count_every_kind():
    requests = [GroupRequest("a", "4", ["4", "raise"]), GroupRequest("b", "4", ["nan", "nan", "3"])]
    results = [grade_group(r, partial(call_reward_fn, _by_content)) for r in requests]
    metrics = failure_metrics(results)
    counts = {"reward/graded", "reward/retried", "reward/regraded"}
    assert set(metrics) == {f"reward/failed/{k}" for k in FAILURE_KINDS} | counts
    assert metrics["reward/failed/exception"] == 1
    assert metrics["reward/failed/nan"] == 2
    assert metrics["reward/failed/timeout"] == 0
    assert metrics["reward/graded"] == 2
    assert metrics["reward/retried"] == 0
    assert failure_metrics([dataclasses.replace(results[0], retries=2), results[1]])["reward/retried"] == 2
    # A grading done again after its process was killed counts per response.
    regraded = grade_group(requests[0], lambda r, a: dataclasses.replace(call_reward_fn(_by_content, r, a), regraded=True))
    assert regraded.regraded == 2 and failure_metrics([regraded, results[1]])["reward/regraded"] == 2


def test_a_group_of_the_wrong_types_is_refused_naming_it():
    with pytest.raises(TypeError, match=r"group 'g': response 1 must be str, got bytes"):
        GroupRequest(uid="g", answer="4", responses=["4", b"4"])
    with pytest.raises(TypeError, match=r"group 'g': answer must be str, got int"):
        GroupRequest(uid="g", answer=4, responses=["4"])
