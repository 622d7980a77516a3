"""The ``data`` section of the config tree."""

from __future__ import annotations

import pytest

from mapo_ray.config import ConfigError, load_config
from mapo_ray.data.pipeline import pixel_budget


def test_data_section_reads_overrides_into_the_pixel_budget():
    config = load_config(overrides=["data.layout=emoset", "data.train=/data/emo.jsonl", "data.max_pixels=50176"])
    assert config.data.layout == "emoset" and config.data.train == "/data/emo.jsonl"
    budget = pixel_budget(config.data)
    assert (budget.min_pixels, budget.max_pixels) == (3136, 50176)


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("data.max_pixel=1", "did you mean 'data.max_pixels'"),
        ("data.max_pixels=100", "data.max_pixels"),
        ("data.min_pixels=99999999", "data.max_pixels"),
        ("data.rows_per_block=0", "data.rows_per_block"),
        ("data.layout=coco", "data.layout"),
    ],
)
def test_bad_data_settings_name_their_key(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        load_config(overrides=[override])
