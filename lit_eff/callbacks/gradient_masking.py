"""SparCL's dynamic gradient masking: update only the weights with the largest gradients."""

from __future__ import annotations

import math
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import nn
from typing_extensions import override

from lit_eff import sparsity, validation
from lit_eff.callbacks.technique import Technique, log_step
from lit_eff.gradients.params import dense_weight, full_tensor, local, sum_over_shards
from lit_eff.gradients.topk import topk_mask
from lit_eff.models.naming import clean_name
from lit_eff.schedules import Schedule

_REFUSED = {"FSDPStrategy": "FSDP1 keeps gradients in flattened, sharded parameters",
            "DeepSpeedStrategy": "DeepSpeed partitions the gradients and owns the optimizer step"}


class GradientMasking(Technique):
    """Every ``refresh_every`` optimizer steps, keeps the ``density`` fraction of largest ``|g|``
    entries of each targeted layer's weight gradient (among the weights a sparsity mask keeps) as
    the layer's pattern; on every step only the pattern's entries move, whatever the optimizer.
    Works under DDP and FSDP2. Details: docs/techniques/gradient_masking.md.

    Args:
        density: fraction of gradient entries kept, in (0, 1], or a Schedule of the step.
        refresh_every: optimizer steps between pattern refreshes (SparCL: 30).
        include: name globs of layers to mask (default: Linear layers inside ``*blocks.*``).
        exclude: name globs of layers to leave alone.

    Example::

        trainer:
          callbacks+:
            - class_path: lit_eff.callbacks.GradientMasking
              init_args: {density: 0.2, refresh_every: 30}
    """

    def __init__(self, density: float | Schedule = 0.2, refresh_every: int = 30, include: list[str] | None = None,
                 exclude: list[str] | None = None) -> None:
        super().__init__()
        if not isinstance(density, Schedule):
            validation.check_density(density)
        validation.check_int("refresh_every", refresh_every, minimum=1)
        self.density = density
        self.refresh_every = refresh_every
        self.include = validation.check_patterns("include", include)
        self.exclude = validation.check_patterns("exclude", exclude)
        # not `targets`: that names the layers a sparsity callback masks
        self.layers: dict[str, nn.Module] = {}
        self.patterns: dict[str, torch.Tensor] = {}  # full-size bool patterns, by layer name
        self.density_in_force: float | None = None
        self.refreshed_at: int | None = None
        self._total: int | None = None  # optimizer steps of this fit
        self._hooks: list[Any] = []
        self._plans: dict[int, list[tuple[str, nn.Module, nn.Parameter]]] = {}
        self._keeps: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # unmasked layers: local keep, drop
        self._buffers: dict[str, torch.Tensor] = {}
        self._pending: dict[int, tuple[list, list, list]] = {}  # per optimizer: weights, copies, drops
        self._fraction: torch.Tensor | None = None
        self._fraction_step = -1

    def density_at(self, step: int) -> float:
        """The density a refresh at optimizer step ``step`` uses."""
        if isinstance(self.density, Schedule):
            return validation.check_density(self.density(step), f"density (at step {step})")
        return float(self.density)

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.refuse_strategies(trainer, _REFUSED)
        targets = sparsity.find_targets(pl_module, include=self.include, exclude=self.exclude)
        self.layers = {clean_name(name): module for name, module in targets.items()}

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        estimated = trainer.estimated_stepping_batches  # unknown for endless loaders: checked at refreshes
        self._total = int(estimated) if math.isfinite(estimated) and estimated > 0 else None
        if isinstance(self.density, Schedule) and self._total:
            validation.check_schedule_over_run("density", self.density, self._total, 0.0, 1.0, low_open=True,
                                               who=self.name)

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._remove_hooks()
        self._hooks = [optimizer.register_step_post_hook(self._restore) for optimizer in trainer.optimizers]

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._remove_hooks()

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks, self._pending, self._plans, self._buffers, self._keeps = [], {}, {}, {}, {}

    @staticmethod
    def allowed(module: nn.Module) -> torch.Tensor | None:
        """The layer's sparsity mask (kept weights), or ``None`` when it is not masked."""
        return sparsity.get_mask(module) if sparsity.has_mask(module) else None

    def _pattern(self, name: str, module: nn.Module, grad: torch.Tensor) -> None:
        """A new full-size pattern from ``grad`` (gathered when sharded: a collective)."""
        allowed = self.allowed(module)
        self.patterns[name] = topk_mask(full_tensor(grad), self.density_in_force,
                                        None if allowed is None else full_tensor(allowed))

    @torch.no_grad()
    def refresh(self, step: int) -> None:
        """New patterns from the current gradients, at the density scheduled for ``step``."""
        self.density_in_force = self.density_at(step)
        for name, module in self.layers.items():
            grad = dense_weight(module).grad
            if grad is not None:  # frozen layers (LayerFreezing) have none
                self._pattern(name, module, grad)
        self._keeps = {}
        self.refreshed_at = step

    def _layers_of(self, optimizer: torch.optim.Optimizer) -> list[tuple[str, nn.Module, nn.Parameter]]:
        """The targeted layers whose weight ``optimizer`` updates (once per fit: FSDP2 replaces weights)."""
        if id(optimizer) not in self._plans:
            mine = {id(p) for group in optimizer.param_groups for p in group["params"]}
            self._plans[id(optimizer)] = [(name, module, dense_weight(module)) for name, module in self.layers.items()
                                          if id(dense_weight(module)) in mine]
        return self._plans[id(optimizer)]

    def _keep(self, name: str, module: nn.Module, weight: nn.Parameter) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's ``keep = pattern ∧ sparsity mask`` and ``1 − keep`` in the weight's dtype."""
        allowed = self.allowed(module)
        cached = self._keeps.get(name)
        if allowed is None and cached is not None and cached[0].dtype == weight.dtype:
            return cached
        pattern = self.patterns[name]
        if pattern.device != weight.device:
            pattern = self.patterns[name] = pattern.to(weight.device)
        keep = local(pattern, weight)
        if allowed is not None:  # the sparsity mask may change between refreshes
            keep = keep & local(allowed, weight).bool()
        keep = keep.to(weight.dtype)
        if allowed is None:
            self._keeps[name] = keep, 1 - keep
        return keep, 1 - keep

    @override
    @torch.no_grad()
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        step = trainer.global_step
        if step % self.refresh_every == 0 or self.refreshed_at is None:
            self.refresh(step)
        # measured when on_train_batch_end of this step hands its values to the loggers
        done, every = step + 1, trainer.log_every_n_steps
        measure = (every > 0 and done % every == 0) or (self._total is not None and done >= self._total)
        layers, before, like = [], [], None
        for name, module, weight in self._layers_of(optimizer):
            if weight.grad is None:
                continue  # frozen (LayerFreezing)
            if name not in self.patterns:  # no gradient at the last refresh: its pattern starts now
                self._pattern(name, module, weight.grad)
            grad, allowed, like = local(weight.grad), self.allowed(module), weight.grad
            if measure:
                before.append((grad if allowed is None else grad * local(allowed, weight)).float().square().sum())
            layers.append((name, local(weight.detach()), grad, *self._keep(name, module, weight)))
        if not layers:
            return
        names, weights, grads, keeps, drops = (list(column) for column in zip(*layers))
        torch._foreach_mul_(grads, keeps)
        if measure:  # ‖g ⊙ keep‖ / ‖g ⊙ allowed‖ over all layers, on the steps a logger writes
            after = torch.stack([g.float().square().sum() for g in grads]).sum()
            total, kept = sum_over_shards(torch.stack([torch.stack(before).sum(), after]), like)
            self._fraction = torch.where(total > 0, (kept / total).sqrt(), torch.ones_like(total))
            self._fraction_step = step
        saved = [self._buffer(name, weight) for name, weight in zip(names, weights)]
        torch._foreach_copy_(saved, weights)
        self._pending[id(optimizer)] = (weights, saved, drops)

    def _buffer(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """The reused buffer for the pre-step values of ``name``'s weight."""
        buffer = self._buffers.get(name)
        if buffer is None or buffer.shape != weight.shape or buffer.dtype != weight.dtype:
            buffer = self._buffers[name] = torch.empty_like(weight)
        return buffer

    @torch.no_grad()
    def _restore(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Optimizer step post-hook: ``lerp`` by ``1 − keep`` (exact at 0, 1) restores entries off the pattern."""
        weights, saved, drops = self._pending.pop(id(optimizer), ((), (), ()))
        if weights:
            torch._foreach_lerp_(list(weights), saved, drops)

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self.optimizer_stepped(trainer) or self.density_in_force is None:
            return
        values: dict[str, Any] = {"grad_mask/density": self.density_in_force}
        if self._fraction is not None and self._fraction_step == trainer.global_step - 1:
            values["grad_mask/kept_norm_fraction"] = self._fraction
        log_step(trainer, pl_module, values)

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(refresh_every=self.refresh_every, include=self.include, exclude=self.exclude)

    @override
    def technique_state(self) -> dict[str, Any]:
        return {"patterns": {name: p.cpu() for name, p in self.patterns.items()}, "density": self.density_in_force,
                "refreshed_at": self.refreshed_at}

    @override
    def load_technique_state(self, state: dict[str, Any]) -> None:
        self.patterns = {name: p.bool() for name, p in state.get("patterns", {}).items()}
        self._keeps = {}
        self.density_in_force = state.get("density")
        self.refreshed_at = state.get("refreshed_at")
