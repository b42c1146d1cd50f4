"""Shared plumbing of the kit's datamodules: validation, seeds and resumable loaders."""

from __future__ import annotations

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
    with ``max_epochs`` set), so the datamodule hands the position to the loader it creates next.

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
        )
        if train and len(loader) == 0:
            raise ValueError(
                f"Expected `batch_size` <= the {len(loader.epoch_indices(0))} training samples per process,"
                f" got batch_size={self.batch_size}"
            )
        if self.trainer is not None and self.trainer.world_size > 1:
            loader.set_distributed(self.trainer.world_size, self.trainer.global_rank)
        return loader

    def train_dataloader(self) -> ResumableLoader:
        self._train_loader = self._loader(self.train_data, train=True)
        if self._restored_position is not None:
            self._train_loader.load_state_dict(self._restored_position)
            self._restored_position = None
        return self._train_loader

    def state_dict(self) -> dict[str, Any]:
        return {"train_loader": self._train_loader.state_dict()} if self._train_loader is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
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
