"""``Learner``: the policy under DeepSpeed on one rank, and the PPO/MAPO update of a rollout batch.

One per rank of a torch.distributed world: each Ray Train ``TorchTrainer`` worker
builds one inside ``train_loop_per_worker`` (or a lone process after
``init_single_process``). Every method that runs the model is collective: all ranks
call it, in step, with their own shard. A training step on each rank::

    batch = shard.experiences(timeout_s)        # this rank's whole groups (mapo_ray.coordinator)
    advantages = learner.advantages(batch)      # of those groups, exactly as the whole batch's
    metrics = learner.update(batch, advantages)

Each rank holds whole groups, so per-group statistics never see a partial group
however the batch is split, and a rank's advantages need no other rank's samples.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, PreTrainedModel

from mapo_ray.algo import (
    compute_advantages,
    compute_policy_loss,
    expand_to_tokens,
    overlong_penalty,
    policy_loss_settings,
)
from mapo_ray.config import Config, resolve_rollout_correction
from mapo_ray.learner.collate import PolicyInputs, VisionInput, collate, encode_images
from mapo_ray.learner.deepspeed_setup import build_policy_engine, build_reference, load_model
from mapo_ray.learner.experience import Experience, split_minibatches, token_budget_micro_batches
from mapo_ray.learner.logprobs import ResponseLogProbs
from mapo_ray.learner.rng import rng_state, set_rng_state
from mapo_ray.models.folder import model_folder_here
from mapo_ray.sync import named_parameters_for_sync
from mapo_ray.types import derive_seed

# DeepSpeed's checkpoint tag: a fixed name, so a folder holds exactly one learner state.
_CHECKPOINT_TAG = "learner"
# Loss metrics that are aggregated like the loss itself; the others are token means.
_LOSS_METRICS = ("pg_loss", "kl")


class Learner:
    """The policy (and frozen reference) of one rank, with its optimizer, schedule and step count.

    Args:
        config: the whole config; reads ``learner``, ``algo``, ``rollout.temperature``
            (the log-prob temperature), ``rollout.max_new_tokens`` (the fixed length of
            ``seq-mean-token-sum-norm``), ``sync`` and ``seed``.
        model_path: a Hugging Face folder: a Qwen2.5-VL-style model, or a causal LM.

    Raises:
        RuntimeError: when no torch.distributed group exists yet.
    """

    def __init__(self, config: Config, model_path: str | os.PathLike) -> None:
        if not dist.is_initialized():
            raise RuntimeError(
                "Learner needs a torch.distributed group: build it inside a Ray Train worker, "
                "or call mapo_ray.learner.init_single_process() first"
            )
        self.config = config
        self.rank = dist.get_rank()
        self.model_path = model_folder_here(model_path, f"learner rank {self.rank}")
        self.world_size = dist.get_world_size()
        self.step = 0  # completed ``update`` calls
        # "none", or the correction whose weights (pi_old / mu) enter every policy loss.
        self.rollout_correction = resolve_rollout_correction(config)
        cfg = config.learner
        temperature = config.rollout.temperature

        hf_config = AutoConfig.from_pretrained(model_path)
        multimodal = hasattr(hf_config, "vision_config")
        self.image_processor = AutoImageProcessor.from_pretrained(model_path) if multimodal else None
        self.image_token_id: int | None = hf_config.image_token_id if multimodal else None
        pad = hf_config.get_text_config().pad_token_id
        self.pad_token_id: int = 0 if pad is None else pad

        policy = ResponseLogProbs(load_model(model_path, cfg, trainable=True), temperature, cfg.logprob_chunk_tokens)
        self.engine = build_policy_engine(policy, cfg, self.world_size)
        self.device: torch.device = self.engine.device
        self.reference: nn.Module | None = None
        if config.algo.kl_coef > 0:
            frozen = load_model(model_path, cfg, trainable=False)
            reference = ResponseLogProbs(frozen, temperature, cfg.logprob_chunk_tokens)
            self.reference = build_reference(reference, cfg, self.world_size, self.device)

    @property
    def policy(self) -> PreTrainedModel:
        """The Hugging Face policy, parameters named as in its checkpoint (for ``RayWeightSync.sync_model``)."""
        return self.engine.module.model

    # ----------------------------------------------------------------- advantages

    def advantages(self, batch: Sequence[Experience]) -> torch.Tensor:
        """``batch_advantages`` of ``batch`` at this rank's step, on its device."""
        return batch_advantages(batch, self.config, self.step, self.device)

    # ----------------------------------------------------------------- log-probs

    @torch.no_grad()
    def compute_log_probs(self, batch: Sequence[Experience]) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probs and entropies of this rank's ``batch`` at the current weights.

        Returns two (N, L) float32 tensors on the learner device, L the longest response,
        0 past each response's end (``response_mask`` gives the valid positions).
        """
        vision = encode_images(batch, self.image_processor, self.image_token_id)
        log_probs, entropy = self._log_probs(self.engine, batch, vision, with_entropy=True)
        return log_probs, entropy

    def _log_probs(
        self, module: nn.Module, batch: Sequence[Experience], vision: Sequence[VisionInput | None], with_entropy: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(N, L) log-probs, and entropies when ``with_entropy``, of ``module`` (policy engine or reference)."""
        shape = (len(batch), max((len(e.response_ids) for e in batch), default=0))
        log_probs = torch.zeros(shape, device=self.device)
        entropy = torch.zeros(shape, device=self.device) if with_entropy else None
        module.eval()
        try:
            for part in self._micro_batches(batch):
                # An empty part runs one sample only to keep this rank in step with the others.
                lp, ent = module(self._collate(batch, vision, part or [0]), with_entropy=with_entropy)
                if part:
                    log_probs[part, : lp.shape[1]] = lp
                    if entropy is not None:
                        entropy[part, : ent.shape[1]] = ent
        finally:
            self.engine.train()  # the reference always stays in eval mode
        return log_probs, entropy

    def _micro_batches(self, batch: Sequence[Experience]) -> list[list[int]]:
        """Token-budget micro-batches of ``batch``, as many on every rank.

        ZeRO-2/3 run a collective in every forward or backward, so ranks must run the
        same number: each rank splits further to the largest count, and pads with
        empty parts (run on one sample with zero weight) if it runs out of samples.
        """
        prompt_lens = [len(e.prompt_ids) for e in batch]
        response_lens = [len(e.response_ids) for e in batch]
        budget = self.config.learner.micro_batch_tokens
        parts = token_budget_micro_batches(prompt_lens, response_lens, budget)
        count = torch.tensor(len(parts), device=self.device)
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        parts = token_budget_micro_batches(prompt_lens, response_lens, budget, min_count=int(count))
        return parts + [[] for _ in range(int(count) - len(parts))]

    def _collate(
        self, batch: Sequence[Experience], vision: Sequence[VisionInput | None], rows: list[int]
    ) -> PolicyInputs:
        inputs = collate(
            [batch[i] for i in rows],
            [vision[i] for i in rows],
            pad_token_id=self.pad_token_id,
            image_token_id=self.image_token_id,
        )
        return inputs.to(self.device)

    # ----------------------------------------------------------------- update

    @property
    def single_step(self) -> bool:
        """Whether an update is one optimizer step (one mini-batch, one epoch). Then the old
        policy is the current one: the step's forward gives the old log-probs, detached (the
        ratio is exactly 1), and the separate no-grad pass over the batch is skipped."""
        return self.config.learner.updates_per_step * self.config.learner.ppo_epochs == 1

    def update(self, batch: Sequence[Experience], advantages: torch.Tensor) -> dict[str, float]:
        """One PPO/MAPO update on this rank's shard ``batch`` (N) with its ``advantages`` (N,).

        Recomputes the old log-probs at the current weights (and the reference's when
        ``algo.kl_coef > 0``), then for each of ``learner.ppo_epochs`` passes takes one
        optimizer step per mini-batch (``learner.updates_per_step`` of them), each
        accumulated over token-budget micro-batches. Each micro-batch's loss is scaled
        so that the summed, rank-averaged gradient is that of the loss's aggregation
        (``algo.loss_agg_mode``, resolved by ``policy_loss_settings``) over the whole
        mini-batch across all ranks. When the update is a single step (``single_step``),
        the step's own forward gives the old log-probs instead.

        Returns metrics, equal on every rank: ``actor/pg_loss``, ``actor/kl`` (with a
        KL term), ``actor/clip_frac``, ``actor/dual_clip_frac`` (with dual-clip),
        ``actor/approx_kl`` (means over the update), ``actor/entropy`` (token mean
        before the update), ``actor/grad_norm`` (mean of the pre-clip norms),
        ``actor/lr`` (of the last step) and ``actor/rollout_logprob_abs_diff`` (token
        mean of |learner - sampler| log-prob before the update). On CUDA the cached
        memory is released afterwards (``release_cached_memory``).

        With a rollout correction (``rollout_correction`` is not "none", see
        ``resolve_rollout_correction``) the sampler's log-probs (``response_logprobs``,
        the behaviour policy mu) enter the loss: each token's surrogate is weighted by
        a function of pi_old / mu, pi_old being the old log-probs above (the proximal
        policy, also in the single-step path). Its metrics are token means over the
        update: ``actor/rollout_is_weight_mean`` and ``actor/rollout_is_truncated_frac``
        (``actor/rollout_is_masked_frac`` for "mask").
        """
        cfg = self.config.learner
        if advantages.shape != (len(batch),):
            raise ValueError(f"update: {len(batch)} experiences but advantages of shape {tuple(advantages.shape)}")
        bad = (~torch.isfinite(advantages)).nonzero().flatten()
        if bad.numel():
            raise ValueError(f"update: advantages must be finite; NaN or inf at positions {bad[:5].tolist()}")
        minibatches = split_minibatches(len(batch), cfg.updates_per_step)
        advantages = advantages.to(self.device, torch.float32)
        vision = encode_images(batch, self.image_processor, self.image_token_id)

        single_step = self.single_step
        with torch.no_grad():
            if single_step:  # filled by the step's forward
                shape = (len(batch), max(len(e.response_ids) for e in batch))
                old_log_probs, entropy = torch.zeros(shape, device=self.device), torch.zeros(shape, device=self.device)
            else:
                old_log_probs, entropy = self._log_probs(self.engine, batch, vision, with_entropy=True)
            ref_log_probs = None
            if self.reference is not None:
                ref_log_probs, _ = self._log_probs(self.reference, batch, vision, with_entropy=False)
        mask = _response_mask(batch, old_log_probs.shape[1], self.device)
        sampler = torch.zeros_like(old_log_probs)
        sampler[mask] = torch.tensor([p for e in batch for p in e.response_logprobs], device=self.device)
        behaviour = None if self.rollout_correction == "none" else sampler

        sums: dict[str, float] = {}
        grad_norms, lr = [], 0.0
        for _ in range(cfg.ppo_epochs):
            for minibatch in minibatches:
                step_sums, grad_norm, lr = self._optimizer_step(
                    batch,
                    vision,
                    minibatch,
                    advantages,
                    old_log_probs,
                    ref_log_probs,
                    entropy if single_step else None,
                    behaviour_log_probs=behaviour,
                )
                grad_norms.append(grad_norm)
                for name, value in step_sums.items():
                    sums[name] = sums.get(name, 0.0) + value
        steps = len(grad_norms)
        sums["entropy_sum"] = float((entropy * mask).sum())
        sums["logprob_diff_sum"] = float(((old_log_probs - sampler).abs() * mask).sum())
        sums["tokens"] = float(mask.sum())
        totals = self._sum_over_ranks(sums)
        self.step += 1
        self.release_cached_memory()

        metrics = {"actor/grad_norm": sum(grad_norms) / steps, "actor/lr": lr}
        tokens = totals.pop("tokens")
        metrics["actor/entropy"] = totals.pop("entropy_sum") / max(tokens, 1.0)
        metrics["actor/rollout_logprob_abs_diff"] = totals.pop("logprob_diff_sum") / max(tokens, 1.0)
        step_tokens = totals.pop("step_tokens")
        for name, value in totals.items():
            # Loss metrics are already shares of each step's global loss; the rest are token-weighted.
            metrics[f"actor/{name}"] = value / steps if name in _LOSS_METRICS else value / max(step_tokens, 1.0)
        return metrics

    def _optimizer_step(
        self,
        batch: Sequence[Experience],
        vision: Sequence[VisionInput | None],
        minibatch: list[int],
        advantages: torch.Tensor,
        old_log_probs: torch.Tensor,
        ref_log_probs: torch.Tensor | None,
        fill_entropy: torch.Tensor | None = None,
        behaviour_log_probs: torch.Tensor | None = None,
    ) -> tuple[dict[str, float], float, float]:
        """Forward/backward every micro-batch of ``minibatch`` (indices into ``batch``), then step.

        With ``fill_entropy`` (N, L), the update's only step: each forward first writes its
        detached log-probs into ``old_log_probs`` and its entropies into ``fill_entropy``.
        With ``behaviour_log_probs`` (N, L), the sampler's, the loss applies the rollout
        correction ``self.rollout_correction`` (after that write: the weights use pi_old).

        Returns this rank's metric sums (each loss metric times its micro-batch's share
        of the global loss, each other metric times its micro-batch's tokens, and
        ``step_tokens``), the step's global pre-clip gradient norm and its lr.
        """
        algo = self.config.algo
        mode = policy_loss_settings(algo).agg_mode
        members = [batch[i] for i in minibatch]
        local = torch.tensor(_loss_denominator([len(e.response_ids) for e in members], mode), device=self.device)
        dist.all_reduce(local)
        global_denominator = max(float(local), 1.0)

        sums: dict[str, float] = {"step_tokens": 0.0}
        nonfinite_groups: set[int] = set()
        parts = self._micro_batches(members)
        for k, part in enumerate(parts):
            rows = [minibatch[i] for i in part]
            # An empty part runs one sample at zero weight, to keep this rank in step.
            run_rows = rows or [minibatch[0]]
            # DeepSpeed reduces gradients and lets step() update only at the boundary.
            self.engine.set_gradient_accumulation_boundary(k == len(parts) - 1)
            inputs = self._collate(batch, vision, run_rows)
            log_probs, entropy = self.engine(inputs, with_entropy=fill_entropy is not None)
            width = log_probs.shape[1]
            index = torch.tensor(run_rows, device=self.device)
            if fill_entropy is not None:
                old_log_probs[index, :width] = log_probs.detach()
                fill_entropy[index, :width] = entropy
            loss, loss_metrics = compute_policy_loss(
                algo,
                log_probs,
                old_log_probs[index, :width],
                expand_to_tokens(advantages[index], inputs.response_mask),
                inputs.response_mask,
                None if ref_log_probs is None else ref_log_probs[index, :width],
                norm_length=self.config.rollout.max_new_tokens,
                behaviour_log_prob=None if behaviour_log_probs is None else behaviour_log_probs[index, :width],
                rollout_correction=self.rollout_correction,
            )
            if rows and not torch.isfinite(loss):
                nonfinite_groups.update(batch[i].group_id for i in rows)
            response_lens = [len(batch[i].response_ids) for i in rows]
            # DeepSpeed averages gradients over ranks, hence the world size.
            share = _loss_denominator(response_lens, mode) / global_denominator
            self.engine.backward(loss * (share * self.world_size))
            tokens = float(sum(response_lens))
            sums["step_tokens"] += tokens
            for name, value in loss_metrics.items():
                weight = share if name in _LOSS_METRICS else tokens
                sums[name] = sums.get(name, 0.0) + float(value) * weight
        self._check_finite(nonfinite_groups)
        lr = self.engine.get_lr()[0]
        own_norm = None
        if self.engine.zero_optimization_stage() == 0 and not self.engine.bfloat16_enabled():
            # Here DeepSpeed steps the bare torch optimizer and keeps no norm; measure it
            # (the boundary backward has already averaged the gradients over ranks).
            grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
            own_norm = float(torch.nn.utils.get_total_norm(grads))
        self.engine.step()
        norm = own_norm if own_norm is not None else self.engine.get_global_grad_norm()
        if norm is None:
            raise RuntimeError("DeepSpeed reported no gradient norm for the last step")
        return sums, float(norm), lr

    def _check_finite(self, nonfinite_groups: set[int]) -> None:
        """Raise on every rank, before the optimizer step, if any rank had a NaN or inf loss.

        The weights stay as they were; the gradients accumulated so far are not used.
        """
        count = torch.tensor(len(nonfinite_groups), device=self.device)
        dist.all_reduce(count)
        if int(count):
            where = f"in group(s) {sorted(nonfinite_groups)[:10]}" if nonfinite_groups else "on another rank"
            raise FloatingPointError(
                f"learner rank {self.rank}, update {self.step}: non-finite policy loss {where}; no step was taken"
            )

    def _sum_over_ranks(self, values: dict[str, float]) -> dict[str, float]:
        names = sorted(values)
        tensor = torch.tensor([values[n] for n in names], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return dict(zip(names, tensor.tolist()))

    # ----------------------------------------------------------------- supervised warm-start

    def sft_step(self, batch: Sequence[Experience], lr: float) -> dict[str, float]:
        """One supervised optimizer step (``mapo_ray.learner.sft``) on this rank's shard ``batch``.

        The loss is the cross-entropy of the response tokens at temperature 1 (the plain
        softmax, whatever ``rollout.temperature`` is), averaged over every response token
        of all ranks' shards. It runs through the RL engine and optimizer at ``lr``; the
        lr schedule, its position and ``step`` (RL updates) are left as they were.

        Returns ``sft/loss`` (token mean before the step) and ``sft/tokens``, equal on
        every rank. Raises ``FloatingPointError`` before the step if any rank's loss
        is not finite.
        """
        if not batch:
            raise ValueError(f"sft_step: learner rank {self.rank} got no examples; every rank needs at least one")
        optimizer, schedule = self.engine.basic_optimizer, self.engine.lr_scheduler
        policy = self.engine.module
        scheduled = [group["lr"] for group in optimizer.param_groups]
        temperature = policy.temperature
        local = torch.tensor(float(sum(len(e.response_ids) for e in batch)), device=self.device)
        dist.all_reduce(local)
        total_tokens = max(float(local), 1.0)
        vision = encode_images(batch, self.image_processor, self.image_token_id)
        parts = self._micro_batches(batch)
        nll_sum, nonfinite = 0.0, []
        try:
            # engine.step() (ZeRO, clipping) also steps the lr schedule: detach it, so the RL
            # warm-up and decay start where they would without a warm-start.
            for group in optimizer.param_groups:
                group["lr"] = lr
            self.engine.lr_scheduler = None
            policy.temperature = 1.0
            for k, part in enumerate(parts):
                self.engine.set_gradient_accumulation_boundary(k == len(parts) - 1)
                # An empty part runs one sample at zero weight, to keep this rank in step.
                log_probs, _ = self.engine(self._collate(batch, vision, part or [0]))
                nll = -log_probs.sum() if part else 0.0 * log_probs.sum()
                if not torch.isfinite(nll):
                    nonfinite += part
                nll_sum += float(nll.detach())
                # DeepSpeed averages gradients over ranks, hence the world size.
                self.engine.backward(nll * (self.world_size / total_tokens))
            count = torch.tensor(len(nonfinite), device=self.device)
            dist.all_reduce(count)
            if int(count):
                where = f"in example(s) {sorted(nonfinite)[:10]} of its shard" if nonfinite else "on another rank"
                raise FloatingPointError(f"learner rank {self.rank}: non-finite SFT loss {where}; no step was taken")
            self.engine.step()
        finally:
            policy.temperature = temperature
            self.engine.lr_scheduler = schedule
            for group, value in zip(optimizer.param_groups, scheduled):
                group["lr"] = value
        loss = self._sum_over_ranks({"nll": nll_sum})["nll"] / total_tokens
        self.release_cached_memory()
        return {"sft/loss": loss, "sft/tokens": float(local)}

    def release_cached_memory(self) -> None:
        """Hand the CUDA blocks torch's allocator keeps cached (the update's activations,
        logits chunks and gradients buckets) back to the driver; a no-op off CUDA.

        Called after each update and warm-start step: a rollout actor sharing the GPU
        (vLLM allocates outside this process's cache) then finds that memory free when it
        wakes, and the GPU holds only the learner's resident states between updates."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ----------------------------------------------------------------- weights and checkpoints

    def named_parameters_for_sync(self) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, full tensor)`` of the policy for a weight broadcast, in ``parameter_specs`` order.

        Under ZeRO-3 this gathers, so every rank must drain it in step (rank 0 sends).
        Honours ``sync.bucket_mb`` (gather chunk) and ``sync.trainable_only``.
        """
        return named_parameters_for_sync(self.policy, self.config.sync.bucket_bytes, self.config.sync.trainable_only)

    def save(self, folder: str | os.PathLike, client_state: dict[str, Any] | None = None) -> None:
        """Write this rank's part of the learner state into ``folder`` (collective).

        DeepSpeed writes weights, optimizer and schedule (ZeRO: one shard file per
        rank), this rank writes ``rng_rank{rank}.pt``, and the step count plus
        ``client_state`` (e.g. the loop's data position) ride in DeepSpeed's file.
        On several nodes, ``folder`` must end up whole on every node before ``load``
        (shared storage, or Ray Train's checkpoint upload merges the ranks' files).
        """
        folder = Path(folder)
        state = {"learner_step": self.step, "client_state": client_state or {}}
        self.engine.save_checkpoint(str(folder), tag=_CHECKPOINT_TAG, client_state=state)
        torch.save(rng_state(), folder / f"rng_rank{self.rank}.pt")
        dist.barrier()

    def load(self, folder: str | os.PathLike) -> dict[str, Any]:
        """Restore what ``save`` wrote (collective; same world size and ZeRO stage); returns its ``client_state``.

        Call it on a freshly built learner, before any update: under ZeRO-3 DeepSpeed
        cannot load into an engine that has already trained.
        """
        folder = Path(folder)
        rng_file = folder / f"rng_rank{self.rank}.pt"
        for needed in (folder / _CHECKPOINT_TAG, rng_file):
            if not needed.exists():
                raise FileNotFoundError(f"learner checkpoint {folder}: {needed.name} is missing (rank {self.rank})")
        path, state = self.engine.load_checkpoint(str(folder), tag=_CHECKPOINT_TAG)
        if path is None:
            raise RuntimeError(f"learner checkpoint {folder}: DeepSpeed could not load it (see its log above)")
        set_rng_state(torch.load(rng_file, weights_only=True))
        self.step = state["learner_step"]
        return state["client_state"]

    def load_first_complete(self, folders: Sequence[str | os.PathLike]) -> tuple[Path, dict[str, Any]]:
        """``load`` the first of ``folders`` (newest first) that every rank reads whole
        (collective); returns it and its ``client_state``. A folder that fails on any
        rank (a missing or truncated file) is logged with the error and the next tried.

        Raises ``RuntimeError`` naming each folder and why, when none loads.
        """
        problems: list[str] = []
        for folder in map(Path, folders):
            try:
                state, error = self.load(folder), ""
            except Exception as err:  # a truncated file fails in whatever torch or DeepSpeed reads first
                state, error = {}, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            failed = torch.tensor([float(bool(error))], device=self.device)
            dist.all_reduce(failed, op=dist.ReduceOp.MAX)
            if not failed.item():
                return folder, state
            problems.append(f"{folder}: {error or 'failed on another rank'}")
            print(f"rank {self.rank}: cannot restore learner checkpoint {problems[-1]}; trying an older one", flush=True)
        raise RuntimeError("no learner checkpoint could be restored: " + "; ".join(problems))

    def export_hf(self, folder: str | os.PathLike) -> None:
        """Save the policy as a Hugging Face folder (weights, config, tokenizer, image processor).

        Collective: under ZeRO-3 the parameters are gathered chunk by chunk; rank 0 writes.
        """
        state: dict[str, torch.Tensor] = {}
        for name, tensor in named_parameters_for_sync(self.policy, self.config.sync.bucket_bytes):
            if self.rank == 0:
                state[name] = tensor.detach().to("cpu", copy=True)
        if self.rank == 0:
            self.policy.save_pretrained(folder, state_dict=state)
            AutoTokenizer.from_pretrained(self.model_path).save_pretrained(folder)
            if self.image_processor is not None:
                self.image_processor.save_pretrained(folder)
        dist.barrier()



def batch_advantages(batch: Sequence[Experience], config: Config, step: int, device: torch.device) -> torch.Tensor:
    """(N,) float32 advantages of ``batch`` on ``device``: whole groups, any subset of a step's groups.

    Each group's advantages depend only on its own samples, so a learner rank that
    computes them for its shard gets exactly what the whole batch would give it
    (``mapo_random`` draws group g's weight by its id g). ``config.algo`` picks the
    estimator; a sample's ``success`` of None means ``reward >= algo.success_threshold``,
    on the reward as graded. With ``algo.overlong_buffer_len`` set, DAPO's overlong
    penalty (``overlong_penalty``, up to ``rollout.max_new_tokens``) is added to each
    reward before the estimator sees it; success is not affected. Random estimators
    draw from a generator seeded by ``(seed, step)``, the same on every rank.
    """
    algo = config.algo
    scores = torch.tensor([e.reward for e in batch], dtype=torch.float64, device=device)
    success = torch.tensor(
        [e.reward >= algo.success_threshold if e.success is None else e.success for e in batch],
        dtype=torch.bool,
        device=device,
    )
    if algo.overlong_buffer_len is not None:
        lengths = torch.tensor([len(e.response_ids) for e in batch], device=device)
        scores = scores + overlong_penalty(
            lengths, config.rollout.max_new_tokens, algo.overlong_buffer_len, algo.overlong_penalty_factor
        ).to(torch.float64)
    # On the CPU, whatever the device: its draws are the same for every prefix length.
    generator = torch.Generator().manual_seed(derive_seed(config.seed, step))
    return compute_advantages(
        scores,
        torch.tensor([e.group_id for e in batch], dtype=torch.long, device=device),
        algo.estimator,
        success=success,
        success_threshold=algo.success_threshold,
        std=algo.std,
        eps=algo.eps,
        generator=generator,
    )

def _response_mask(batch: Sequence[Experience], width: int, device: torch.device) -> torch.Tensor:
    """(N, width) bool, True on each sample's response tokens."""
    lengths = torch.tensor([len(e.response_ids) for e in batch], device=device)
    return torch.arange(width, device=device) < lengths.unsqueeze(-1)


def _loss_denominator(response_lens: Sequence[int], mode: str) -> float:
    """What ``aggregate_loss`` divides by in ``mode``, for responses of these lengths.

    token-mean: tokens; seq-mean-token-mean: non-empty responses;
    seq-mean-token-sum and seq-mean-token-sum-norm: responses.
    """
    if mode == "token-mean":
        return float(sum(response_lens))
    if mode == "seq-mean-token-mean":
        return float(sum(1 for n in response_lens if n > 0))
    if mode in ("seq-mean-token-sum", "seq-mean-token-sum-norm"):
        return float(len(response_lens))
    raise ValueError(f"unknown loss aggregation mode {mode!r}")
