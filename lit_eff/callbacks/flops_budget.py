"""Stop training at a FLOPs budget, for comparisons at equal compute."""

from __future__ import annotations

from typing import Any, Literal

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lit_eff.callbacks.technique import log_step
from lit_eff.callbacks.flops_monitor import FlopsMonitor


class FlopsBudget(Callback):
    """Stops training after the optimizer step at which the run's training FLOPs reach ``budget``.

    Reads the totals of the :class:`FlopsMonitor` in ``trainer.callbacks`` (required):
    ``kind="executed"`` counts what the hardware ran, ``"effective"`` the sparse-effective count.
    Logs ``flops/budget_used`` (fraction of the budget spent).

    Runs on: ``setup`` (checks), ``on_train_batch_end`` (decision, identical on every rank).

    Example::

        trainer:
          callbacks+:
            - class_path: lit_eff.callbacks.FlopsBudget
              init_args: {budget: 2.0e13, kind: executed}
    """

    def __init__(self, budget: float, kind: Literal["executed", "effective"] = "executed") -> None:
        if not budget > 0:
            raise ValueError(f"Expected `budget` > 0 (training FLOPs), got budget={budget}")
        if kind not in ("executed", "effective"):
            raise ValueError(f"Expected `kind` in ('executed', 'effective'), got kind={kind!r}")
        self.budget = float(budget)
        self.kind = kind
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

    def spent(self) -> float:
        assert self.monitor is not None
        return self.monitor.total_executed if self.kind == "executed" else self.monitor.total_effective

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        assert self.monitor is not None
        self.monitor.end_batch(trainer, pl_module)
        used = self.spent() / self.budget
        log_step(trainer, pl_module, {"flops/budget_used": used})
        if used >= 1.0 and not trainer.should_stop:
            trainer.should_stop = True
            rank_zero_info(f"lit_eff: FLOPs budget of {self.budget:.4g} ({self.kind}) reached at step "
                           f"{trainer.global_step}; stopping")
