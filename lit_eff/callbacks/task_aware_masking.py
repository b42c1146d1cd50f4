"""SparCL's task-aware dynamic masking (TDM, Wang et al. 2022): sparse weights whose mask moves
at the start of epochs within each continual-learning task."""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from typing_extensions import override

from lit_eff import validation
from lit_eff.callbacks.masking import MaskingTechnique
from lit_eff.callbacks.technique import log_step
from lit_eff.continual import bounds, prune_and_grow, prune_mask, task_position
from lit_eff.seeding import generator, run_seed
from lit_eff.sparsity.sharded import full


class TaskAwareMasking(MaskingTechnique):
    """Sparse training whose mask follows the tasks of continual learning (SparCL's TDM).

    Before training each layer keeps its ``1 − sparsity`` largest ``|W|``. At the start of every
    epoch ``e`` of a task with ``e % update_every_epochs == 0`` (``e`` restarts at 0 with every task
    of a task-split datamodule; without one the run is one task) each layer keeps the weights whose
    ``|W| + grad_weight·|∇W|`` (the gradient of the last batch before it) lies above the ``p_low``
    percentile, then re-activates random zero positions, at value 0, until its sparsity is
    ``p_up``. ``(p_low, p_up) = (lower[i], upper[i])`` where ``i`` counts the ``boundaries`` that
    ``e`` reached. Pruned weights stay exactly zero. Logs ``sparsity/target`` (``p_up``) and
    ``sparsity/mask_changes``. The card: docs/techniques/task_aware_masking.md.

    Example (SparCL's ResNet-18 setting, 50 epochs per task)::

        trainer:
          callbacks+:
            - class_path: lit_eff.callbacks.TaskAwareMasking
              init_args: {sparsity: 0.75, lower: [0.75, 0.76, 0.75], upper: [0.74, 0.75, 0.75],
                          boundaries: [5, 45], update_every_epochs: 5, layers: [conv]}
    """

    ste = False
    _key_fields = ("sparsity",)

    def __init__(
        self,
        sparsity: float = 0.75,
        lower: list[float] | None = None,
        upper: list[float] | None = None,
        boundaries: list[int] | None = None,
        update_every_epochs: int = 5,
        grad_weight: float = 0.5,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        layers: list[Literal["linear", "conv"]] | None = None,
        on_nonfinite: Literal["raise", "warn"] = "raise",
    ) -> None:
        super().__init__(include, exclude, layers, on_nonfinite)
        validation.check_sparsity(sparsity)
        lower = [0.75, 0.76, 0.75] if lower is None else lower
        upper = [0.74, 0.75, 0.75] if upper is None else upper
        boundaries = [5, 45] if boundaries is None else boundaries
        for name, values in (("lower", lower), ("upper", upper), ("boundaries", boundaries)):
            if not isinstance(values, (list, tuple)):
                raise ValueError(f"Expected `{name}` to be a list, got {name}={values!r}")
        for i, (low, up) in enumerate(zip(lower, upper)):
            validation.check_sparsity(low, f"lower[{i}]")
            validation.check_sparsity(up, f"upper[{i}]")
            if up > low:
                raise ValueError(f"Expected upper[{i}] <= lower[{i}] (the mask prunes to the lower bound's sparsity, "
                                 f"then grows back to the upper one), got lower[{i}]={low}, upper[{i}]={up}")
        for i, boundary in enumerate(boundaries):
            validation.check_int(f"boundaries[{i}]", boundary, minimum=1)
        if list(boundaries) != sorted(set(boundaries)):
            raise ValueError(f"Expected `boundaries` to increase strictly, got boundaries={list(boundaries)}")
        if not len(lower) == len(upper) == len(boundaries) + 1:
            raise ValueError(f"Expected `lower` and `upper` to hold one sparsity more than `boundaries` has epochs "
                             f"(one per phase), got {len(lower)} lower, {len(upper)} upper and {len(boundaries)} "
                             f"boundaries: lower={list(lower)}, upper={list(upper)}, boundaries={list(boundaries)}")
        validation.check_int("update_every_epochs", update_every_epochs, minimum=1)
        validation.check_number("grad_weight", grad_weight, 0.0, None)
        self.sparsity, self.grad_weight = float(sparsity), float(grad_weight)
        self.lower, self.upper, self.boundaries = list(lower), list(upper), list(boundaries)
        self.update_every_epochs = update_every_epochs
        self._drawn = False  # the one-shot pruned masks are set (and in the checkpoint)
        self._updated_epoch: int | None = None  # the epoch whose start-of-epoch work is done
        self._grads: dict[str, torch.Tensor] = {}  # the last batch's gradients, for the next update
        self._batch_idx = -1
        self._target = float(sparsity)
        self._mask_changes = 0.0

    # the schedule --------------------------------------------------------------------------------
    def bounds(self, epoch_in_task: int) -> tuple[float, float]:
        """``(p_low, p_up)`` at an epoch of a task."""
        return bounds(epoch_in_task, self.lower, self.upper, self.boundaries)

    def is_update(self, epoch_in_task: int) -> bool:
        return epoch_in_task % self.update_every_epochs == 0

    @override
    def mask_changes_after(self, step: int, total_steps: int) -> str | None:
        return None if step >= total_steps else "it updates masks at the start of epochs of every task"

    # masks -------------------------------------------------------------------------------------
    @override
    def attached(self) -> None:
        self._drawn, self._updated_epoch, self._grads = False, None, {}

    @override
    def start(self, trainer: Trainer) -> None:
        if not self._drawn:  # one-shot magnitude pruning before training
            masks = [(prune_mask(weight, None, 0.0, self.sparsity) & (weight != 0)).to(p.mask.device)
                     for weight, p in zip(self.group.full_weights(), self.group.params)]
            self.group.set_masks(masks)
            self._drawn = True
        self.enforce(trainer)

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._epoch_start(trainer)

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._epoch_start(trainer)  # Lightning skips on_train_epoch_start for an epoch it resumes into

    def _epoch_start(self, trainer: Trainer) -> None:
        epoch = trainer.current_epoch
        if self._updated_epoch == epoch:
            return  # done, or resumed within this epoch: its update is in the checkpoint
        _, in_task = task_position(trainer)
        if self.is_update(in_task):
            self._update(trainer, in_task)
        self._updated_epoch, self._grads = epoch, {}

    @torch.no_grad()
    def _update(self, trainer: Trainer, epoch_in_task: int) -> None:
        p_low, p_up = self.bounds(epoch_in_task)
        masks, changed = [], 0
        for name, weight, p in zip(self.group.names, self.group.full_weights(), self.group.params):
            gen = generator(run_seed(), "tdm-grow", trainer.current_epoch, name)
            mask = prune_and_grow(weight, self._grads.get(name), self.grad_weight, p_low, p_up, gen).to(p.mask.device)
            changed += int((mask != p.mask).sum())
            masks.append(mask)
        self.group.set_masks(masks)
        self.enforce(trainer)
        self._target = p_up
        self._mask_changes = changed / max(1, sum(p.mask.numel() for p in self.group.params))

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._batch_idx = batch_idx
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    @override
    def after_step(self, trainer: Trainer, pl_module: LightningModule, step: int) -> None:
        last_batch = self._batch_idx + 1 == trainer.num_training_batches
        if last_batch and self.is_update(task_position(trainer, trainer.current_epoch + 1)[1]):
            # the next epoch starts with an update: keep this batch's gradient (in the checkpoint)
            self._grads = {name: full(weight.grad).detach().clone()
                           for name, weight in zip(self.group.names, self.group.weights) if weight.grad is not None}
        log_step(trainer, pl_module, {"sparsity/target": self._target, "sparsity/mask_changes": self._mask_changes})

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._grads = {}
        super().teardown(trainer, pl_module, stage)

    # state ---------------------------------------------------------------------------------------
    @override
    def technique_state(self) -> dict[str, Any]:
        return {"drawn": self._drawn, "updated_epoch": self._updated_epoch, "target": self._target,
                "mask_changes": self._mask_changes, "grads": {name: g.clone() for name, g in self._grads.items()}}

    @override
    def load_technique_state(self, state: dict[str, Any]) -> None:
        self._drawn = bool(state.get("drawn", True))  # a saved state comes from a started run
        updated = state.get("updated_epoch")
        self._updated_epoch = None if updated is None else int(updated)
        self._target = float(state.get("target", self.sparsity))
        self._mask_changes = float(state.get("mask_changes", 0.0))
        self._grads = dict(state.get("grads", {}))
