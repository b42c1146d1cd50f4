"""Static sparsity, optionally released: sparse pre-training, dense fine-tuning (SPDF)."""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import nn
from typing_extensions import override

from lit_eff import sparsity, validation
from lit_eff.callbacks.masking import MaskingTechnique
from lit_eff.callbacks.technique import log_step


class StaticSparsity(MaskingTechnique):
    """A fixed mask from the start; at ``release_step`` the mask goes and all weights learn (SPDF).

    Each layer gets one mask at its density (``uniform`` or ``erk``), random or the largest initial
    ``|W|``. After the optimizer step that reaches ``release_step`` (or ``release_fraction`` of the run)
    every weight trains; without either the model stays sparse. Logs ``sparsity/target`` and
    ``sparsity/released``. The card: docs/techniques/spdf.md.

    Example::

        trainer:
          callbacks+:
            - class_path: lit_eff.callbacks.StaticSparsity
              init_args: {sparsity: 0.75, mask: random, release_fraction: 0.75}
    """

    ste = False
    _key_fields = ("sparsity", "mask", "distribution")

    def __init__(self, sparsity: float = 0.75, mask: Literal["random", "magnitude"] = "random",
                 distribution: Literal["uniform", "erk"] = "uniform", release_step: int | None = None,
                 release_fraction: float | None = None, include: list[str] | None = None,
                 exclude: list[str] | None = None, layers: list[Literal["linear", "conv"]] | None = None,
                 on_nonfinite: Literal["raise", "warn"] = "raise") -> None:
        super().__init__(include, exclude, layers, on_nonfinite)
        self.sparsity = validation.check_sparsity(sparsity)
        validation.check_choice("mask", mask, ["random", "magnitude"])
        validation.check_choice("distribution", distribution, ["uniform", "erk"])
        validation.check_int("release_step", release_step, minimum=1, allow_none=True)
        if release_fraction is not None:
            validation.check_fraction("release_fraction", release_fraction, low_open=True, high_open=True)
        if release_step is not None and release_fraction is not None:
            raise ValueError(f"Expected at most one of `release_step` and `release_fraction`, got "
                             f"release_step={release_step}, release_fraction={release_fraction}")
        self.mask, self.distribution, self.release_step = mask, distribution, release_step
        self.release_fraction = None if release_fraction is None else float(release_fraction)
        self.densities: dict[str, float] = {}
        self._release: int | None = release_step  # resolved release step
        self.released = False
        self._released_at: int | None = None

    @property
    def resolved_release_step(self) -> int | None:
        """The optimizer step after which the mask is released (``None``: never)."""
        return self._release

    @override
    def mask_changes_after(self, step: int, total_steps: int) -> str | None:
        release = self._release
        if self.released or release is None or release <= step or release > total_steps:
            return None
        return f"it releases its masks at step {release}"

    @override
    def check_targets(self, targets: dict[str, nn.Module]) -> None:
        shapes = {name: tuple(module.weight.shape) for name, module in targets.items()}
        spread = sparsity.erk_densities if self.distribution == "erk" else sparsity.uniform_densities
        self.densities = spread(shapes, 1.0 - self.sparsity)

    @override
    def attached(self) -> None:
        self._drawn, self.released, self._released_at = False, False, None

    @override
    def resolve(self, trainer: Trainer) -> None:
        if self._release is None and self.release_fraction is not None:
            total = self.run_length(trainer, "set `release_step` or trainer.max_steps")
            self._release = max(1, int(self.release_fraction * total))
        run = self.known_length(trainer)
        if self.release_step is not None and run is not None and self.release_step >= run:
            validation.warn_inactive(self.name, "release_step", self.release_step, run,
                                     "the masks are never released (sparse to the end)")

    @override
    def plan_densities(self, step: int, total: int) -> dict[str, float]:
        release = self.release_step
        if release is None and self.release_fraction is not None:
            release = max(1, int(self.release_fraction * total))
        released = release is not None and step >= release
        return {name: 1.0 if released else self.densities[name] for name in self.targets}

    def _release_if_due(self, step: int) -> None:
        if not self.released and self._release is not None and step >= self._release:
            self.group.set_masks([torch.ones_like(p.mask) for p in self.group.params], density=1.0)
            self.released, self._released_at = True, step

    @override
    def start(self, trainer: Trainer) -> None:
        if not self._drawn:
            self.draw(self.densities, "spdf-init", magnitude=self.mask == "magnitude")
        if not self.released:
            self.enforce(trainer)
        self._release_if_due(trainer.global_step)

    @override
    def after_step(self, trainer: Trainer, pl_module: LightningModule, step: int) -> None:
        self._release_if_due(step)
        log_step(trainer, pl_module, {"sparsity/target": 0.0 if self.released else self.sparsity,
                                      "sparsity/released": float(self.released)})

    @override
    def technique_state(self) -> dict[str, Any]:
        return {"release_step": self._release, "drawn": self._drawn, "released": self.released,
                "released_at": self._released_at}

    @override
    def load_technique_state(self, state: dict[str, Any]) -> None:
        if self.release_step is None and state.get("release_step") is not None:
            self._release = int(state["release_step"])
        self._drawn = bool(state.get("drawn", True))  # a saved state comes from a started run
        self.released = bool(state.get("released", False))
        self._released_at = None if state.get("released_at") is None else int(state["released_at"])
