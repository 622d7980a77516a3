"""Weight sync: a process group of its own from learner rank 0 to every rollout worker,
and a bucketed broadcast of the policy weights over it.

- ``plan``: which tensor goes in which bucket at which offset (pure, no group)
- ``group``: the group itself, built without touching ``torch.distributed``'s default group;
  its store listens on the group's host only and admits only holders of the group's secret
- ``sealed``: the store view that seals every value with that secret
- ``sender`` / ``receiver``: the two ends, plain torch (no Ray), so a receiver can live
  in a Ray actor or inside a vLLM worker process
- ``params``: a model's parameters to send, ZeRO-3 partitions gathered chunk by chunk
- ``ray_sync``: learner rank 0 driving the rollout actors through Ray, with named failures

``RayWeightSync`` is imported from ``mapo_ray.sync.ray_sync``: this package itself
does not import Ray, so a vLLM worker can import the receiver without it.
"""

from mapo_ray.sync.errors import NotInGroupError, WeightSyncError
from mapo_ray.sync.group import GroupAddress, SyncGroup
from mapo_ray.sync.params import named_parameters_for_sync, parameter_specs
from mapo_ray.sync.plan import Bucket, Slot, SyncPlan, TensorSpec, plan_buckets, slot_view, tensor_spec
from mapo_ray.sync.receiver import LoadWeights, WeightReceiver
from mapo_ray.sync.sender import WeightSender

__all__ = [
    "Bucket",
    "GroupAddress",
    "LoadWeights",
    "NotInGroupError",
    "Slot",
    "SyncGroup",
    "SyncPlan",
    "TensorSpec",
    "WeightReceiver",
    "WeightSender",
    "WeightSyncError",
    "named_parameters_for_sync",
    "parameter_specs",
    "plan_buckets",
    "slot_view",
    "tensor_spec",
]
