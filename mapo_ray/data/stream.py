"""The training prompt stream and the evaluation prompts, and the actor that serves both.

``PromptStream`` reads epoch after epoch of training prompts in seeded order and can
resume at a ``DataPosition``. ``PromptReader`` is a Ray actor around it: the
coordinator asks it for a batch split into shares, one per rollout actor, and gets
back one object per share plus a small ``Taken`` summary. The rollout actors take
their shares straight from the object store, so the prompts and their images go from
Ray Data's workers through this actor to the rollout actors, and never through the
learner.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import ray

from mapo_ray.config import Config
from mapo_ray.data.errors import DataError
from mapo_ray.data.pipeline import PromptBatches, open_split, prompt_dataset
from mapo_ray.models.folder import model_folder_here
from mapo_ray.types import Prompt, prompts_from_batch


@dataclass(frozen=True)
class DataPosition:
    """Where the training stream stands: ``taken`` prompts into epoch ``epoch``."""

    epoch: int = 0
    taken: int = 0


class PromptStream:
    """Training prompts, epoch after epoch in seeded order, resumable from a ``DataPosition``.

    Ray Data decodes and templates on its own CPU workers; this only pulls finished
    prompts. Resuming is exact when the current ``DataContext`` preserves order.
    """

    def __init__(self, config: Config, tokenizer_path: str, position: DataPosition) -> None:
        self._config = config
        self._tokenizer_path = tokenizer_path
        self._source = open_split(config.data, "train")
        self.position = position
        self._earlier: dict[str, float] = {}  # counts of the epochs already finished
        self._batches: PromptBatches | None = None
        self._open_epoch(position.epoch, skip=position.taken)

    def take(self, n: int) -> list[Prompt]:
        """The next ``n`` prompts, continuing into the next epoch when this one ends."""
        return self.take_with_epochs(n)[0]

    def take_with_epochs(self, n: int) -> tuple[list[Prompt], list[int]]:
        """``take(n)``, and the epoch each prompt was drawn in."""
        out: list[Prompt] = []
        epochs: list[int] = []
        empty_epochs = 0
        while len(out) < n:
            prompt = next(self._iter, None)
            if prompt is None:
                empty_epochs = empty_epochs + 1 if not out else 0
                if empty_epochs > 1:
                    raise RuntimeError(f"data.train {self._config.data.train!r} yields no usable prompt")
                self._open_epoch(self.position.epoch + 1, skip=0)
                continue
            out.append(prompt)
            epochs.append(self.position.epoch)
            self.position = DataPosition(self.position.epoch, self.position.taken + 1)
        return out, epochs

    def metrics(self) -> dict[str, float]:
        """``data/prompts`` and ``data/skipped/<reason>`` since this stream started."""
        assert self._batches is not None
        current = self._batches.metrics()
        return {name: float(self._earlier.get(name, 0) + current[name]) for name in current}

    def _open_epoch(self, epoch: int, skip: int) -> None:
        if self._batches is not None:
            self._earlier = self.metrics()
        dataset = prompt_dataset(
            self._source, self._config.data, tokenizer_path=self._tokenizer_path, seed=self._config.seed, epoch=epoch
        )
        self._batches = PromptBatches(dataset, batch_size=self._config.trainer.prompts_per_step)
        self._iter = (p for batch in self._batches for p in prompts_from_batch(batch))
        self.position = DataPosition(epoch, 0)
        for _ in range(skip):
            if next(self._iter, None) is None:
                break
            self.position = DataPosition(epoch, self.position.taken + 1)


def load_eval_prompts(config: Config, tokenizer_path: str) -> tuple[list[Prompt], dict[str, int]]:
    """The first ``trainer.eval_prompts`` prompts of the test split (all when None), in fixed
    order, and the count of rows skipped on the way, by reason.

    Raises ``DataError`` when the split gives no usable prompt.
    """
    limit = config.trainer.eval_prompts
    dataset = prompt_dataset(
        open_split(config.data, "test"), config.data, tokenizer_path=tokenizer_path, seed=config.seed
    )
    prompts: list[Prompt] = []
    batches = PromptBatches(dataset, batch_size=256)
    for batch in batches:
        prompts += prompts_from_batch(batch)
        if limit is not None and len(prompts) >= limit:
            prompts = prompts[:limit]
            break
    if not prompts:
        skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(batches.skipped.items())) or "none"
        raise DataError(f"the test split {config.data.test} has no usable row (rows skipped: {skipped})")
    return prompts, dict(batches.skipped)


@dataclass(frozen=True)
class Taken:
    """What ``PromptReader.take`` handed out: the position before, and each prompt's uid and epoch in order."""

    position: DataPosition
    uids: list[str]
    epochs: list[int]


@ray.remote(num_cpus=0)
class PromptReader:
    """Ray actor: the run's ``PromptStream`` and its evaluation prompts, handed out in shares.

    ``take`` and ``eval_shares`` return one object per share (call them with
    ``.options(num_returns=1 + len(shares))``); the first holds only counts and uids.
    Ray Data's own workers decode and template; this actor only pulls finished prompts.
    """

    def __init__(self, config: Config, tokenizer_path: str, position: DataPosition) -> None:
        context = ray.data.DataContext.get_current()
        # A data position must name the same prompts in a resumed run: keep Ray Data's
        # output in input order (the datasets built below copy this context).
        context.execution_options.preserve_order = True
        # One progress line per training step says more than Ray Data's plans and progress: they
        # go to its log file only (logs/ray-data/ in the Ray session's folder), its warnings still
        # to the console. Without Ray's tqdm, an actor (no terminal) logs progress, not bars.
        context.print_on_execution_start = False
        context.use_ray_tqdm = False
        for handler in logging.getLogger("ray.data").handlers:
            if isinstance(handler, logging.StreamHandler):
                handler.setLevel(logging.WARNING)
        self._stream = PromptStream(config, str(model_folder_here(tokenizer_path, "the prompt reader")), position)
        self._eval: list[Prompt] = []
        self._eval_skipped: dict[str, int] = {}
        if config.trainer.eval_every:
            self._eval, self._eval_skipped = load_eval_prompts(config, tokenizer_path)

    def eval_skipped(self) -> dict[str, int]:
        """Test rows skipped while reading the evaluation prompts, by reason."""
        return self._eval_skipped

    def take(self, sizes: list[int]) -> list[Any]:
        """``[Taken, share_1, .., share_k]``: the next ``sum(sizes)`` training prompts, cut into ``sizes``."""
        position = self._stream.position
        prompts, epochs = self._stream.take_with_epochs(sum(sizes))
        return [Taken(position, [p.uid for p in prompts], epochs), *_cut(prompts, sizes)]

    def take_prompts(self, n: int) -> list[Prompt]:
        """The next ``n`` training prompts, in hand (the supervised warm-start reads these)."""
        return self._stream.take(n)

    def eval_shares(self, sizes: list[int]) -> list[Any]:
        """``[uids, share_1, .., share_k]`` of the evaluation prompts cut into ``sizes``
        (``eval_count`` says how many there are to cut)."""
        return [[p.uid for p in self._eval], *_cut(self._eval, sizes)]

    def eval_count(self) -> int:
        return len(self._eval)

    def position(self) -> DataPosition:
        return self._stream.position

    def metrics(self) -> dict[str, float]:
        """``data/prompts`` and ``data/skipped/<reason>`` of the training stream so far."""
        return self._stream.metrics()


def _cut(prompts: list[Prompt], sizes: list[int]) -> list[list[Prompt]]:
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [prompts[start : start + size] for start, size in zip(starts, sizes)]
