"""The advantage core on a CUDA device gives what it gives on the CPU."""

from __future__ import annotations

import pytest
import torch

from mapo_ray.algo import ADVANTAGE_ESTIMATORS, compute_advantages, expand_to_tokens

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; none is visible"),
]


@pytest.mark.parametrize("estimator", ADVANTAGE_ESTIMATORS.names())
def test_cuda_matches_cpu(estimator):
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(512 * 12, generator=g).round(decimals=1)
    groups = torch.randperm(512 * 12, generator=g) % 512  # groups scattered over the batch
    cpu = compute_advantages(scores, groups, estimator, generator=torch.Generator().manual_seed(1))
    cuda = compute_advantages(
        scores.cuda(), groups.cuda(), estimator, generator=torch.Generator("cuda").manual_seed(1)
    )
    assert cuda.device.type == "cuda" and cuda.dtype == torch.float32
    if estimator != "mapo_random":  # CPU and CUDA generators draw different streams
        torch.testing.assert_close(cuda.cpu(), cpu)
    mask = torch.rand(scores.numel(), 64, device="cuda") > 0.3
    torch.testing.assert_close(expand_to_tokens(cuda, mask).cpu(), expand_to_tokens(cuda.cpu(), mask.cpu()))
