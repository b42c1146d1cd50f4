"""SparCL's dynamic data removal: stop training on the samples the model has learned for good."""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lit_eff import validation
from lit_eff.callbacks.technique import Technique, log_step
from lit_eff.continual import task_split_of
from lit_eff.data import RemovalSchedule, SampleStats, removal_order
from lit_eff.datamodules.base import KitDataModule
from lit_eff.seeding import generator, run_seed

_SCORES = ("forgetting", "loss")


class DynamicDataRemoval(Technique):
    """Removes the training samples the model learns easily, so later epochs (and their FLOPs)
    go to the informative ones.

    Every training step records, per sample, whether the model classified it correctly and its
    loss (from the training forward, gathered over DDP ranks). Before each epoch
    ``e = every_n_epochs, 2·every_n_epochs, ... <= until_epoch`` the samples presented since the
    last removal are ranked by forgetting events (``score="forgetting"``, a never-learned sample
    counting as the run's epochs) or mean loss (``score="loss"``); the lowest
    ``int(int(remove_fraction·N) / (until_epoch / every_n_epochs))`` are left out for the rest of
    training and the statistics restart. Needs a kit datamodule, a LightningModule whose forward
    returns class logits for batches ``(inputs, labels)``; sets
    ``trainer.reload_dataloaders_every_n_epochs=1``. Logs ``data/kept_samples``, ``data/removed``,
    ``data/unforgettable``. Details: docs/techniques/data_removal.md.

    Example::

        trainer:
          callbacks+:
            - class_path: lit_eff.callbacks.DynamicDataRemoval
              init_args: {remove_fraction: 0.3, every_n_epochs: 5, until_epoch: 20}
    """

    def __init__(self, remove_fraction: float = 0.3, every_n_epochs: int = 5, until_epoch: int = 20,
                 score: Literal["forgetting", "loss"] = "forgetting") -> None:
        super().__init__()
        self.schedule = RemovalSchedule(remove_fraction, every_n_epochs, until_epoch)
        validation.check_choice("score", score, _SCORES)
        self.remove_fraction, self.every_n_epochs, self.until_epoch = remove_fraction, every_n_epochs, until_epoch
        self.score = score
        self.stats: SampleStats | None = None
        self.removed: dict[int, torch.Tensor] = {}  # epoch -> training indices left out from it on
        self.unforgettable = 0  # candidates with no forgetting event at the last removal
        self._never_learned = 2**31 - 1
        self._hook: Any = None
        self._capturing = False
        self._logits: torch.Tensor | None = None
        self._kept: tuple[int, int] = (-1, 0)  # (epoch, samples it draws from)
        self._plan: dict[int, int] = {}  # epoch -> samples removed before it
        self._task_epochs: int | None = None  # epochs per task of a task-split datamodule

    # setup ------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        data = trainer.datamodule
        if not isinstance(data, KitDataModule):
            raise ValueError(f"{self.name} needs a kit datamodule (a lit_eff.datamodules.KitDataModule, whose loader "
                             f"can leave samples out between epochs and resume exactly), got "
                             f"{type(data).__name__ if data is not None else 'dataloaders passed to fit()'}")
        split = data.train_data
        if isinstance(split, (tuple, list)) and (len(split) != 2 or split[1].ndim != 1):
            raise ValueError(f"{self.name} ranks samples by how the model classifies them, so it needs batches "
                             f"(inputs, labels) with one class label per sample; {type(data).__name__} holds "
                             f"{len(split)} tensors of shapes {[tuple(t.shape) for t in split]}")
        reload = trainer.reload_dataloaders_every_n_epochs
        if reload > 1:
            raise ValueError(f"{self.name} changes the training samples between epochs, so Lightning must rebuild the "
                             f"training loader every epoch: expected trainer.reload_dataloaders_every_n_epochs 0 or "
                             f"1, got {reload}")
        trainer.reload_dataloaders_every_n_epochs = 1  # the epoch's length follows the samples kept
        self._plan = {}
        for what, first, size in self._sample_sets(trainer, data):
            epochs = [e for e in self.schedule.epochs() if first is None or e < self._task_epochs]
            per = self.schedule.per_removal(size)
            left = size - per * len(epochs)
            if left < data.batch_size * trainer.world_size:
                raise ValueError(f"Expected {self.name} to leave at least one batch per process: removing {per} samples "
                                 f"at each of epochs {epochs}{what} leaves {left} of {size}, fewer than "
                                 f"batch_size={data.batch_size} x {trainer.world_size} processes. Lower `remove_fraction`")
            self._plan.update({(first or 0) + e: per for e in epochs})
        data.plan_removals(self._plan)  # sizes the run's schedules (planned_steps)
        self._remove_hook()
        self._hook = pl_module.register_forward_hook(self._capture)

    def _sample_sets(self, trainer: Trainer, data: KitDataModule) -> list[tuple[str, int | None, int]]:
        """(what, first epoch, samples) of each set removals count in: the training split, or with a
        task-split datamodule each task (its epochs counted from 0, as SparCL's schedule restarts per task)."""
        tasks = task_split_of(trainer)
        if tasks is None:
            self._task_epochs = None
            return [("", None, data.num_train_samples)]
        self._task_epochs = tasks.epochs_per_task
        firsts = [task * tasks.epochs_per_task for task in range(tasks.num_tasks)]
        return [(f" of task {i}", first, len(data.epoch_train_samples(first))) for i, first in enumerate(firsts)]

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        data: KitDataModule = trainer.datamodule
        total, epochs = data.num_train_samples, sorted(self._plan)
        max_epochs = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs > 0 else None
        if not any(self._plan.values()):
            rank_zero_warn(f"{self.name}: remove_fraction={self.remove_fraction} removes nothing: fewer than one of "
                           f"the {total} training samples per removal")
        elif max_epochs is not None and epochs and max_epochs <= epochs[0]:
            rank_zero_warn(f"{self.name} removes samples from epoch {epochs[0]} on, but the run stops after "
                           f"max_epochs={max_epochs}: it will remove nothing")
        self._never_learned = max_epochs if max_epochs is not None else 2**31 - 1
        if self._task_epochs is not None:  # statistics of one task span at most its epochs
            self._never_learned = self._task_epochs
        if self.stats is None:
            self.stats = SampleStats(total)
        elif self.stats.num_samples != total:
            raise ValueError(f"{self.name}'s checkpoint holds statistics of {self.stats.num_samples} training samples, "
                             f"the datamodule has {total}: resume with the same data")
        self.stats.to(pl_module.device)

    # per-sample results -------------------------------------------------------------------------
    def _capture(self, module: Any, args: Any, output: Any) -> None:
        if self._capturing:  # the first forward of the training step: this batch's logits
            self._capturing = False
            self._logits = output.detach() if isinstance(output, torch.Tensor) else None

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._capturing, self._logits = True, None

    def _results(self, batch: Any, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, labels = self._logits, batch[1] if isinstance(batch, (tuple, list)) and len(batch) > 1 else None
        if logits is None or labels is None or logits.ndim != 2 or labels.shape != (len(indices),) \
                or len(logits) != len(indices):
            got = f"logits of shape {tuple(logits.shape)}" if logits is not None else "no tensor from forward"
            raise ValueError(f"{self.name} reads per-sample results from the training forward: expected the "
                             f"LightningModule's forward to return class logits [batch, classes] for batches "
                             f"(inputs, labels) of {len(indices)} samples, got {got}")
        correct = logits.argmax(-1) == labels
        loss = F.cross_entropy(logits.float(), labels, reduction="none")
        return correct, loss

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._capturing = False
        data: KitDataModule = trainer.datamodule
        indices = data.train_loader.batch_indices(batch_idx).to(pl_module.device)
        correct, loss = self._results(batch, indices)
        if trainer.world_size > 1:  # every rank keeps every rank's results, in rank order
            gathered = [pl_module.all_gather(t) for t in (indices, correct, loss)]
            for rank in range(trainer.world_size):
                self.stats.update(*(t[rank] for t in gathered))
        else:
            self.stats.update(indices, correct, loss)
        self._logits = None
        if batch_idx + 1 == trainer.num_training_batches:  # the epoch's last batch: remove for the next one
            self._remove(data, trainer.current_epoch + 1)
        log_step(trainer, pl_module, lambda: self._log_values(data, trainer.current_epoch))

    # removal ------------------------------------------------------------------------------------
    def _remove(self, data: KitDataModule, epoch: int) -> None:
        if epoch not in self._plan or epoch in self.removed:
            return
        current = data.train_samples(epoch - 1)
        in_set = torch.zeros(data.num_train_samples, dtype=torch.bool)
        in_set[current if current is not None else slice(None)] = True
        presented = (self.stats.presented > 0).cpu()
        candidates = (presented & in_set).nonzero().flatten()
        if self.score == "forgetting":
            scores = self.stats.forgetting_counts(self._never_learned).cpu()
            self.unforgettable = int((scores[candidates] == 0).sum())
        else:
            scores = self.stats.mean_loss().cpu()
        order = removal_order(scores, candidates, generator(run_seed(), "data-removal", epoch))
        per = self._plan[epoch]
        removed = order[:per].sort().values
        if len(removed) < per:
            rank_zero_warn(f"{self.name} removes {len(removed)} samples before epoch {epoch}, fewer than the {per} "
                           f"planned: only {len(candidates)} were presented since the last removal (the run's "
                           f"schedules were sized for {per})")
        data.remove_train_samples(removed, from_epoch=epoch)
        self.removed[epoch] = removed
        self.stats.reset()

    def _log_values(self, data: KitDataModule, epoch: int) -> dict[str, float]:
        if self._kept[0] != epoch:
            current = data.train_samples(epoch)
            self._kept = (epoch, data.num_train_samples if current is None else len(current))
        return {"data/kept_samples": float(self._kept[1]),
                "data/removed": float(sum(len(r) for r in self.removed.values())),
                "data/unforgettable": float(self.unforgettable)}

    # teardown and state -------------------------------------------------------------------------
    def _remove_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._remove_hook()
        self._logits = None

    @override
    def technique_state(self) -> dict[str, Any]:
        return {"stats": self.stats.state_dict() if self.stats is not None else None,
                "removed": {epoch: r.clone() for epoch, r in self.removed.items()},
                "unforgettable": self.unforgettable}

    @override
    def load_technique_state(self, state: dict[str, Any]) -> None:
        self.removed = {int(epoch): torch.as_tensor(r) for epoch, r in state.get("removed", {}).items()}
        self.unforgettable = int(state.get("unforgettable", 0))
        stats = state.get("stats")
        if stats is not None:
            self.stats = SampleStats(len(stats["presented"]))
            self.stats.load_state_dict(stats)
