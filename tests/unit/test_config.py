"""The typed config tree: presets, YAML, dotted overrides and the errors they give."""

from __future__ import annotations

import pytest

from mapo_ray.config import PRESETS, Config, ConfigError, from_dict, load_config, to_dict


def test_defaults_and_layering(tmp_path):
    assert load_config() == Config()
    path = tmp_path / "run.yaml"
    path.write_text("seed: 7\nalgo:\n  estimator: grpo\n  clip_ratio_high: 0.28\n")
    cfg = load_config(path, preset="geo3k-qwen25vl-7b", overrides=["algo.estimator=dr_grpo", "algo.eps=1e-8"])
    assert cfg.seed == 7
    assert cfg.algo.estimator == "dr_grpo"  # --set beats the file, which beats the preset
    assert cfg.algo.clip_ratio_high == 0.28
    assert cfg.algo.eps == 1e-8 and isinstance(cfg.algo.eps, float)
    assert cfg.algo.kl_coef == 1e-2


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_loads_and_round_trips(name):
    cfg = load_config(preset=name)
    assert from_dict(Config, to_dict(cfg)) == cfg


def test_presets_are_not_mutated_by_overrides():
    before = repr(PRESETS)
    load_config(preset="cpu-tiny", overrides=["algo.kl_coef=0.5", "algo.estimator=grpo"])
    assert repr(PRESETS) == before


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["algo.estimater=grpo"], r"unknown config key 'algo\.estimater'; did you mean 'algo\.estimator'\?"),
        (["algorithm.estimator=grpo"], r"unknown config key 'algorithm'; did you mean 'algo'\?"),
        (["algo.eps=small"], r"config key 'algo\.eps': value 'small' \(str\) is not of type float"),
        (["algo.kl_coef=true"], r"config key 'algo\.kl_coef': value True \(bool\) is not of type float"),
        (["seed=1.5"], r"config key 'seed': value 1\.5 \(float\) is not of type int"),
        (["algo.std=sample"], r"'algo\.std'.*one of 'population', 'unbiased'"),
        (["algo.dual_clip_c=off"], r"'algo\.dual_clip_c'.*float \| None"),
        (["algo=grpo"], r"config key 'algo' is a section"),
        (["algo.estimator=mapoo"], r"algo\.estimator: unknown advantage estimator 'mapoo'; did you mean 'mapo'\?"),
        (["algo.kl_estimator=k4"], r"algo\.kl_estimator: unknown KL estimator 'k4'"),
        (["algo.estimator"], r"not of the form key=value"),
        (["data.synthetic_kinds=[fill, circles]"], r"data\.synthetic_kinds: .*unknown kind\(s\) \['circles'\]"),
    ],
)
def test_errors_name_the_key_value_and_expected(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides)


def test_null_and_unknown_preset_and_bad_file(tmp_path):
    assert load_config(overrides=["algo.dual_clip_c=null"]).algo.dual_clip_c is None
    with pytest.raises(ConfigError, match=r"unknown preset 'cpu-tinny'; did you mean 'cpu-tiny'\?"):
        load_config(preset="cpu-tinny")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: top level must be a mapping"):
        load_config(bad)
