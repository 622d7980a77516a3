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


@pytest.mark.parametrize("name", ["geo3k-qwen25vl-7b", "emoset-qwen25vl-7b"])
def test_paper_presets_take_eight_gpus_with_vllm(name):
    cfg = load_config(preset=name)
    assert (cfg.rollout.engine, cfg.rollout.device) == ("vllm", "cuda")
    assert cfg.rollout.num_actors * cfg.rollout.gpus_per_actor + cfg.trainer.num_learners * cfg.trainer.gpus_per_learner == 8
    assert (cfg.rollout.group_size, cfg.trainer.prompts_per_step, cfg.learner.updates_per_step) == (12, 512, 4)
    assert (cfg.algo.kl_coef, cfg.algo.kl_estimator, cfg.algo.clip_ratio_high) == (1e-2, "low_var_kl", 0.3)


def test_one_gpu_preset_shares_its_gpu():
    """Learner and vLLM actor fit one GPU between them, and sync avoids NCCL (which refuses
    two ranks on one device)."""
    cfg = load_config(preset="geo3k-qwen25vl-3b-1gpu")
    assert (cfg.rollout.engine, cfg.rollout.device, cfg.rollout.num_actors, cfg.trainer.num_learners) == (
        "vllm",
        "cuda",
        1,
        1,
    )
    assert cfg.rollout.gpus_per_actor + cfg.trainer.gpus_per_learner <= 1.0
    assert cfg.rollout.sleep_between_rollouts
    assert cfg.sync.backend == "gloo"
    assert cfg.trainer.use_gpu


@pytest.mark.parametrize(
    ("overrides", "gpus"),
    [
        ([], 0.0),  # a CPU actor reserves no GPU
        (["rollout.engine=vllm", "rollout.device=cuda", "rollout.tensor_parallel_size=2"], 2.0),
        (["rollout.device=cuda", "rollout.num_gpus_per_actor=0.25"], 0.25),
    ],
)
def test_rollout_gpus_per_actor(overrides, gpus):
    assert load_config(overrides=overrides).rollout.gpus_per_actor == gpus


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["rollout.num_gpus_per_actor=0.5"], r"rollout\.num_gpus_per_actor is only read with rollout\.device 'cuda'"),
        (["rollout.device=cuda", "rollout.num_gpus_per_actor=0"], r"rollout\.num_gpus_per_actor must be positive"),
        (
            [
                "rollout.engine=vllm",
                "rollout.device=cuda",
                "rollout.tensor_parallel_size=2",
                "rollout.num_gpus_per_actor=1",
            ],
            r"tensor-parallel workers less than a GPU each",
        ),
        (["trainer.gpus_per_learner=0"], r"trainer\.gpus_per_learner must be positive"),
    ],
)
def test_gpu_share_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides)
