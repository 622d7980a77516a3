"""The ``sync`` section of the config tree."""

from __future__ import annotations

import pytest

from mapo_ray.config import ConfigError, load_config


def test_sync_section_reads_and_converts():
    cfg = load_config(overrides=["sync.backend=gloo", "sync.bucket_mb=0.5", "sync.trainable_only=true"])
    assert cfg.sync.backend == "gloo" and cfg.sync.trainable_only
    assert cfg.sync.bucket_bytes == 512 * 1024


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("sync.bucket_mb=0", r"sync\.bucket_mb must be positive, got 0"),
        ("sync.timeout_s=-1", r"sync\.timeout_s must be positive, got -1"),
        ("sync.backend=mpi", r"'sync\.backend'.*one of 'auto', 'nccl', 'gloo'"),
        ("sync.bucket=64", r"unknown config key 'sync\.bucket'; did you mean 'sync\.bucket_mb'\?"),
    ],
)
def test_bad_sync_settings_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[override])
