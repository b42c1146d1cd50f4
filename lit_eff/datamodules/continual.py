"""Class-incremental continual learning on the kit's image datamodules (Seq-digits, Seq-CIFAR).

:class:`SequentialTasks` turns a datamodule whose splits are ``(inputs, labels)`` tensors into a
stream of tasks: epochs ``t·epochs_per_task ... (t+1)·epochs_per_task − 1`` train only on task
``t``'s classes (:class:`lit_eff.continual.TaskSplit`), validation covers every class seen so far
and test every class. Resume stays exact and DDP ranks draw the same samples (the training loader
draws each epoch from its task's indices, see :class:`~lit_eff.datamodules.KitDataModule`).

Techniques read the current task through ``trainer.datamodule.task_split`` (a ``TaskSplit``) or
:func:`lit_eff.continual.task_position`; the kit's :class:`~lit_eff.models.ImageClassifier`
logs ``val/acc_task<t>`` per task and their mean ``val/acc_avg``.
"""

from __future__ import annotations

from typing import Any

import torch

from lit_eff.continual import TaskSplit
from lit_eff.datamodules.cifar import CIFAR10DataModule, CIFAR100DataModule
from lit_eff.datamodules.digits import DigitsDataModule
from lit_eff.datamodules.loader import ResumableLoader

__all__ = ["SeqCIFAR10DataModule", "SeqCIFAR100DataModule", "SeqDigitsDataModule", "SequentialTasks"]


class SequentialTasks:
    """Mixin (before a :class:`~lit_eff.datamodules.KitDataModule` with tensor splits) that splits
    the classes into tasks trained one after the other; sets ``task_split`` in ``__init__``."""

    task_split: TaskSplit
    num_classes: int

    def _init_tasks(self, classes_per_task: int, epochs_per_task: int) -> None:
        self.task_split = TaskSplit(self.num_classes, classes_per_task, epochs_per_task)
        self.classes_per_task, self.epochs_per_task = classes_per_task, epochs_per_task
        self._task_indices: dict[int, torch.Tensor] = {}

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)  # type: ignore[misc]
        for name in ("train_data", "val_data", "test_data"):
            split = getattr(self, name)
            if not (isinstance(split, (tuple, list)) and len(split) == 2 and split[1].ndim == 1):
                raise ValueError(f"{type(self).__name__} splits classes into tasks, so it needs (inputs, labels) "
                                 f"tensors with one label per sample; its {name} is {type(split).__name__}")
        trainer = getattr(self, "trainer", None)
        if trainer is None or stage not in (None, "fit"):
            return
        split, max_epochs = self.task_split, trainer.max_epochs
        if max_epochs is not None and max_epochs > split.num_epochs:
            raise ValueError(f"Expected trainer.max_epochs <= {split.num_epochs} ({split.num_tasks} tasks x "
                             f"epochs_per_task={split.epochs_per_task}), got max_epochs={max_epochs}")
        reload = trainer.reload_dataloaders_every_n_epochs
        if reload > 1:
            raise ValueError(f"{type(self).__name__} changes the training classes between tasks, so Lightning must "
                             f"rebuild the loaders every epoch: expected trainer.reload_dataloaders_every_n_epochs 0 "
                             f"or 1, got {reload}")
        trainer.reload_dataloaders_every_n_epochs = 1

    # training: the current task's samples ---------------------------------------------------------
    def epoch_train_samples(self, epoch: int) -> torch.Tensor:
        task = self.task_split.task_of(epoch)
        if task not in self._task_indices:
            labels = self.train_data[1]  # type: ignore[attr-defined]
            wanted = torch.tensor(self.task_split.classes(task))
            self._task_indices[task] = torch.isin(labels, wanted).nonzero().flatten()
        return self._task_indices[task]

    # evaluation: the classes seen so far (validation) or all classes (test) ---------------------------
    def _seen(self, data: Any, task: int) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, labels = data
        keep = labels < (task + 1) * self.task_split.classes_per_task
        return inputs[keep], labels[keep]

    def current_task(self) -> int:
        trainer = getattr(self, "trainer", None)
        return self.task_split.task_of(trainer.current_epoch) if trainer is not None else 0

    def val_dataloader(self) -> ResumableLoader:
        return self._loader(self._seen(self.val_data, self.current_task()), train=False)  # type: ignore[attr-defined]


class SeqDigitsDataModule(SequentialTasks, DigitsDataModule):
    """Seq-digits: scikit-learn's digits as 5 tasks of 2 classes (0-1, 2-3, ...), each trained for
    ``epochs_per_task`` epochs; see :class:`SequentialTasks` and :class:`DigitsDataModule`.

    Example::

        data:
          class_path: lit_eff.datamodules.SeqDigitsDataModule
          init_args: {batch_size: 32, classes_per_task: 2, epochs_per_task: 10}
    """

    def __init__(self, batch_size: int = 32, classes_per_task: int = 2, epochs_per_task: int = 10,
                 val_fraction: float = 0.1, test_fraction: float = 0.2, max_shift: int = 1, split_seed: int = 0,
                 num_workers: int = 0, seed: int | None = None) -> None:
        super().__init__(batch_size, val_fraction, test_fraction, max_shift, split_seed, num_workers, seed)
        self._init_tasks(classes_per_task, epochs_per_task)


class SeqCIFAR10DataModule(SequentialTasks, CIFAR10DataModule):
    """Seq-CIFAR-10: CIFAR-10 as 5 tasks of 2 classes (SparCL's and DER's benchmark); see
    :class:`SequentialTasks` and :class:`CIFAR10DataModule`.

    Example::

        data:
          class_path: lit_eff.datamodules.SeqCIFAR10DataModule
          init_args: {data_dir: data, batch_size: 32, classes_per_task: 2, epochs_per_task: 50}
    """

    def __init__(self, data_dir: str = "data", download: bool = False, batch_size: int = 32,
                 classes_per_task: int = 2, epochs_per_task: int = 50, val_fraction: float = 0.1,
                 split_seed: int = 0, num_workers: int = 0, seed: int | None = None) -> None:
        super().__init__(data_dir, download, batch_size, val_fraction, split_seed, num_workers, seed)
        self._init_tasks(classes_per_task, epochs_per_task)


class SeqCIFAR100DataModule(SequentialTasks, CIFAR100DataModule):
    """Seq-CIFAR-100: CIFAR-100 as tasks of ``classes_per_task`` classes (10 by default); see
    :class:`SeqCIFAR10DataModule`."""

    def __init__(self, data_dir: str = "data", download: bool = False, batch_size: int = 32,
                 classes_per_task: int = 10, epochs_per_task: int = 50, val_fraction: float = 0.1,
                 split_seed: int = 0, num_workers: int = 0, seed: int | None = None) -> None:
        super().__init__(data_dir, download, batch_size, val_fraction, split_seed, num_workers, seed)
        self._init_tasks(classes_per_task, epochs_per_task)
