"""The order of training batches: seeded per epoch, optionally grouped by length, and resumable mid-epoch.

A run interrupted after batch ``n`` of an epoch and resumed from its checkpoint must see the same batches, in the
same order, as an uninterrupted run. Two things make that hold:

- the samplers draw their permutation from ``seed + epoch`` (never from the global random state, which dropout
  consumes), so an epoch's order does not depend on what ran before it;
- `ResumableDataLoader` skips, at the start of an epoch's iteration, the batches that Lightning's fit loop counts as
  already done in this epoch (zero except right after a resume), so batch ``n + 1`` comes next.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

__all__ = ["EpochShuffleSampler", "LengthGroupedSampler", "ResumableDataLoader"]


class EpochShuffleSampler(Sampler[int]):
    """A permutation of ``range(size)`` drawn from ``seed + epoch``: the same order for the same epoch, every run.

    Lightning calls ``set_epoch`` before each epoch. When the sampler is wrapped (under DDP Lightning wraps custom
    samplers in ``DistributedSamplerWrapper``, which splits this order across ranks) ``set_epoch`` does not reach it;
    `ResumableDataLoader` then sets the epoch itself.
    """

    def __init__(self, size: int, *, seed: int = 0) -> None:
        self.size = size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        yield from torch.randperm(self.size, generator=generator).tolist()


class LengthGroupedSampler(Sampler[int]):
    """Shuffled indices in which neighbours have similar lengths, so padded batches waste little.

    Each epoch: a permutation seeded by ``seed + epoch`` is cut into mega-batches of ``batch_size *
    mega_batch_factor`` indices, each mega-batch is sorted by length (longest first) and cut into batches, and the
    batches are shuffled. The ``DataLoader`` (same ``batch_size``, ``drop_last`` as you like) then yields those batches.

    Epochs: ``set_epoch`` (Lightning's, or `ResumableDataLoader`'s) chooses the epoch; without it the sampler
    advances its own epoch each time it is iterated.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, *, seed: int = 0, mega_batch_factor: int = 50) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.mega_batch_factor = mega_batch_factor
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        mega = self.batch_size * self.mega_batch_factor
        batches = []
        for begin in range(0, len(order), mega):
            chunk = sorted(order[begin : begin + mega], key=lambda i: -self.lengths[i])
            batches.extend(chunk[b : b + self.batch_size] for b in range(0, len(chunk), self.batch_size))
        # keep a ragged last batch last so that drop_last drops only it
        full = [b for b in batches if len(b) == self.batch_size]
        ragged = [b for b in batches if len(b) != self.batch_size]
        permutation = torch.randperm(len(full), generator=generator).tolist()
        for p in permutation:
            yield from full[p]
        for batch in ragged:
            yield from batch


#: ``() -> (epoch, batches already done in it)``, or ``(None, 0)`` outside a fit loop.
Position = Callable[[], tuple[int | None, int]]


def _no_position() -> tuple[int | None, int]:
    return None, 0


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` that starts each epoch's iteration at the position ``position()`` reports.

    ``position`` is read when the first batch of an iteration is requested (after Lightning has restored its loop
    state and called ``set_epoch``): it returns the epoch, set on the sampler (also through a DDP wrapper), and how many
    batches of it are already done, which are skipped. Skipped batches are loaded and dropped, not trained on; the
    data modules' features are pre-tokenised, so that costs milliseconds per batch.

    ``state_dict`` / ``load_state_dict`` make Lightning treat the loader as resumable (its warning about resuming
    mid-epoch is then not shown); the position itself lives in Lightning's own loop state, so there is nothing to store.
    """

    def __init__(self, *args: Any, position: Position = _no_position, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.position = position

    def __iter__(self) -> Iterator[Any]:
        # A generator: nothing runs until the first batch is requested, when the position is final.
        epoch, done = self.position()
        if epoch is not None:
            for sampler in _samplers(self):
                sampler.set_epoch(epoch)
        iterator = super().__iter__()
        for _ in range(done):
            next(iterator, None)
        yield from iterator

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass


def _samplers(loader: DataLoader) -> list[Any]:
    """The loader's sampler and, when it wraps one (Lightning's ``DistributedSamplerWrapper``), the wrapped one."""
    found = []
    sampler = loader.sampler
    while sampler is not None and hasattr(sampler, "set_epoch"):
        found.append(sampler)
        wrapped = getattr(getattr(sampler, "dataset", None), "_sampler", None)
        sampler = wrapped if isinstance(wrapped, Sampler) else None
    return found
