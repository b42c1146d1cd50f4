"""A deterministic, resumable batch loader.

Lightning saves the state of any train loader that has ``state_dict``/``load_state_dict`` in
its checkpoints and restores it on resume, but a plain ``DataLoader`` has no such state, so a
resumed run restarts the epoch's sampling and replays batches. :class:`ResumableLoader` makes
the batch sequence a pure function of (seed, epoch, rank, batch index):

- the epoch's order is a permutation drawn from a generator seeded by (seed, epoch), identical on every
  rank, then split between ranks (so Lightning needs no ``DistributedSampler``). Training loaders
  pad the split by wrapping around (every rank takes the same number of equal batches, as
  ``DistributedSampler`` does); evaluation loaders (``resumable=False``) visit every sample exactly
  once: each rank takes the same number of batches, one sample smaller where the split is
  uneven, so synced metrics equal a single process's;
- random augmentation of a batch draws from a generator seeded by (seed, epoch, rank, batch);
- the state is ``{"epoch", "consumed"}``: the batches of the epoch already handed to the
  training loop. A restored loader continues exactly after them;
- ``samples(epoch)`` (optional) gives the dataset indices an epoch draws from (a subset that
  changes between epochs: tasks of continual learning, samples removed during training); the
  permutation is then over that subset. :meth:`ResumableLoader.batch_indices` tells which dataset
  indices a batch holds, without changing the batches;
- Lightning announces each epoch through ``loader.sampler.set_epoch(epoch)`` (the protocol of
  ``DistributedSampler``), so epochs cut short by ``limit_train_batches`` or a resume at an
  epoch boundary start the right permutation. Outside Lightning, every ``iter()`` after the
  first starts the next epoch.

Datasets are either a tuple of tensors sharing their first dimension (indexed in one call per
batch: the fast path for data that fits in memory) or any map-style ``Dataset`` (read by a
``DataLoader`` with worker processes for the batches still to come).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from lit_eff.seeding import generator

BatchTransform = Callable[[Any, torch.Generator], Any]


class ResumableLoader:
    """Iterates batches of ``dataset`` in a seeded order and can resume mid-epoch.

    Args:
        dataset: a tuple of tensors with a common first dimension, or a map-style dataset.
        batch_size: samples per batch on each process.
        shuffle: draw a new permutation every epoch (otherwise keep the dataset order).
        drop_last: drop the last incomplete batch.
        seed: seed of the permutations and of ``transform``'s generators.
        transform: ``transform(batch, generator) -> batch`` applied to every batch (augmentation).
        num_workers: worker processes for map-style datasets.
        resumable: keep the position across ``iter()`` calls and in ``state_dict`` (train loaders);
            when False every ``iter()`` starts from the first batch (evaluation loaders).
        samples: ``samples(epoch)`` -> the dataset indices that epoch draws from (``None``: all).
    """

    def __init__(
        self,
        dataset: Sequence[torch.Tensor] | Dataset,
        batch_size: int,
        *,
        shuffle: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        transform: BatchTransform | None = None,
        num_workers: int = 0,
        collate_fn: Callable[[list], Any] | None = None,
        resumable: bool = True,
        samples: Callable[[int], torch.Tensor | None] | None = None,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"Expected `batch_size` > 0, got batch_size={batch_size}")
        self.tensors = tuple(dataset) if isinstance(dataset, (tuple, list)) else None
        if self.tensors is not None:
            lengths = {len(t) for t in self.tensors}
            if len(lengths) != 1:
                raise ValueError(f"Expected tensors of equal length, got lengths {sorted(lengths)}")
        self.dataset = dataset
        self.num_samples = len(self.tensors[0]) if self.tensors is not None else len(dataset)  # type: ignore[arg-type]
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = int(seed)
        self.transform = transform
        self.num_workers = num_workers
        self.collate_fn = collate_fn or default_collate
        self.resumable = resumable
        self.samples = samples
        self.num_replicas = 1
        self.rank = 0
        self.epoch = 0
        self.consumed = 0
        self._started = False
        self._keep_position = False
        self._iterating: tuple[int, list[torch.Tensor]] | None = None  # (epoch, batches) being yielded
        self._deferred: dict[str, int] | None = None  # a position to take up when iteration starts
        self.sampler = _EpochSetter(self)
        self.batch_sampler = None  # read by Lightning next to `sampler`

    # distribution ---------------------------------------------------------------------------
    def set_distributed(self, num_replicas: int, rank: int) -> None:
        """Split every epoch between ``num_replicas`` processes; this one is ``rank``."""
        self.num_replicas, self.rank = int(num_replicas), int(rank)

    def epoch_samples(self, epoch: int) -> torch.Tensor | None:
        """The dataset indices ``epoch`` draws from (``None``: the whole dataset)."""
        return None if self.samples is None else self.samples(epoch)

    def _count(self, epoch: int) -> int:
        chosen = self.epoch_samples(epoch)
        return self.num_samples if chosen is None else len(chosen)

    def _samples_per_rank(self, count: int | None = None) -> int:
        count = self._count(self.epoch) if count is None else count
        if self.num_replicas == 1:
            return count
        # every rank gets the same count (training pads by wrapping around, as DistributedSampler does)
        return math.ceil(count / self.num_replicas)

    def _exact_split(self) -> bool:
        """Evaluation under several processes visits no sample twice (see the module docstring); only
        where every rank still fills ``len(self)`` batches (not with fewer samples than that)."""
        return (self.num_replicas > 1 and not self.resumable and not self.drop_last
                and self.num_samples // self.num_replicas >= len(self))

    def __len__(self) -> int:
        return self._length(self._count(self.epoch))

    def _length(self, count: int) -> int:
        n = self._samples_per_rank(count)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _batches(self, indices: torch.Tensor, count: int) -> list[torch.Tensor]:
        length = self._length(count)
        if self._exact_split() and len(indices) <= (length - 1) * self.batch_size:
            # a rank one sample short of a last batch: still len(self) batches (collectives in forward
            # stay matched across ranks), none empty
            return list(torch.tensor_split(indices, length))
        return [indices[i * self.batch_size : (i + 1) * self.batch_size] for i in range(length)]

    def epoch_indices(self, epoch: int) -> torch.Tensor:
        """The sample indices this rank visits in ``epoch``, in order."""
        chosen = self.epoch_samples(epoch)
        count = self.num_samples if chosen is None else len(chosen)
        if self.shuffle:
            order = torch.randperm(count, generator=generator(self.seed, "order", epoch))
        else:
            order = torch.arange(count)
        if self.num_replicas > 1:
            total = self._samples_per_rank(count) * self.num_replicas
            if total > count and not self._exact_split():
                order = torch.cat([order, order[: total - count]])
            order = order[self.rank :: self.num_replicas]
        return order if chosen is None else chosen[order]

    def epoch_batches(self, epoch: int) -> list[torch.Tensor]:
        """The dataset indices of every batch this rank draws in ``epoch``, in order."""
        if self._iterating is not None and self._iterating[0] == epoch:
            return self._iterating[1]
        return self._batches(self.epoch_indices(epoch), self._count(epoch))

    def batch_indices(self, position: int, epoch: int | None = None) -> torch.Tensor:
        """The dataset indices of batch ``position`` (Lightning's ``batch_idx``) of ``epoch`` (default:
        the epoch being drawn) on this rank: what per-sample statistics key on."""
        return self.epoch_batches(self.epoch if epoch is None else epoch)[position]

    # state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, int]:
        self._take_deferred()
        return {"epoch": self.epoch, "consumed": self.consumed, "seed": self.seed}

    def defer_state(self, state: dict[str, int]) -> None:
        """Take up ``state`` when Lightning starts the epoch (``set_epoch``/``iter()``), keeping
        ``len()`` at the current epoch until then: a loader built before Lightning restores its
        loops reports the length the uninterrupted run reported at that point (its
        ``estimated_stepping_batches``), also where epochs differ in length."""
        self._deferred = dict(state)

    def _take_deferred(self) -> None:
        if self._deferred is not None:
            self.load_state_dict(self._deferred)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._deferred = None
        self.epoch = int(state.get("epoch", 0))
        self.consumed = int(state.get("consumed", 0))
        self.seed = int(state.get("seed", self.seed))
        self._started = True
        self._keep_position = True

    def set_epoch(self, epoch: int) -> None:
        """Make the next ``iter()`` run ``epoch`` (from its start unless it is the restored epoch)."""
        self._take_deferred()
        if epoch != self.epoch:
            self.epoch, self.consumed = int(epoch), 0
        self._started = True
        self._keep_position = True

    # iteration ------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Any]:
        # a generator: nothing below runs until the first batch is asked for
        self._take_deferred()
        if not self.resumable:
            epoch, start = self.epoch, 0
        else:
            if self._keep_position:
                self._keep_position = False
            elif self._started:
                self.epoch, self.consumed = self.epoch + 1, 0
            self._started = True
            epoch, start = self.epoch, self.consumed
        batches = self._batches(self.epoch_indices(epoch), self._count(epoch))
        if self.resumable:
            self._iterating = (epoch, batches)
        for position, batch in enumerate(self._fetch(batches[start:]), start=start):
            if self.transform is not None:
                batch = self.transform(batch, generator(self.seed, "transform", epoch, self.rank, position))
            if self.resumable:
                self.consumed = position + 1
            yield batch

    def _fetch(self, batches: list[torch.Tensor]) -> Iterator[Any]:
        if self.tensors is not None:
            for idx in batches:
                yield tuple(t[idx] for t in self.tensors)
            return
        loader = DataLoader(
            self.dataset,  # type: ignore[arg-type]
            batch_sampler=[b.tolist() for b in batches],
            num_workers=self.num_workers,
            collate_fn=self.collate_fn,
            persistent_workers=False,
        )
        yield from loader




class _EpochSetter:
    """What Lightning's ``_set_sampler_epoch`` finds at ``loader.sampler``: forwards ``set_epoch``."""

    def __init__(self, loader: ResumableLoader) -> None:
        self.loader = loader

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)
