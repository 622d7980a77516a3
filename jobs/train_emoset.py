"""Train a vision-language policy on EmoSet-layout data (an image and an emotion label per row).

    python jobs/train_emoset.py --set data.train=/data/emoset/train.parquet --set data.test=/data/emoset/test.parquet
    ray job submit --working-dir . -- python jobs/train_emoset.py --set data.train=s3://bucket/emoset/train

The recipe is the Geo3K one; the preset ``emoset-qwen25vl-7b`` switches the data layout
to EmoSet's and the reward to the label grader over the eight emotions.
Options: --config FILE, --preset NAME, --set key=value (repeatable), --resume, --output.
"""

from __future__ import annotations

from train_geo3k import main

if __name__ == "__main__":
    main(__doc__, default_preset="emoset-qwen25vl-7b")
