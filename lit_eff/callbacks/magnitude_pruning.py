"""Gradual magnitude pruning (Zhu & Gupta 2017): the polynomial sparsity schedule."""

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
from lit_eff.sparsity import PruningSchedule


class MagnitudePruning(MaskingTechnique):
    """Prunes the smallest-magnitude weights gradually, on Zhu & Gupta's polynomial schedule.

    Every ``update_every`` steps from ``start_step`` to ``end_step`` (default: 3/4 of the run) the
    sparsity steps up to :class:`lit_eff.sparsity.PruningSchedule`'s target, per layer or with one
    threshold across layers (``scope``); ``structure="nm"`` ends exactly ``n:m``. Logs
    ``sparsity/target`` and ``sparsity/actual``. The card: docs/techniques/magnitude_pruning.md.

    Example::

        trainer:
          callbacks+:
            - class_path: lit_eff.callbacks.MagnitudePruning
              init_args: {final_sparsity: 0.8, start_step: 100, end_step: 1500, update_every: 100}
    """

    ste = False
    _key_fields = ("final_sparsity", "scope", "structure")

    def __init__(self, final_sparsity: float, initial_sparsity: float = 0.0, start_step: int = 0,
                 end_step: int | None = None, update_every: int = 100, power: float = 3.0,
                 scope: Literal["layer", "global"] = "layer", structure: Literal["unstructured", "nm"] = "unstructured",
                 n: int = 2, m: int = 4, include: list[str] | None = None, exclude: list[str] | None = None,
                 layers: list[Literal["linear", "conv"]] | None = None,
                 on_nonfinite: Literal["raise", "warn"] = "raise") -> None:
        super().__init__(include, exclude, layers, on_nonfinite)
        self.final_sparsity = validation.check_sparsity(final_sparsity, "final_sparsity")
        self.initial_sparsity = validation.check_sparsity(initial_sparsity, "initial_sparsity")
        if initial_sparsity > final_sparsity:
            raise ValueError(f"Expected `initial_sparsity` <= `final_sparsity`, got "
                             f"initial_sparsity={initial_sparsity}, final_sparsity={final_sparsity}")
        validation.check_int("start_step", start_step)
        validation.check_int("end_step", end_step, minimum=1, allow_none=True)
        validation.check_int("update_every", update_every, minimum=1)
        self.power = validation.check_number("power", power, 0.0, low_open=True)
        validation.check_choice("scope", scope, ["layer", "global"])
        validation.check_choice("structure", structure, ["unstructured", "nm"])
        validation.check_nm(n, m)
        if structure == "nm" and not math.isclose(final_sparsity, 1 - n / m, abs_tol=1e-9):
            raise ValueError(f"Expected `final_sparsity` = 1 - n/m = {1 - n / m:g} with structure='nm' (the final mask "
                             f"is exactly n:m), got final_sparsity={final_sparsity}, n={n}, m={m}")
        self.start_step, self.end_step, self.update_every = start_step, end_step, update_every
        self.scope, self.structure, self.n, self.m = scope, structure, n, m
        self.schedule = None if end_step is None else self._schedule(end_step)
        self._last_update: int | None = None  # the update step the masks were last computed for

    def _schedule(self, end_step: int, how: str = "") -> PruningSchedule:
        try:
            return PruningSchedule(self.final_sparsity, self.initial_sparsity, self.start_step, end_step,
                                   self.update_every, self.power)
        except ValueError as error:
            raise ValueError(f"{error}{how}") from None

    @override
    def plan_densities(self, step: int, total: int) -> dict[str, float]:
        # per layer with scope="layer"; with scope="global" the overall density (layers differ)
        schedule = self.schedule if self.end_step is not None else self._schedule(max(1, int(0.75 * total)))
        return dict.fromkeys(self.targets, 1.0 - schedule.target(step))

    def _sched(self) -> PruningSchedule:
        if self.schedule is None:
            raise RuntimeError("MagnitudePruning.end_step is not resolved yet: pass `end_step` or run it in a Trainer")
        return self.schedule

    def update_step(self, step: int) -> int | None:
        """The last update step ``<= step`` (``None`` before ``start_step``)."""
        return self._sched().update_step(step)

    def target(self, step: int) -> float:
        """The scheduled sparsity in force at optimizer step ``step``."""
        return self._sched().target(step)

    @override
    def mask_changes_after(self, step: int, total_steps: int) -> str | None:
        last = self._sched().last_update(total_steps)
        if last is None or last <= step:
            return None
        return f"it updates masks until step {last} (end_step={self.schedule.end_step})"

    @override
    def check_targets(self, targets: dict[str, nn.Module]) -> None:
        if self.structure == "nm":
            self.check_group_sizes(targets, {self.m: ""})

    @override
    def attached(self) -> None:
        self._last_update = None

    @override
    def resolve(self, trainer: Trainer) -> None:
        if self.schedule is None:
            total = self.run_length(trainer, "set `end_step` or trainer.max_steps")
            self.schedule = self._schedule(int(0.75 * total), f" (3/4 of {total} training steps); set `end_step`")
        run = self.known_length(trainer)
        if run is None:
            return
        if self.start_step >= run:
            validation.warn_inactive(self.name, "start_step", self.start_step, run, "nothing is ever pruned")
        elif self.schedule.end_step > run:
            validation.warn_inactive(self.name, "end_step", self.schedule.end_step, run,
                                     f"the run ends before `final_sparsity`={self.final_sparsity:g} is reached")

    @torch.no_grad()
    def _update(self, trainer: Trainer, step: int) -> None:
        """New masks at the sparsity scheduled for ``step``, from the current weights."""
        nm = (self.n, self.m) if self.structure == "nm" else None
        scores = {name: sparsity.pruning_scores(weight, p.mask, nm)
                  for name, weight, p in zip(self.group.names, self.group.full_weights(), self.group.params)}
        masks, densities = sparsity.prune(scores, self.target(step), self.scope)
        self.group.set_masks([masks[name] for name in self.group.names],
                             density=[densities[name] for name in self.group.names])
        self._last_update = self.update_step(step)
        self.enforce(trainer)

    @override
    def start(self, trainer: Trainer) -> None:
        due = self.update_step(trainer.global_step)
        if due is not None and due != self._last_update:  # not already in the checkpoint
            self._update(trainer, trainer.global_step)

    @override
    def after_step(self, trainer: Trainer, pl_module: LightningModule, step: int) -> None:
        if self.update_step(step) == step:
            self._update(trainer, step)
        log_step(trainer, pl_module, lambda: {"sparsity/target": self.target(step), "sparsity/actual": self._actual()})

    @torch.no_grad()
    def _actual(self) -> float:
        """The counted fraction of zeros among the targeted dense weights."""
        weights = self.group.full_weights()
        zeros = torch.stack([(w == 0).sum() for w in weights]).sum()
        return float(zeros) / sum(w.numel() for w in weights)

    @override
    def technique_state(self) -> dict[str, Any]:
        return {"end_step": None if self.schedule is None else self.schedule.end_step, "last_update": self._last_update}

    @override
    def load_technique_state(self, state: dict[str, Any]) -> None:
        self._last_update = None if state.get("last_update") is None else int(state["last_update"])
        if self.end_step is None and state.get("end_step") is not None:
            self.schedule = self._schedule(int(state["end_step"]))
