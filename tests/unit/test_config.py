"""The typed config tree: presets, YAML, dotted overrides and the errors they give."""

from __future__ import annotations

import pytest

from mapo_ray.config import PRESETS, Config, ConfigError, from_dict, load_config, to_dict
from mapo_ray.job import check_names


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
        (["algo.dual_clip_c=yes"], r"'algo\.dual_clip_c'.*float \| one of False \| None"),
        (["algo=grpo"], r"config key 'algo' is a section"),
        (["algo.estimator=mapoo"], r"algo\.estimator: unknown advantage estimator 'mapoo'; did you mean 'mapo'\?"),
        (["algo.kl_estimator=k4"], r"algo\.kl_estimator: unknown KL estimator 'k4'"),
        (["algo.estimator"], r"not of the form key=value"),
        (["data.synthetic_kinds=[fill, circles]"], r"data\.synthetic_kinds: .*unknown kind\(s\) \['circles'\]"),
    ],
)
def test_errors_name_the_key_value_and_expected(overrides, message):
    # load_config checks keys, types and values; check_names the registered names (a job runs both).
    with pytest.raises(ConfigError, match=message):
        check_names(load_config(overrides=overrides))


def test_null_and_unknown_preset_and_bad_file(tmp_path):
    assert load_config(overrides=["algo.dual_clip_c=null"]).algo.dual_clip_c is None
    assert load_config(overrides=["algo.dual_clip_c=false"]).algo.dual_clip_c is False
    with pytest.raises(ConfigError, match=r"unknown preset 'cpu-tinny'; did you mean 'cpu-tiny'\?"):
        load_config(preset="cpu-tinny")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: top level must be a mapping"):
        load_config(bad)
    broken = tmp_path / "broken.yaml"
    broken.write_text("algo:\n  estimator: [mapo\n")
    with pytest.raises(ConfigError, match=r"(?s)config file .*broken\.yaml is not valid YAML: .*broken\.yaml\", line 2"):
        load_config(broken)
    with pytest.raises(ConfigError, match=r"config file .*missing\.yaml: No such file"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["trainer.prompts_per_step=2", "trainer.num_learners=4"],
            r"trainer\.prompts_per_step \(2\) must be >= trainer\.num_learners \(4\)",
        ),
        (
            ["trainer.prompts_per_step=2", "rollout.group_size=2", "learner.updates_per_step=5"],
            r"learner\.updates_per_step \(5\) x trainer\.num_learners \(1\).*gives 4",
        ),
    ],
)
def test_batch_arithmetic_that_cannot_work_is_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(preset="cpu-tiny", overrides=overrides)
    # The boundary works: 4 samples, 4 mini-batches of one.
    load_config(preset="cpu-tiny", overrides=["trainer.prompts_per_step=2", "rollout.group_size=2", "learner.updates_per_step=4"])


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


def test_custom_resources_place_each_kind_of_worker():
    cfg = load_config(
        overrides=[
            "rollout.resources={rollout_node: 1}",
            "reward.resources={rollout_node: 0.01}",
            "trainer.resources_per_learner={learner_node: 1}",
        ]
    )
    assert cfg.rollout.resources == {"rollout_node": 1.0} and isinstance(cfg.rollout.resources["rollout_node"], float)
    assert cfg.reward.resources == {"rollout_node": 0.01}
    assert cfg.trainer.resources_per_learner == {"learner_node": 1.0}
    assert Config().rollout.resources == Config().reward.resources == Config().trainer.resources_per_learner == {}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("rollout.resources={CPU: 1}", r"rollout\.resources holds custom Ray resources; 'CPU' is not one"),
        ("reward.resources={memory: 1000}", r"reward\.resources holds custom Ray resources; 'memory' is not one"),
        ("trainer.resources_per_learner={GPU: 1}", r"trainer\.resources_per_learner .*'GPU' is not one"),
        ("rollout.resources={node_a: 0}", r"rollout\.resources: resource 'node_a' must be a finite amount >= 0\.0001"),
        ("reward.resources={node_a: .nan}", r"reward\.resources: resource 'node_a' must be a finite amount"),
        ("trainer.resources_per_learner={node_a: -1}", r"trainer\.resources_per_learner: resource 'node_a'"),
        ("rollout.resources={node_a: many}", r"config key 'rollout\.resources': value \{'node_a': 'many'\}"),
        ("rollout.resources=[node_a]", r"config key 'rollout\.resources': value \['node_a'\] \(list\)"),
    ],
)
def test_custom_resources_are_checked(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[override])


@pytest.mark.parametrize(
    ("override", "key", "allowed"),
    [
        ("algo.clip_ratio_low=-0.1", "algo.clip_ratio_low", r"\[0, 1\)"),
        ("algo.clip_ratio_low=1.0", "algo.clip_ratio_low", r"\[0, 1\)"),
        ("algo.clip_ratio_high=1.5", "algo.clip_ratio_high", r"\[0, 1\)"),
        ("algo.clip_ratio_high=.nan", "algo.clip_ratio_high", r"\[0, 1\)"),
        ("algo.dual_clip_c=1.0", "algo.dual_clip_c", r"> 1"),
        ("algo.dual_clip_c=0.5", "algo.dual_clip_c", r"> 1"),
        ("algo.kl_coef=-0.01", "algo.kl_coef", r">= 0"),
        ("algo.kl_coef=.inf", "algo.kl_coef", r">= 0"),
        ("algo.eps=0", "algo.eps", r"> 0"),
        ("algo.eps=-1e-6", "algo.eps", r"> 0"),
        ("algo.success_threshold=0", "algo.success_threshold", r"\(0, 1\]"),
        ("algo.success_threshold=1.5", "algo.success_threshold", r"\(0, 1\]"),
        ("algo.overlong_buffer_len=0", "algo.overlong_buffer_len", r"positive"),
        ("algo.overlong_buffer_len=4096", "algo.overlong_buffer_len", r"rollout\.max_new_tokens = 2048"),
        ("algo.overlong_penalty_factor=-1", "algo.overlong_penalty_factor", r">= 0"),
        ("rollout.group_size=1", "rollout.group_size", r">= 2 for the group estimator"),
        ("learner.lr=0", "learner.lr", r"> 0"),
        ("learner.lr=.nan", "learner.lr", r"> 0"),
        ("learner.lr=.inf", "learner.lr", r"> 0"),
        ("trainer.eval_temperature=-0.5", "trainer.eval_temperature", r">= 0"),
        ("trainer.eval_top_p=0", "trainer.eval_top_p", r"\(0, 1\]"),
        ("trainer.eval_top_p=1.2", "trainer.eval_top_p", r"\(0, 1\]"),
        ("trainer.eval_max_new_tokens=0", "trainer.eval_max_new_tokens", r"positive or null"),
        ("trainer.total_epochs=0", "trainer.total_epochs", r"exactly one of|positive"),
        ("data.max_prompt_tokens=0", "data.max_prompt_tokens", r"positive or null"),
    ],
)
def test_every_algorithm_setting_is_range_checked(override, key, allowed):
    """A bad value is a ConfigError naming its key and the allowed range, before anything starts."""
    overrides = [override]
    if override.startswith("trainer.total_epochs"):
        overrides.append("trainer.total_steps=null")
    with pytest.raises(ConfigError, match=rf"{key.replace('.', chr(92) + '.')}.*{allowed}"):
        load_config(overrides=overrides)


def test_group_size_check_spans_sections_and_names_the_estimator():
    with pytest.raises(ConfigError, match=r"rollout\.group_size.*'grpo'"):
        load_config(overrides=["algo.estimator=grpo", "rollout.group_size=1"])
    # Greedy training rollouts give one response per prompt: no group to compare with.
    with pytest.raises(ConfigError, match=r"group_size"):
        load_config(overrides=["rollout.temperature=0", "rollout.group_size=1"])


def test_run_length_is_steps_or_epochs_never_both():
    with pytest.raises(ConfigError, match=r"exactly one of trainer\.total_steps and trainer\.total_epochs"):
        load_config(overrides=["trainer.total_epochs=2"])
    with pytest.raises(ConfigError, match=r"exactly one of"):
        load_config(overrides=["trainer.total_steps=null"])
    cfg = load_config(overrides=["trainer.total_epochs=2.5", "trainer.total_steps=null"])
    assert (cfg.trainer.total_steps, cfg.trainer.total_epochs) == (None, 2.5)


def test_resolve_run_length_counts_steps_from_epochs():
    from mapo_ray.loop import resolve_run_length

    cfg = load_config(overrides=["trainer.total_epochs=15", "trainer.total_steps=null"])
    resolved = resolve_run_length(cfg, train_rows=2101)
    # ceil(15 * 2101 / 512) = ceil(61.55)
    assert (resolved.trainer.total_steps, resolved.trainer.total_epochs) == (62, None)
    assert resolve_run_length(load_config(), train_rows=2101) == load_config()
    tiny = load_config(overrides=["trainer.total_epochs=0.01", "trainer.total_steps=null"])
    assert resolve_run_length(tiny, train_rows=10).trainer.total_steps == 1


def test_paper_preset_is_the_released_run():
    """geo3k-qwen25vl-7b: the released code's config (MAPO code/examples/config.yaml)."""
    cfg = load_config(preset="geo3k-qwen25vl-7b")
    assert cfg.algo.std == "unbiased"
    assert (cfg.data.min_pixels, cfg.data.max_pixels, cfg.data.max_prompt_tokens) == (262144, 4194304, 2048)
    assert cfg.trainer.eval_every == 5
    assert (cfg.trainer.total_steps, cfg.trainer.total_epochs) == (None, 15.0)
    emoset = load_config(preset="emoset-qwen25vl-7b")
    assert emoset.algo.std == "unbiased" and emoset.data.max_prompt_tokens == 2048
    # cpu-tiny is measured as it is: nothing of the paper's run leaks into it.
    tiny = load_config(preset="cpu-tiny")
    assert (tiny.algo.std, tiny.data.max_prompt_tokens, tiny.trainer.total_steps) == ("population", None, 40)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ([], (0.2, 0.3, 3.0, "token-mean")),
        (["algo.policy_loss=gspo"], (3e-4, 4e-4, None, "seq-mean-token-mean")),
        (["algo.policy_loss=gspo", "algo.clip_ratio_high=5e-4"], (3e-4, 5e-4, None, "seq-mean-token-mean")),
        (["algo.policy_loss=gspo", "algo.dual_clip_c=2.5"], (3e-4, 4e-4, 2.5, "seq-mean-token-mean")),
        (["algo.dual_clip_c=false"], (0.2, 0.3, None, "token-mean")),
        (["algo.loss_agg_mode=seq-mean-token-sum"], (0.2, 0.3, 3.0, "seq-mean-token-sum")),
    ],
)
def test_policy_loss_settings_default_to_the_chosen_loss(overrides, expected):
    from mapo_ray.algo import policy_loss_settings

    settings = policy_loss_settings(load_config(overrides=overrides).algo)
    assert (settings.clip_low, settings.clip_high, settings.dual_clip_c, settings.agg_mode) == expected


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_keep_their_effective_policy_loss(name):
    """Every preset trains PPO exactly as before the keys became null by default."""
    from mapo_ray.algo import policy_loss_settings

    settings = policy_loss_settings(load_config(preset=name).algo)
    assert (settings.clip_low, settings.clip_high, settings.dual_clip_c, settings.agg_mode) == (
        0.2,
        0.3,
        3.0,
        "token-mean",
    )
