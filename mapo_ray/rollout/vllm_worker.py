"""The vLLM worker side of weight updates, mixed into each worker by ``worker_extension_cls``.

vLLM makes this class a base of its worker class, so ``self`` is the worker: ``self.rank``
is its rank in vLLM's own group (0..TP-1), ``self.device`` its device, and
``self.reload_weights`` loads ``(name, tensor)`` pairs in place through the model's
weight loaders (which shard for tensor parallelism and map HF names) and clears the
encoder and multimodal caches built from old weights. ``VLLMEngine`` calls these
methods through ``LLM.collective_rpc``; their names are prefixed because they share a
namespace with the worker's own.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable

import safetensors.torch
import torch

from mapo_ray.sync.group import GroupAddress
from mapo_ray.sync.plan import SyncPlan
from mapo_ray.sync.receiver import WeightReceiver


class WeightSyncExtension:
    """Worker methods: join the weight-sync group, receive an update, load a pickled update."""

    def mapo_join_weight_sync(self, pickled_address: bytes, first_rank: int) -> None:
        """Join as rank ``first_rank + self.rank``; blocks until every rank has joined."""
        address: GroupAddress = pickle.loads(pickled_address)
        previous = getattr(self, "_mapo_receiver", None)
        if previous is not None:
            previous.close()  # a group is rebuilt after a failure; leave the old one first
        device = self.device if address.backend == "nccl" else torch.device("cpu")
        self._mapo_receiver = WeightReceiver.join(address, first_rank + self.rank, device)

    def mapo_receive_weights(self, pickled_plan: bytes) -> int:
        """Receive and load one update; returns its version."""
        receiver = getattr(self, "_mapo_receiver", None)
        if receiver is None:
            raise RuntimeError(f"vLLM worker {self.rank}: receive_weights before join_weight_sync")
        plan: SyncPlan = pickle.loads(pickled_plan)
        return receiver.receive(plan, self._mapo_reload)

    def mapo_load_weights(self, blob: bytes) -> None:
        """Load an update sent as one safetensors blob (``VLLMEngine.load_weights``)."""
        self._mapo_reload(safetensors.torch.load(blob).items())

    def _mapo_reload(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        self.reload_weights(weights_iterator=weights)
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            # vLLM's CPU build packs every embedding matrix for its GEMM at load time. A tied
            # lm_head gets no tensor of its own in a reload, so its packed copy would keep the
            # old weights: pack again from the shared, updated matrix.
            from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

            for module in self.model_runner.get_model().modules():
                if isinstance(getattr(module, "quant_method", None), UnquantizedEmbeddingMethod):
                    module.quant_method.process_weights_after_loading(module)
