"""Class-incremental task splits: which classes and epochs belong to which task.

>>> split = TaskSplit(num_classes=10, classes_per_task=2, epochs_per_task=3)
>>> split.num_tasks, split.task_of(4), split.epoch_in_task(4), split.classes(2)
(5, 1, 1, [4, 5])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lit_eff import validation

__all__ = ["TaskSplit", "task_split_of", "task_position"]


@dataclass(frozen=True)
class TaskSplit:
    """Task ``t`` holds classes ``t·classes_per_task ... (t+1)·classes_per_task − 1`` and trains for
    ``epochs_per_task`` epochs; epochs past the last task stay on the last task."""

    num_classes: int
    classes_per_task: int
    epochs_per_task: int

    def __post_init__(self) -> None:
        validation.check_int("classes_per_task", self.classes_per_task, minimum=1)
        validation.check_int("epochs_per_task", self.epochs_per_task, minimum=1)
        if self.num_classes % self.classes_per_task:
            raise ValueError(f"Expected `classes_per_task` to divide the {self.num_classes} classes into equal tasks, "
                             f"got classes_per_task={self.classes_per_task}")

    @property
    def num_tasks(self) -> int:
        return self.num_classes // self.classes_per_task

    @property
    def num_epochs(self) -> int:
        """Epochs of a run through every task."""
        return self.num_tasks * self.epochs_per_task

    def task_of(self, epoch: int) -> int:
        return min(epoch // self.epochs_per_task, self.num_tasks - 1)

    def epoch_in_task(self, epoch: int) -> int:
        """The epoch counted from the start of its task (0 at every task's first epoch)."""
        return epoch - self.task_of(epoch) * self.epochs_per_task

    def classes(self, task: int) -> list[int]:
        return list(range(task * self.classes_per_task, (task + 1) * self.classes_per_task))

    def seen_classes(self, task: int) -> list[int]:
        """The classes of tasks ``0..task``."""
        return list(range((task + 1) * self.classes_per_task))

    def task_of_class(self, label: int) -> int:
        return label // self.classes_per_task


def task_split_of(trainer: Any) -> TaskSplit | None:
    """The task split of ``trainer.datamodule`` (its ``task_split`` attribute), ``None`` without one."""
    split = getattr(getattr(trainer, "datamodule", None), "task_split", None)
    return split if isinstance(split, TaskSplit) else None


def task_position(trainer: Any, epoch: int | None = None) -> tuple[int, int]:
    """``(task, epoch within the task)`` of ``epoch`` (default: the current one); without a task
    split the whole run is task 0."""
    epoch = trainer.current_epoch if epoch is None else epoch
    split = task_split_of(trainer)
    return (0, epoch) if split is None else (split.task_of(epoch), split.epoch_in_task(epoch))
