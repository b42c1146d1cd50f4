"""Replay for class-incremental continual learning: DER++ (Buzzega et al. 2020), as SparCL trains."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from typing_extensions import override

from lit_eff import validation
from lit_eff.callbacks.technique import Technique, log_step
from lit_eff.continual import ReservoirBuffer, TaskSplit, task_split_of
from lit_eff.seeding import generator, run_seed


class _AddLoss(torch.autograd.Function):
    """Identity on ``output``; its backward also sends ``grad_scale`` into ``loss``'s graph, so
    ``grad_scale · ∇loss`` joins the gradient of whatever loss the training step builds from ``output``."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, loss: torch.Tensor, grad_scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(grad_scale)
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (grad_scale,) = ctx.saved_tensors
        return grad, grad_scale, None


class Replay(Technique):
    """DER++ replay on a task-split datamodule: the model's loss on the current batch sees only the
    current task's classes, and from the second task on ``alpha · MSE(f(x'), z') + beta · CE(f(x''), y'')``
    on two batches drawn from a reservoir buffer of past (input, label, logits) joins it.

    Every training batch is offered to the buffer after its step (inputs as the model received
    them, labels, the logits before the class mask; gathered over DDP ranks so every rank keeps the
    same buffer). The buffer is part of the checkpoint. The replay forwards run inside the training
    step, so ``FlopsMonitor`` counts them. Needs a datamodule with ``task_split``
    (:mod:`lit_eff.datamodules.continual`) and a LightningModule whose forward returns class logits
    for batches ``(inputs, labels)``. Logs ``replay/loss`` and ``replay/stored``. The card:
    docs/techniques/task_aware_masking.md.

    Example::

        trainer:
          callbacks+:
            - class_path: lit_eff.callbacks.Replay
              init_args: {buffer_size: 500, alpha: 0.1, beta: 0.5}
    """

    def __init__(self, buffer_size: int = 500, alpha: float = 0.1, beta: float = 0.5,
                 mask_other_tasks: bool = True) -> None:
        super().__init__()
        validation.check_int("buffer_size", buffer_size, minimum=1)
        validation.check_number("alpha", alpha, 0.0, None)
        validation.check_number("beta", beta, 0.0, None)
        if not isinstance(mask_other_tasks, bool):
            raise ValueError(f"Expected `mask_other_tasks` to be true or false, got "
                             f"mask_other_tasks={mask_other_tasks!r}")
        self.buffer_size, self.alpha, self.beta = buffer_size, float(alpha), float(beta)
        self.mask_other_tasks = mask_other_tasks
        self.buffer = ReservoirBuffer(buffer_size)
        self.split: TaskSplit | None = None
        self._hook: Any = None
        self._armed = False  # the next forward of the module is the training step's own
        self._labels: torch.Tensor | None = None
        self._draws: tuple[torch.Generator, torch.Generator] | None = None  # this batch's replay draws
        self._offsets: tuple[Any, torch.Tensor] | None = None  # (key, 0 / -inf per class)
        self._current: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._grad_scale: torch.Tensor | None = None
        self._batch_len = 0
        self._loss: torch.Tensor | None = None

    # setup --------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.split = task_split_of(trainer)
        if self.split is None:
            data = trainer.datamodule
            raise ValueError(f"{self.name} replays past tasks, so it needs a datamodule that splits classes into tasks "
                             f"(e.g. lit_eff.datamodules.SeqDigitsDataModule, with a `task_split`), got "
                             f"{type(data).__name__ if data is not None else 'dataloaders passed to fit()'}")
        smoothing = getattr(pl_module, "hparams", {}).get("label_smoothing", 0.0)
        if self.mask_other_tasks and smoothing:
            raise ValueError(f"{self.name} gives the classes of other tasks a logit of -inf in the current batch's loss, "
                             f"where label smoothing would put probability on them (an infinite loss): set the "
                             f"model's label_smoothing to 0 (got {smoothing}) or mask_other_tasks=false")

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.buffer.to(pl_module.device)
        self._grad_scale = torch.ones((), device=pl_module.device)

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # registered last, after other techniques' hooks on the module (DynamicDataRemoval's), so
        # those read the current batch's own logits and never the replay forwards
        self._remove_hook()
        self._hook = pl_module.register_forward_hook(self._forward)

    def replays(self, trainer: Trainer) -> bool:
        """Whether this epoch's steps replay (from the second task on, once the buffer holds examples)."""
        return self.split.task_of(trainer.current_epoch) > 0 and len(self.buffer) > 0

    @override
    def flops_key(self, trainer: Trainer) -> Hashable:
        return min(len(self.buffer), self._batch_len) if self.replays(trainer) else 0

    # the training step --------------------------------------------------------------------------
    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._labels = batch[1] if isinstance(batch, (tuple, list)) and len(batch) > 1 else None
        self._armed, self._current = True, None
        epoch, rank = trainer.current_epoch, trainer.global_rank
        self._draws = None
        if self.replays(trainer):
            self._draws = tuple(generator(run_seed(), "replay", kind, epoch, batch_idx, rank) for kind in ("mse", "ce"))
        scale = 1.0 / trainer.accumulate_grad_batches  # what the loop multiplies the loss by before backward
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            scale *= scaler.get_scale()
        self._grad_scale.fill_(scale)
        task = self.split.task_of(epoch)
        if self._offsets is None or self._offsets[0] != task:
            self._offsets = (task, None)

    def _class_offsets(self, logits: torch.Tensor) -> torch.Tensor:
        task, offsets = self._offsets
        if offsets is None or offsets.shape[-1] != logits.shape[-1] or offsets.device != logits.device \
                or offsets.dtype != logits.dtype:
            offsets = torch.full((logits.shape[-1],), float("-inf"), device=logits.device, dtype=logits.dtype)
            offsets[self.split.classes(task)] = 0
            self._offsets = (task, offsets)
        return offsets

    def _forward(self, module: Any, args: Any, output: Any) -> Any:
        if not self._armed or not module.training or not torch.is_grad_enabled():
            return None  # evaluation, or the replay forwards below
        self._armed = False
        if not isinstance(output, torch.Tensor) or output.ndim != 2 or self._labels is None \
                or len(self._labels) != len(output):
            got = f"shape {tuple(output.shape)}" if isinstance(output, torch.Tensor) else type(output).__name__
            raise ValueError(f"{self.name} expects the LightningModule's forward to return class logits [batch, classes] "
                             f"for training batches (inputs, labels); got {got}")
        self._current = (args[0].detach(), self._labels, output.detach().float())
        self._batch_len = len(output)
        result = output + self._class_offsets(output) if self.mask_other_tasks else output
        if self._draws is None:
            return result
        mse_draw, ce_draw = self._draws
        inputs, _, logits = self.buffer.sample(len(output), mse_draw)
        replayed = module(inputs)
        loss = self.alpha * F.mse_loss(replayed.float(), logits)
        inputs, labels, _ = self.buffer.sample(len(output), ce_draw)
        loss = loss + self.beta * F.cross_entropy(module(inputs).float(), labels)
        self._loss = loss.detach()
        return _AddLoss.apply(result, loss, self._grad_scale)

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._armed = False
        if self._current is None:
            raise ValueError(f"{self.name} saw no training forward of {type(pl_module).__name__} in this step: the "
                             f"training step must call the module (self(inputs)) on the batch's inputs")
        inputs, labels, logits = self._current
        self._current = None
        world = trainer.world_size
        gathered = [pl_module.all_gather(t) for t in (inputs, labels, logits)] if world > 1 else None
        for rank in range(world):  # every rank offers every rank's examples, in rank order
            batch_part = (inputs, labels, logits) if gathered is None else tuple(t[rank] for t in gathered)
            self.buffer.add(*batch_part, generator(run_seed(), "replay-reservoir", trainer.current_epoch, batch_idx,
                                                   rank))
        if self.optimizer_stepped(trainer):
            log_step(trainer, pl_module, lambda: {"replay/loss": self._loss if self._loss is not None else 0.0,
                                                  "replay/stored": float(len(self.buffer))})

    # teardown and state -------------------------------------------------------------------------
    def _remove_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._remove_hook()
        self._current, self._labels, self._draws = None, None, None

    @override
    def technique_state(self) -> dict[str, Any]:
        return {"buffer": self.buffer.state_dict()}

    @override
    def load_technique_state(self, state: dict[str, Any]) -> None:
        if state.get("buffer") is not None:
            self.buffer.load_state_dict(state["buffer"])
