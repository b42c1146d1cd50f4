"""Shared plumbing of the kit's datamodules: validation, seeds and resumable loaders."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import Dataset

from lit_eff.datamodules.loader import BatchTransform, ResumableLoader
from lit_eff.seeding import run_seed
from lit_eff.validation import check_int


class KitDataModule(LightningDataModule):
    """Base of the kit's datamodules: ``train_data``/``val_data``/``test_data`` become
    :class:`ResumableLoader` s, so resuming from any checkpoint replays exactly the batches the
    uninterrupted run would have seen, and DDP ranks split every epoch without a sampler.

    The training loader's position is also the datamodule's own checkpoint state: Lightning
    restores a loader's state only when it creates the loader after restoring the loops, which is
    not the case when ``trainer.estimated_stepping_batches`` is read earlier (``configure_optimizers``
    with ``max_epochs`` set), so the datamodule hands the position to the loader it creates next, to
    take up when the epoch starts: until then the loader's length is the one the uninterrupted run
    gave Lightning's estimate (which sizes learning-rate schedules), even where epochs shrink.

    The training samples may change between epochs: :meth:`epoch_train_samples` (a subclass's
    subset per epoch, e.g. a continual-learning task) and :meth:`remove_train_samples` (samples
    left out from an epoch on, e.g. by :class:`~lit_eff.callbacks.DynamicDataRemoval`; part of the
    checkpoint). Lightning must then rebuild the loader every epoch
    (``trainer.reload_dataloaders_every_n_epochs=1``), so its epoch length follows.

    Subclasses save their hyper-parameters with ``logger=False``: Lightning refuses to log a
    model's and a datamodule's hyper-parameters that share a name with different values, which
    would refuse valid pairings (a 256-token model on 128-token sequences); the run's
    ``config.yaml`` holds them.
    """

    def __init__(self, batch_size: int, num_workers: int = 0, seed: int | None = None) -> None:
        super().__init__()
        check_int("batch_size", batch_size, minimum=1)
        check_int("num_workers", num_workers, minimum=0)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.train_data: Sequence[torch.Tensor] | Dataset | None = None
        self.val_data: Sequence[torch.Tensor] | Dataset | None = None
        self.test_data: Sequence[torch.Tensor] | Dataset | None = None
        self._train_loader: ResumableLoader | None = None
        self._restored_position: dict[str, int] | None = None
        self._removals: list[tuple[int, torch.Tensor]] = []  # (from epoch, dataset indices left out)
        self._planned: dict[int, int] = {}  # from epoch -> samples that will be left out then

    def train_transform(self, batch: Any, gen: torch.Generator) -> Any:
        return self.eval_transform(batch, gen)

    def eval_transform(self, batch: Any, gen: torch.Generator) -> Any:
        return batch

    def _loader(self, data: Any, train: bool) -> ResumableLoader:
        if data is None:
            raise RuntimeError(f"{type(self).__name__}.setup() did not create this split")
        transform: BatchTransform = self.train_transform if train else self.eval_transform
        loader = ResumableLoader(
            data,
            self.batch_size,
            shuffle=train,
            drop_last=train,
            seed=self.seed if self.seed is not None else run_seed(),
            transform=transform,
            num_workers=self.num_workers,
            resumable=train,
            samples=self.train_samples if train else None,
        )
        if train and len(loader) == 0:
            raise ValueError(
                f"Expected `batch_size` <= the {len(loader.epoch_indices(0))} training samples per process,"
                f" got batch_size={self.batch_size}"
            )
        if self.trainer is not None and self.trainer.world_size > 1:
            loader.set_distributed(self.trainer.world_size, self.trainer.global_rank)
        if train and self.trainer is not None:
            loader.set_epoch(self.trainer.current_epoch)  # a loader rebuilt between epochs: that epoch's samples
        return loader

    # the training samples of each epoch ------------------------------------------------------
    @property
    def num_train_samples(self) -> int:
        """Samples in the training split (before any is left out)."""
        data = self.train_data
        if data is None:
            raise RuntimeError(f"{type(self).__name__}.setup() did not create the training split")
        return len(data[0]) if isinstance(data, (tuple, list)) else len(data)  # type: ignore[arg-type]

    def epoch_train_samples(self, epoch: int) -> torch.Tensor | None:
        """The training split's indices ``epoch`` draws from, before removals (``None``: all).
        Subclasses override it (tasks of continual learning)."""
        return None

    def train_samples(self, epoch: int) -> torch.Tensor | None:
        """The training indices ``epoch`` draws from: :meth:`epoch_train_samples` less the removed ones."""
        chosen = self.epoch_train_samples(epoch)
        removed = [indices for start, indices in self._removals if start <= epoch]
        if not removed:
            return chosen
        keep = torch.ones(self.num_train_samples, dtype=torch.bool)
        keep[torch.cat(removed)] = False
        return keep.nonzero().flatten() if chosen is None else chosen[keep[chosen]]

    def remove_train_samples(self, indices: torch.Tensor, from_epoch: int) -> None:
        """Leave the training samples ``indices`` (of the training split) out from epoch ``from_epoch`` on."""
        check_int("from_epoch", from_epoch, minimum=0)
        indices = torch.as_tensor(indices, dtype=torch.long).flatten().cpu()
        if len(indices) and (int(indices.min()) < 0 or int(indices.max()) >= self.num_train_samples):
            raise ValueError(f"Expected training sample indices in [0, {self.num_train_samples}), got "
                             f"min={int(indices.min())}, max={int(indices.max())}")
        self._removals.append((int(from_epoch), indices.clone()))

    def plan_removals(self, counts: dict[int, int]) -> None:
        """Announce that ``counts[e]`` more training samples will be left out from epoch ``e`` on, so
        :meth:`planned_steps` can size the run before they are chosen."""
        self._planned = {int(epoch): int(n) for epoch, n in counts.items()}

    def planned_steps(self, trainer: Any) -> int | None:
        """The optimizer steps of a ``max_epochs`` run whose epochs shrink as planned or draw from
        changing subsets (:meth:`epoch_train_samples`: continual-learning tasks) (what
        ``trainer.estimated_stepping_batches``, sized on the first epoch, would overstate); ``None``
        without a plan or when ``max_steps`` alone sets the run's length."""
        if trainer.max_epochs is None or trainer.max_epochs < 0 or self.train_data is None:
            return None
        if not self._planned and self.epoch_train_samples(0) is None:
            return None  # every epoch draws from the whole split: Lightning's estimate is exact
        total, world, limit = 0, max(trainer.world_size, 1), trainer.limit_train_batches
        for epoch in range(max(trainer.max_epochs, 1)):
            chosen = self.epoch_train_samples(epoch)
            count = self.num_train_samples if chosen is None else len(chosen)
            # removals planned before this epoch in the same subset (a continual task's; the whole split)
            count -= sum(n for start, n in self._planned.items()
                         if start <= epoch and _same(self.epoch_train_samples(start), chosen))
            batches = math.ceil(count / world) // self.batch_size  # the training loader drops the last batch
            batches = min(batches, limit) if isinstance(limit, int) else int(batches * limit)
            total += math.ceil(batches / trainer.accumulate_grad_batches)
        return total if trainer.max_steps == -1 else min(total, trainer.max_steps)

    @property
    def train_loader(self) -> ResumableLoader | None:
        """The training loader built last (``None`` before ``train_dataloader()``)."""
        return self._train_loader

    def train_dataloader(self) -> ResumableLoader:
        self._train_loader = self._loader(self.train_data, train=True)
        if self._restored_position is not None:
            self._train_loader.defer_state(self._restored_position)
            self._restored_position = None
        return self._train_loader

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {}
        if self._train_loader is not None:
            state["train_loader"] = self._train_loader.state_dict()
        if self._removals:
            state["removed"] = [(start, indices.clone()) for start, indices in self._removals]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._removals = [(int(start), torch.as_tensor(indices, dtype=torch.long))
                          for start, indices in state_dict.get("removed", [])]
        position = state_dict.get("train_loader")
        if position is None:
            return
        if self._train_loader is not None:  # created before the checkpoint was restored
            self._train_loader.load_state_dict(position)
        else:
            self._restored_position = dict(position)

    def val_dataloader(self) -> ResumableLoader:
        return self._loader(self.val_data, train=False)

    def test_dataloader(self) -> ResumableLoader:
        return self._loader(self.test_data, train=False)

    def predict_dataloader(self) -> ResumableLoader:
        return self._loader(self.test_data, train=False)


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """Whether two epochs draw from the same training indices (``None``: the whole split)."""
    return a is b or (a is not None and b is not None and a.shape == b.shape and torch.equal(a, b))
