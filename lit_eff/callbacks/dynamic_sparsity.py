"""Dynamic sparse training at constant sparsity: RigL (Evci et al. 2020) and SET (Mocanu et al. 2018)."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import nn
from typing_extensions import override

from lit_eff import sparsity, validation
from lit_eff.callbacks.masking import MaskingTechnique
from lit_eff.callbacks.technique import log_step
from lit_eff.seeding import generator, run_seed
from lit_eff.sparsity import rigl
from lit_eff.sparsity.sharded import full


class DynamicSparsity(MaskingTechnique):
    """Trains at constant sparsity while moving the mask: RigL (grow by gradient) or SET (grow at random).

    Each layer starts from a random mask at its density (``uniform`` or ``erk``); every ``update_every``
    steps until ``stop_fraction`` of the run, the cosine-decayed fraction of smallest ``|W|`` is dropped
    and as many grown by dense ``|∇W|`` (RigL) or at random (SET). Logs ``sparsity/drop_fraction`` and
    ``sparsity/mask_changes``. The card: docs/techniques/dynamic_sparsity.md.

    Example::

        trainer:
          callbacks+:
            - class_path: lit_eff.callbacks.DynamicSparsity
              init_args: {sparsity: 0.9, method: rigl, distribution: erk, update_every: 100}
    """

    ste = False
    _key_fields = ("sparsity", "method", "distribution")

    def __init__(self, sparsity: float, method: Literal["rigl", "set"] = "rigl",
                 distribution: Literal["uniform", "erk"] = "uniform", update_every: int = 100,
                 drop_fraction: float = 0.3, stop_fraction: float = 0.75, include: list[str] | None = None,
                 exclude: list[str] | None = None, layers: list[Literal["linear", "conv"]] | None = None,
                 on_nonfinite: Literal["raise", "warn"] = "raise") -> None:
        super().__init__(include, exclude, layers, on_nonfinite)
        self.sparsity = validation.check_sparsity(sparsity)
        validation.check_choice("method", method, ["rigl", "set"])
        validation.check_choice("distribution", distribution, ["uniform", "erk"])
        validation.check_int("update_every", update_every, minimum=1)
        self.drop_fraction = validation.check_fraction("drop_fraction", drop_fraction, low_open=True)
        self.stop_fraction = validation.check_fraction("stop_fraction", stop_fraction, low_open=True)
        self.method, self.distribution, self.update_every = method, distribution, update_every
        self.densities: dict[str, float] = {}
        self.active: dict[str, int] = {}  # active weights per layer (constant)
        self._end: int | None = None  # T_end
        self._last_update: int | None = None
        self._mask_changes = 0.0
        self._grads: dict[str, torch.Tensor] = {}  # dense gradients of the step before a RigL update

    @property
    def end_step(self) -> int:
        """``T_end``, resolved when the fit starts."""
        if self._end is None:
            raise RuntimeError("DynamicSparsity's stop step is not resolved yet: run it in a Trainer")
        return self._end

    def is_update(self, step: int) -> bool:
        """Whether the masks move after the optimizer step that reaches ``step``."""
        return rigl.is_update(step, self.update_every, self.end_step)

    def alpha(self, step: int) -> float:
        """``α_t``: the cosine-decayed drop fraction (0 from ``T_end`` on)."""
        return rigl.drop_fraction(step, self.drop_fraction, self.end_step)

    @override
    def mask_changes_after(self, step: int, total_steps: int) -> str | None:
        last = rigl.last_update(self.update_every, self.end_step, total_steps)
        return None if last is None or last <= step else f"it moves masks until step {last}"

    @override
    def check_targets(self, targets: dict[str, nn.Module]) -> None:
        shapes = {name: tuple(module.weight.shape) for name, module in targets.items()}
        spread = sparsity.erk_densities if self.distribution == "erk" else sparsity.uniform_densities
        self.densities = spread(shapes, 1.0 - self.sparsity)
        self.active = {name: round(self.densities[name] * math.prod(shape)) for name, shape in shapes.items()}

    @override
    def attached(self) -> None:
        self._drawn, self._last_update = False, None

    @override
    def resolve(self, trainer: Trainer) -> None:
        total = self.run_length(trainer, "set trainer.max_steps")
        if self._end is None:
            self._end = int(self.stop_fraction * total)
        if rigl.last_update(self.update_every, self._end, total) is None:
            validation.warn_inactive(self.name, "update_every", self.update_every, total,
                                     f"masks move only at multiples of it before step {self._end} "
                                     f"(stop_fraction={self.stop_fraction:g}), so they never move")

    @override
    def plan_densities(self, step: int, total: int) -> dict[str, float]:
        return {name: self.densities[name] for name in self.targets}

    @override
    def start(self, trainer: Trainer) -> None:
        if not self._drawn:  # a fresh run
            self.draw(self.densities, "rigl-init")
        self.group.dense_values(False)
        self.enforce(trainer)

    def _captures(self, trainer: Trainer) -> bool:
        """Whether the optimizer step now running (``global_step`` + 1) precedes a RigL update."""
        return self.method == "rigl" and self.is_update(trainer.global_step + 1)

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._captures(trainer):
            # forward multiplies by ones (the same value: W is 0 where pruned), so W.grad is the dense ∂L/∂(W ⊙ M)
            self.group.dense_values(True)

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        if not self._captures(trainer):
            return  # forward multiplied by M: pruned positions already have a zero gradient
        self._grads.update({name: full(weight.grad).detach().clone()
                            for name, weight in zip(self.group.names, self.group.weights) if weight.grad is not None})
        self.group.dense_values(False)
        self.group.mask_gradients()

    @torch.no_grad()
    def _update(self, step: int) -> None:
        alpha, masks = self.alpha(step), []
        for name, weight, p in zip(self.group.names, self.group.full_weights(), self.group.params):
            if self.method == "rigl":
                grad = self._grads.get(name)
                scores = grad.abs() if grad is not None else torch.zeros(p.mask.shape, device=p.mask.device)
            else:
                scores = torch.rand(p.mask.shape, generator=generator(run_seed(), step, "set", name)).to(p.mask.device)
            masks.append(sparsity.drop_and_grow(weight, p.mask, math.floor(alpha * self.active[name]), scores))
        grown = torch.stack([(new & ~p.mask).sum() for new, p in zip(masks, self.group.params)]).sum()
        self.group.set_masks(masks, density=[self.active[n] / m.numel() for n, m in zip(self.group.names, masks)])
        self._grads, self._last_update = {}, step
        self._mask_changes = float(grown) / max(1, sum(self.active.values()))

    @override
    def after_step(self, trainer: Trainer, pl_module: LightningModule, step: int) -> None:
        if self.is_update(step) and self._last_update != step:
            self._update(step)
            self.enforce(trainer)
        log_step(trainer, pl_module, {"sparsity/drop_fraction": self.alpha(step),
                                      "sparsity/mask_changes": self._mask_changes})

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._grads = {}
        super().teardown(trainer, pl_module, stage)

    @override
    def technique_state(self) -> dict[str, Any]:
        return {"end_step": self._end, "drawn": self._drawn, "last_update": self._last_update,
                "mask_changes": self._mask_changes}

    @override
    def load_technique_state(self, state: dict[str, Any]) -> None:
        if state.get("end_step") is not None:
            self._end = int(state["end_step"])
        self._drawn = bool(state.get("drawn", True))  # a saved state comes from a started run
        self._last_update = None if state.get("last_update") is None else int(state["last_update"])
        self._mask_changes = float(state.get("mask_changes", 0.0))
