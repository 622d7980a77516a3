"""What the learner sends from a plain (not ZeRO-3) module; ZeRO-3 is in tests/integration/test_weight_sync.py."""

from __future__ import annotations

import torch

from mapo_ray.sync import TensorSpec, named_parameters_for_sync, parameter_specs


class TiedLM(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.vision = torch.nn.Linear(4, 4).to(torch.bfloat16)
        self.head = torch.nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight  # tied, as in the tiny Qwen2.5-VL
        self.vision.requires_grad_(False)  # a frozen tower


def test_specs_and_tensors_agree_in_order_and_list_tied_weights_once():
    model = TiedLM()
    specs = parameter_specs(model)
    assert specs == [
        TensorSpec("embed.weight", (10, 4), "float32"),
        TensorSpec("vision.weight", (4, 4), "bfloat16"),
        TensorSpec("vision.bias", (4,), "bfloat16"),
    ]
    # A gather size smaller than any tensor still yields each one, whole and in order.
    tensors = list(named_parameters_for_sync(model, gather_bytes=1))
    assert [n for n, _ in tensors] == [s.name for s in specs]
    for (name, tensor), (_, param) in zip(tensors, model.named_parameters()):
        assert tensor.data_ptr() == param.data_ptr() and not tensor.requires_grad, name


def test_trainable_only_skips_frozen_parameters():
    model = TiedLM()
    assert [s.name for s in parameter_specs(model, trainable_only=True)] == ["embed.weight"]
    assert [n for n, _ in named_parameters_for_sync(model, 1 << 20, trainable_only=True)] == ["embed.weight"]
