"""This process's random number generator states, as a dict that ``torch.load(weights_only=True)`` reads back."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def rng_state() -> dict[str, Any]:
    """States of Python's, NumPy's, torch's CPU and (when present) every CUDA generator."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        # As a tensor: a plain ndarray would need an unsafe (pickle) load.
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` returned (the CUDA states only where the device count matches)."""
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        if len(state["cuda"]) != torch.cuda.device_count():
            raise ValueError(
                f"the saved RNG state covers {len(state['cuda'])} CUDA device(s), this process sees "
                f"{torch.cuda.device_count()}"
            )
        torch.cuda.set_rng_state_all(state["cuda"])
