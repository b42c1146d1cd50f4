"""Spend a FLOPs budget: plan the run's length so every schedule ends there, and stop there."""

from __future__ import annotations

import math
from collections.abc import Hashable
from contextlib import ExitStack
from typing import Any, Literal

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lit_eff import planning, validation
from lit_eff.callbacks.flops_monitor import FlopsMonitor
from lit_eff.callbacks.technique import Technique, log_step

class FlopsBudget(Callback):
    """Trains for exactly a FLOPs budget.

    With ``plan=True`` (the default), before training starts it sets the run's length (``max_steps``)
    to the number of optimizer steps whose FLOPs reach ``budget``, so the learning-rate schedule and
    every technique schedule given as a fraction of training end exactly at the budget: a technique
    with cheaper steps gets proportionally more of them. The plan follows each technique's
    schedule (frozen layers, token schedules, sparsity phases), the data loader's batch sizes,
    gradient accumulation and the number of processes; schedules given in absolute steps stay
    where they are. Training then stops after the optimizer step at which the spent FLOPs reach
    the budget (with a plan, that is the planned last step).

    Reads the totals of the :class:`FlopsMonitor` in ``trainer.callbacks`` (required):
    ``kind="executed"`` counts what the hardware ran, ``"effective"`` the sparse-effective count.
    Place it after the techniques in ``trainer.callbacks`` (it plans with them attached). Logs
    ``flops/budget_used`` (fraction of the budget spent).

    Example::

        trainer:
          callbacks+:
            - class_path: lit_eff.callbacks.FlopsBudget
              init_args: {budget: 2.0e13, kind: executed}
    """

    def __init__(self, budget: float, kind: Literal["executed", "effective"] = "executed", plan: bool = True) -> None:
        if not (validation.is_number(budget) and budget > 0):
            raise ValueError(f"Expected `budget` > 0 (training FLOPs), got budget={budget!r}")
        if kind not in ("executed", "effective"):
            raise ValueError(f"Expected `kind` in ('executed', 'effective'), got kind={kind!r}")
        self.budget = float(budget)
        self.kind = kind
        if not isinstance(plan, bool):
            raise ValueError(f"Expected `plan` to be true (set the run's length from the budget) or false (stop "
                             f"at the budget), got plan={plan!r}")
        self.plan = plan
        self.planned_steps: int | None = None
        self.planned_flops: float | None = None
        self.monitor: FlopsMonitor | None = None

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        monitors = [cb for cb in trainer.callbacks if isinstance(cb, FlopsMonitor)]
        if not monitors:
            raise ValueError(
                "FlopsBudget needs a FlopsMonitor in trainer.callbacks to count FLOPs; add "
                "`- class_path: lit_eff.callbacks.FlopsMonitor` to `trainer.callbacks`"
            )
        self.monitor = monitors[0]
        if self.plan and stage == "fit":
            self._plan(trainer, pl_module)

    # planning ---------------------------------------------------------------------------------
    def _techniques(self, trainer: Trainer, pl_module: LightningModule) -> list[Technique]:
        callbacks = list(trainer.callbacks)
        techniques = [cb for cb in callbacks if isinstance(cb, Technique)]
        late = [cb.name for cb in techniques if callbacks.index(cb) > callbacks.index(self)]
        if late:
            raise ValueError(f"FlopsBudget plans the run with the techniques attached, so it goes after them in "
                             f"trainer.callbacks; move it after {', '.join(late)}")
        unplanned = [cb.name for cb in techniques
                     if type(cb).flops_key is not Technique.flops_key and not cb.plans_flops]
        if self.kind == "effective":
            from lit_eff.callbacks.masking import MaskingTechnique

            unplanned += [f"{cb.name} (its masks' densities)" for cb in techniques if isinstance(cb, MaskingTechnique)
                          and type(cb).plan_densities is MaskingTechnique.plan_densities]
        if callable(getattr(pl_module, "flops_key", None)):
            unplanned.append(f"{type(pl_module).__name__} (the compute of its steps is drawn at random or "
                             "depends on the data)")
        if unplanned:
            raise ValueError(f"FlopsBudget(plan=True) cannot tell ahead how {', '.join(unplanned)} change the FLOPs of "
                             "a training step over the run; use `plan: false` (training still stops at the budget, "
                             "but the schedules do not end there)")
        return techniques

    def _plan(self, trainer: Trainer, pl_module: LightningModule) -> None:
        techniques = self._techniques(trainer, pl_module)
        samples = planning.step_samples(trainer)
        batch = planning.sample_batch(trainer, 2)
        probed = planning.batch_size_of(batch)
        counts: dict[Hashable, Any] = {}

        def per_sample(step: int, total: int) -> float:
            states = tuple(cb.plan_state(trainer, step, total) for cb in techniques)
            tracker = counts.get(states)
            if tracker is None:
                with ExitStack() as stack:
                    for cb, state in zip(techniques, states):
                        stack.enter_context(cb.plan_probe(trainer, pl_module, state, batch))
                    tracker = counts[states] = planning.count_training_step(pl_module, batch)
            flops = float(tracker.executed)
            if self.kind == "effective":
                flops -= self._pruned(tracker, techniques, step, total)
            return flops / probed

        def step_flops(step: int, total: int) -> float:
            return samples[step % len(samples)] * per_sample(step, total)

        steps = planning.steps_for_budget(step_flops, self.budget)
        self.planned_steps, self.planned_flops = steps, planning.run_flops(step_flops, steps)
        trainer.fit_loop.epoch_loop.max_steps = steps
        trainer.fit_loop.max_epochs = -1  # the budget, not an epoch count, ends the run
        for cb in techniques:
            cb.replan(trainer)
        rank_zero_info(f"lit_eff: a FLOPs budget of {self.budget:.4g} ({self.kind}) is {steps} optimizer steps "
                       f"({self.planned_flops:.4g} FLOPs, {len(counts)} step shape(s) counted)")

    def _pruned(self, tracker: Any, techniques: list[Technique], step: int, total: int) -> float:
        """The executed FLOPs of ``tracker`` that masks planned for ``step`` leave out."""
        densities: dict[int, float] = {}
        for cb in techniques:
            plan = getattr(cb, "plan_densities", None)
            planned = plan(step, total) if plan is not None else None
            if planned:
                densities.update({id(cb.targets[name]): d for name, d in planned.items()})
        return math.fsum(flops * (1.0 - densities.get(key, 1.0)) for key, (_, flops) in tracker.inside.items())

    # spending ---------------------------------------------------------------------------------
    def spent(self) -> float:
        assert self.monitor is not None
        return self.monitor.total_executed if self.kind == "executed" else self.monitor.total_effective

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        assert self.monitor is not None
        self.monitor.end_batch(trainer, pl_module)
        spent = self.spent()
        log_step(trainer, pl_module, {"flops/budget_used": spent / self.budget})
        # without a plan: stop at the budget; with one, the run ends at its planned last step
        # (within a step of the budget), and this stops only a run whose FLOPs left the plan
        limit = self.budget if self.planned_flops is None else max(self.budget, self.planned_flops) + 0.01 * self.budget
        if spent >= limit and not trainer.should_stop:
            trainer.should_stop = True
            rank_zero_info(f"lit_eff: FLOPs budget of {self.budget:.4g} ({self.kind}) reached at step "
                           f"{trainer.global_step}; stopping")
            if self.planned_steps is not None:
                rank_zero_warn(f"FlopsBudget planned {self.planned_steps} steps for {self.planned_flops:.4g} FLOPs, "
                               f"but {spent:.4g} were spent after {trainer.global_step}: the run's FLOPs left the "
                               "plan, so its schedules end early")
