"""N:M weight sparsity during training: STE, SR-STE and progressive gradient flow."""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import nn
from typing_extensions import override

from lit_eff import validation
from lit_eff.callbacks.masking import MaskingTechnique
from lit_eff.callbacks.technique import log_step
from lit_eff.sparsity import NMSchedule, nm_frames


class NMSparsity(MaskingTechnique):
    """Trains with N:M sparse weights: ``n`` of every ``m`` consecutive input weights kept.

    Forward reads ``W ⊙ (E + β(1−E))``, ``E`` the N:M mask of ``|W|`` recomputed every ``update_every``
    optimizer steps (and when the frame changes), with a straight-through gradient;
    ``method`` is ``"ste"``, ``"srste"`` (adds ``λ(1−E)⊙W`` to the gradient) or ``"mask_decay"`` (β decays
    from 1 to 0). Phases follow :class:`lit_eff.sparsity.NMSchedule`. Logs ``sparsity/{beta,n,m,density}``.
    The card: docs/techniques/nm_sparsity.md.

    Example::

        trainer:
          callbacks+:
            - class_path: lit_eff.callbacks.NMSparsity
              init_args: {n: 2, m: 4, method: srste}
    """

    ste = True
    _key_fields = ("n", "m", "method")

    def __init__(self, n: int = 2, m: int = 4, method: Literal["ste", "srste", "mask_decay"] = "srste",
                 srste_lambda: float = 2e-4, decay: Literal["linear", "exp"] = "exp", decay_rate: float = 2e-4,
                 structure_decay: Literal["none", "stepwise", "geometric"] = "none", dense_steps: int = 0,
                 finetune_steps: int = 0, total_steps: int | None = None, include: list[str] | None = None,
                 exclude: list[str] | None = None, layers: list[Literal["linear", "conv"]] | None = None,
                 on_nonfinite: Literal["raise", "warn"] = "raise", update_every: int = 1) -> None:
        super().__init__(include, exclude, layers, on_nonfinite)
        validation.check_nm(n, m)
        validation.check_choice("method", method, ["ste", "srste", "mask_decay"])
        validation.check_choice("decay", decay, ["linear", "exp"])
        validation.check_choice("structure_decay", structure_decay, ["none", "stepwise", "geometric"])
        self.srste_lambda = validation.check_number("srste_lambda", srste_lambda, 0.0)
        self.decay_rate = validation.check_number("decay_rate", decay_rate, 0.0, low_open=True)
        validation.check_int("dense_steps", dense_steps)
        validation.check_int("finetune_steps", finetune_steps)
        validation.check_int("total_steps", total_steps, minimum=1, allow_none=True)
        validation.check_int("update_every", update_every, minimum=1)
        if structure_decay == "stepwise" and (m % n or (m // n) & (m // n - 1)):
            raise ValueError(f"Expected `m / n` to be a power of 2 with structure_decay='stepwise' "
                             f"(frames (m-1):m, m/2:m, ..., n:m), got n={n}, m={m}")
        self.n, self.m, self.method, self.decay, self.structure_decay = n, m, method, decay, structure_decay
        self.dense_steps, self.finetune_steps = dense_steps, finetune_steps
        self.total_steps, self.update_every = total_steps, update_every
        self.schedule: NMSchedule | None = None if total_steps is None else self._schedule(total_steps)
        self._current: tuple[float, int, int, float] = (1.0, m, m, 1.0)  # beta, n, m, density in force

    def _schedule(self, total_steps: int) -> NMSchedule:
        return NMSchedule(self.n, self.m, total_steps, self.method, self.decay, self.decay_rate,
                          self.structure_decay, self.dense_steps, self.finetune_steps)

    def _sched(self) -> NMSchedule:
        if self.schedule is None:
            raise RuntimeError("NMSparsity.total_steps is not resolved yet: pass `total_steps` or run it in a Trainer")
        return self.schedule

    def frames(self) -> list[tuple[int, int]]:
        """The N:M patterns of the decay phase, in order."""
        return nm_frames(self.n, self.m, self.structure_decay)

    def phase(self, step: int) -> str:
        return self._sched().phase(step)

    def frame(self, step: int) -> tuple[int, int]:
        return self._sched().frame(step)

    def beta(self, step: int) -> float:
        return self._sched().beta(step)

    @override
    def mask_changes_after(self, step: int, total_steps: int) -> str | None:
        schedule = self._sched()
        last = min(total_steps, schedule.total_steps) - 1
        if last <= step or (schedule.frame(step), schedule.beta(step)) == (schedule.frame(last), schedule.beta(last)):
            return None
        (n0, m0), (n1, m1) = schedule.frame(step), schedule.frame(last)
        return (f"its N:M frame/β moves from {n0}:{m0}/{schedule.beta(step):g} at step {step} to "
                f"{n1}:{m1}/{schedule.beta(last):g} at step {last}")

    @override
    def plan_densities(self, step: int, total: int) -> dict[str, float]:
        total = max(self.total_steps or total, self.dense_steps + self.finetune_steps)  # shorter runs fail at fit
        if getattr(self, "_planned", (None,))[0] != total:
            self._planned = (total, self._schedule(total))
        return dict.fromkeys(self.targets, self._planned[1].density(step))

    @override
    def check_targets(self, targets: dict[str, nn.Module]) -> None:
        frame = f" (a {self.structure_decay} structure-decay frame)"
        self.check_group_sizes(targets, {m: frame for _, m in self.frames()} | {self.m: ""})

    @override
    def resolve(self, trainer: Trainer) -> None:
        run = self.known_length(trainer)
        if self.schedule is None:
            self.schedule = self._schedule(self.total_steps or self.run_length(
                trainer, "set `total_steps` or trainer.max_steps"))
        if run is None:
            return
        sparse_from = self.schedule.total_steps - self.finetune_steps  # n:m with β = 0 from here on
        if self.dense_steps >= run:
            validation.warn_inactive(self.name, "dense_steps", self.dense_steps, run, "the whole run trains dense")
        elif sparse_from > run:
            validation.warn_inactive(self.name, "total_steps", self.schedule.total_steps, run,
                                     f"the schedule reaches {self.n}:{self.m} with β = 0 only at step {sparse_from}")

    @torch.no_grad()
    def _apply(self, step: int, start: bool = False) -> None:
        """Masks (from the current weights, all layers at once), β and reported density for ``step``."""
        schedule = self._sched()
        (n, m), beta = schedule.frame(step), schedule.beta(step)
        # a new frame; at the start: masks of another density (fresh all-ones ones; loaded ones stay)
        new_frame = any(p._density != n / m for p in self.group.params) if start else (n, m) != self._current[1:3]
        if n == m:
            if any(p._density != 1.0 for p in self.group.params):
                self.group.set_masks([torch.ones_like(p.mask) for p in self.group.params], density=1.0)
        elif step % self.update_every == 0 or new_frame:
            self.group.set_nm_masks(n, m)
        self.group.set_beta(beta)
        self._current = (beta, n, m, schedule.density(step))

    @override
    def start(self, trainer: Trainer) -> None:
        self._apply(trainer.global_step, start=True)

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        if self.method == "srste" and self.srste_lambda and self.phase(trainer.global_step) != "dense":
            self.group.add_pruned_weights_to_grad(self.srste_lambda)  # grad += λ (1 − E) ⊙ W, fused

    @override
    def after_step(self, trainer: Trainer, pl_module: LightningModule, step: int) -> None:
        beta, n, m, density = self._current  # what the step that just finished used
        log_step(trainer, pl_module, {"sparsity/beta": beta, "sparsity/n": float(n), "sparsity/m": float(m),
                                      "sparsity/density": density})
        self._apply(step)

    @override
    def technique_state(self) -> dict[str, Any]:
        return {"total_steps": None if self.schedule is None else self.schedule.total_steps}

    @override
    def load_technique_state(self, state: dict[str, Any]) -> None:
        total = state.get("total_steps")
        if self.total_steps is None and total is not None:
            self.schedule = self._schedule(int(total))
