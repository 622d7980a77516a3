"""The label grader (emotion task): where the answer is read, case, bad labels."""

from __future__ import annotations

import pytest

from mapo_ray.config import ConfigError, load_config
from mapo_ray.reward import RewardInputError, load_reward_fn, response_label, score_label

EMOTIONS = ("amusement", "anger", "awe", "contentment", "disgust", "excitement", "fear", "sadness")


@pytest.mark.parametrize(
    ("response", "label"),
    [
        ("<think>smiles</think> \\boxed{Amusement}", "amusement"),
        ("<think>x</think> \\boxed{\\text{ Fear }}.", "fear"),
        ("\\boxed{awe} hmm, rather \\boxed{anger}", "anger"),
        ("<think>dark sky</think>\n Sadness.\n", "sadness"),  # no box: the text after </think>
        ("  DISGUST ", "disgust"),  # neither: the whole response
    ],
)
def test_where_the_label_is_read(response, label):
    assert response_label(response) == label


def test_scores_are_case_insensitive_and_weighted():
    correct = score_label("<think>bright</think> \\boxed{EXCITEMENT}", "Excitement", labels=EMOTIONS)
    assert correct == {"overall": 1.0, "format": 1.0, "accuracy": 1.0}
    wrong = score_label("<think>bright</think> \\boxed{awe}", "excitement", labels=EMOTIONS)
    assert wrong == {"overall": pytest.approx(0.1), "format": 1.0, "accuracy": 0.0}
    unboxed = score_label("<think>calm</think> contentment", "contentment", labels=EMOTIONS)
    assert unboxed == {"overall": pytest.approx(0.9), "format": 0.0, "accuracy": 1.0}
    not_a_label = score_label("\\boxed{joy}", "awe", labels=EMOTIONS)
    assert not_a_label["accuracy"] == 0.0


def test_a_reference_label_outside_the_set_is_an_error_naming_it():
    with pytest.raises(RewardInputError, match=r"reference label 'joy' is not in the label set \['amusement'"):
        score_label("\\boxed{joy}", "joy", labels=EMOTIONS)


def test_label_grader_from_config():
    cfg = load_config(overrides=["reward.function=label", f"reward.labels=[{', '.join(EMOTIONS)}]"])
    fn = load_reward_fn(cfg.reward)
    assert fn("<think>t</think>\\boxed{Fear}", "fear")["overall"] == 1.0
    with pytest.raises(ConfigError, match=r"reward\.labels must be a non-empty set of distinct labels"):
        load_config(overrides=["reward.function=label", "reward.labels=[Fear, fear]"])
    with pytest.raises(ConfigError, match=r"reward\.labels must be a non-empty"):
        load_config(overrides=["reward.function=label"])
    with pytest.raises(ConfigError, match=r"reward\.labels is only read by reward\.function 'label'"):
        load_config(overrides=["reward.labels=[fear]"])
