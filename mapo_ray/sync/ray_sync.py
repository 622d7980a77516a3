"""Learner rank 0 drives weight sync to the rollout actors through Ray.

Each rollout actor is a Ray actor with these two methods (the rollout package
implements them around ``WeightReceiver``; an actor may own several ranks, e.g. one
per vLLM tensor-parallel worker, ranks ``first_rank .. first_rank + ranks_per_actor - 1``)::

    def join_weight_sync(self, address: GroupAddress, first_rank: int) -> None: ...
    def receive_weights(self, plan: SyncPlan) -> int: ...  # the version it loaded

The ``GroupAddress`` of ``join_weight_sync`` carries the group's secret, so the store
on learner rank 0's node IP (``ray.util.get_node_ip_address``, where it alone listens)
admits only the actors that Ray's authenticated channel reached (see ``group``).

The update's metadata (the ``SyncPlan``: names, shapes, dtypes, bucket offsets and
version) rides on the ``receive_weights`` call itself. That call has to be made
anyway to tell the actor to start receiving, so the plan costs no extra round trip
or collective, and the receiver knows every bucket size before the first byte
arrives (it posts bucket k+1 while loading bucket k).

Usage on learner rank 0 (``actors`` reach it through ``train_loop_config``)::

    sync = RayWeightSync(config.sync)
    sync.connect({"rollout-0": handle0, "rollout-1": handle1})
    version = sync.sync_model(model)       # after each optimizer step

Every wait has the configured time-out. When something fails, every actor's call is
inspected so the error names who died, who raised what, and who never answered; it
comes within about twice the time-out (the failing step, then the actors' answers),
usually at once, since a dead peer resets its connections. The group is then gone:
``connect`` again, e.g. with the survivors, or with the actors the error lists as
``lost`` once Ray has restarted them (``RolloutCoordinator.sync_weights`` does). The
learner has gone through all its parameters by then, so under ZeRO-3 the other ranks'
gathers end too. ``version`` counts updates that every actor loaded, so a failed
update's number is used again by the next one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import ray
import torch
from ray.actor import ActorHandle
from ray.exceptions import RayActorError
from ray.util import get_node_ip_address

from mapo_ray.config import SyncConfig
from mapo_ray.sync.errors import NotInGroupError, WeightSyncError, first_line
from mapo_ray.sync.group import Backend, GroupAddress
from mapo_ray.sync.params import named_parameters_for_sync, parameter_specs
from mapo_ray.sync.plan import TensorSpec
from mapo_ray.sync.sender import WeightSender


class RayWeightSync:
    """Weight sync from this process (learner rank 0) to the named rollout actors."""

    def __init__(self, config: SyncConfig) -> None:
        self.config = config
        self.actors: dict[str, ActorHandle] = {}
        self.version = 0  # the last version every actor loaded; kept across reconnects
        self._sender: WeightSender | None = None

    @property
    def backend(self) -> Backend:
        if self.config.backend != "auto":
            return self.config.backend
        return "nccl" if torch.cuda.is_available() else "gloo"

    @property
    def connected(self) -> bool:
        """A group is formed (``connect`` succeeded and no update failed since)."""
        return self._sender is not None

    @property
    def address(self) -> GroupAddress | None:
        """The address of the group the actors joined; None before ``connect`` and after a failure."""
        return self._sender.address if self._sender is not None else None

    def connect(self, actors: Mapping[str, ActorHandle], ranks_per_actor: int = 1) -> None:
        """Form a new group with ``actors`` (name -> handle), each owning ``ranks_per_actor`` ranks.

        Raises ``WeightSyncError`` naming every actor that did not join. Call it again,
        e.g. with the survivors, after any failure.
        """
        if not actors:
            raise WeightSyncError("weight sync needs at least one rollout actor")
        self.close()
        self.actors = dict(actors)
        sender = WeightSender(
            1 + len(self.actors) * ranks_per_actor,
            self.config.bucket_bytes,
            backend=self.backend,
            timeout_s=self.config.timeout_s,
            # This node's address as Ray knows it (ray start --node-ip-address): the actors dial it.
            host=get_node_ip_address(),
            version=self.version,
        )
        first_ranks = {name: 1 + i * ranks_per_actor for i, name in enumerate(self.actors)}
        member_names = {
            rank: f"{name!r} rank {rank}"
            for name, first in first_ranks.items()
            for rank in range(first, first + ranks_per_actor)
        }
        refs = {
            self.actors[name].join_weight_sync.remote(sender.address, first): name
            for name, first in first_ranks.items()
        }
        self._sender = sender
        cause = None
        try:
            sender.connect(member_names)
        except WeightSyncError as err:
            self.close()  # ranks already waiting in the backend's connect fail at once
            cause = err
        self._finish(refs, "joining the weight-sync group", cause)

    def sync(
        self, specs: Iterable[TensorSpec], named_tensors: Iterable[tuple[str, torch.Tensor]], *, again: bool = False
    ) -> int:
        """Send one update (``named_tensors`` in ``specs`` order) to every actor; returns its version.

        ``again``: these are the weights of ``version`` already, sent once more under
        that number (to an actor restarted since, after ``connect``). After a
        ``WeightSyncError`` the group is gone: ``connect`` again (with the surviving
        actors) before the next update.
        """
        if self._sender is None:
            raise WeightSyncError("weight sync is not connected; call connect() first")
        plan = self._sender.plan(specs, version=self.version if again else None)
        refs = {actor.receive_weights.remote(plan): name for name, actor in self.actors.items()}
        tensors = iter(named_tensors)
        cause = None
        try:
            self._sender.send(plan, tensors)
        except WeightSyncError as err:
            cause = err
            # Under ZeRO-3 every learner rank gathers each parameter with this one: take
            # the rest of them, or the other ranks would wait in a gather forever.
            for _ in tensors:
                pass
        loaded = self._finish(refs, f"weight update v{plan.version}", cause)
        wrong = {name: v for name, v in loaded.items() if v != plan.version}
        if wrong:
            self.close()
            raise WeightSyncError(f"weight update v{plan.version}: actors report other versions: {wrong}")
        self.version = plan.version
        return plan.version

    def sync_model(self, model: torch.nn.Module, *, again: bool = False) -> int:
        """``sync`` of ``model``'s parameters; under ZeRO-3 the other learner ranks must drain
        ``named_parameters_for_sync(model, config.bucket_bytes, config.trainable_only)`` meanwhile."""
        trainable_only = self.config.trainable_only
        return self.sync(
            parameter_specs(model, trainable_only),
            named_parameters_for_sync(model, self.config.bucket_bytes, trainable_only),
            again=again,
        )

    def close(self) -> None:
        if self._sender is not None:
            self._sender.close()
            self._sender = None

    def _finish(self, refs: dict[ray.ObjectRef, str], what: str, cause: WeightSyncError | None) -> dict[str, object]:
        """Each actor's result, or ``WeightSyncError`` naming every actor that failed and why.

        On failure the sender has already closed its end, so actors blocked in a
        collective with it fail at once; a hung one is given the time-out.
        """
        ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=self.config.timeout_s)
        results: dict[str, object] = {}
        died, raised, lost = [], [], []
        for ref in ready:
            try:
                results[refs[ref]] = ray.get(ref)
            except RayActorError as err:
                lost.append(refs[ref])
                died.append(f"{refs[ref]!r} died ({type(err).__name__})")
            except Exception as err:  # the actor's own exception, wrapped in a RayTaskError
                actor_error = getattr(err, "cause", None)
                if isinstance(actor_error, NotInGroupError):  # died and restarted since it joined
                    lost.append(refs[ref])
                raised.append(f"{refs[ref]!r} raised {first_line(actor_error or err)}")
        silent = [f"{refs[ref]!r} did not answer within {self.config.timeout_s:g}s" for ref in pending]
        problems = died + raised + silent + ([f"learner {first_line(cause)}"] if cause else [])
        if problems:
            self.close()
            raise WeightSyncError(f"{what} failed: " + "; ".join(problems), lost=tuple(lost)) from cause
        return results
