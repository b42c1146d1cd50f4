"""FlopsBudget plans the run's length: the run spends the budget (within 1%) and ends every
schedule there, whether its steps all cost the same or get cheaper during training."""

import pytest
from lightning.pytorch import Callback

from lit_eff.callbacks import FlopsBudget, FlopsMonitor, LayerFreezing, NMSparsity, TokenDrop
from lit_eff.schedules import Linear, Schedule
from tests.helpers import digits, make_trainer, seeded, tiny_vit

BUDGET = 3e9  # about 50 dense steps of the tiny ViT on digits: more than one epoch


class StepFlops(Callback):
    """Records each optimizer step's FLOPs as FlopsMonitor booked them."""

    def __init__(self, monitor: FlopsMonitor) -> None:
        self.monitor, self.steps = monitor, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.monitor.end_batch(trainer, pl_module)
        self.steps.append(self.monitor.last_step_executed)


def budget_run(techniques, kind="executed", **trainer_kwargs):
    seeded(0)
    monitor, budget = FlopsMonitor(), FlopsBudget(BUDGET, kind=kind)
    record = StepFlops(monitor)
    trainer_kwargs.setdefault("max_epochs", 1)  # the plan overrides it
    trainer = make_trainer(callbacks=[monitor, *techniques, budget, record], limit_train_batches=1.0,
                           limit_val_batches=0, **trainer_kwargs)
    trainer.fit(tiny_vit(lr=1e-3), datamodule=digits())
    spent = monitor.total_executed if kind == "executed" else monitor.total_effective
    return trainer, budget, spent, record.steps


def assert_schedule_ended(trainer, steps):
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.last_epoch == steps  # the cosine ran over exactly the planned steps...
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # ...to its end


def test_dense_and_cheaper_steps_both_spend_the_budget_and_end_their_schedules():
    dense, dense_budget, dense_spent, _ = budget_run([])
    freezing = LayerFreezing(final_fraction=1.0, freeze_start=0.1, freeze_end=0.6)
    frozen, frozen_budget, frozen_spent, frozen_steps = budget_run([freezing])
    for trainer, budget, spent in [(dense, dense_budget, dense_spent), (frozen, frozen_budget, frozen_spent)]:
        assert trainer.global_step == budget.planned_steps
        assert abs(spent - BUDGET) <= 0.01 * BUDGET
        assert spent == pytest.approx(budget.planned_flops, rel=1e-9)  # the plan counted what ran
        assert_schedule_ended(trainer, budget.planned_steps)
    # freezing makes later steps cheaper, so the same budget buys more steps
    assert frozen_steps[-1] < 0.8 * frozen_steps[0]
    assert frozen_budget.planned_steps > 1.3 * dense_budget.planned_steps
    # the technique's schedule is a fraction of the planned run: the last unit froze at 60% of it
    assert freezing.first_freeze_step(len(freezing.units.names)) == pytest.approx(0.6 * frozen.global_step, abs=2)


def test_token_schedule_in_absolute_steps_is_followed():
    drop = TokenDrop(keep_ratios=[Linear(1.0, 0.5, 0, 40)], blocks=[0])
    trainer, budget, spent, steps = budget_run([drop])
    assert abs(spent - BUDGET) <= 0.01 * BUDGET and trainer.global_step == budget.planned_steps
    assert steps[-1] < steps[0]


def test_a_schedule_that_leaves_its_range_in_the_planned_run_is_refused():
    """The configured 20 steps keep `keep_ratios` in (0, 1]; the budget plans a longer run, where
    the ramp reaches 0: refused before training, naming the step and the planned length."""
    class Stop(Schedule):  # a user's schedule: keeps half the tokens, none from step 30 on
        def __call__(self, step):
            return 0.5 if step < 30 else 0.0

    drop = TokenDrop(keep_ratios=[Stop()], blocks=[0])
    with pytest.raises(ValueError, match=r"TokenDrop: Expected `keep_ratios` in \(0, 1\] at every step of the "
                                         r"run \(0\.\.\d+\), got .* = 0 at step 30"):
        budget_run([drop], max_steps=20)


def test_effective_budget_follows_the_sparsity_schedule():
    nm = NMSparsity(n=2, m=4, dense_steps=20)  # dense first, then 2:4: effective FLOPs fall mid-run
    trainer, budget, spent, _ = budget_run([nm], kind="effective")
    assert abs(spent - BUDGET) <= 0.01 * BUDGET
    assert spent == pytest.approx(budget.planned_flops, rel=1e-9)
    assert_schedule_ended(trainer, budget.planned_steps)


def test_budget_without_a_plan_stops_at_the_budget():
    seeded(0)
    monitor, budget = FlopsMonitor(), FlopsBudget(BUDGET, plan=False)
    trainer = make_trainer(callbacks=[monitor, budget], limit_train_batches=1.0, limit_val_batches=0, max_epochs=5)
    trainer.fit(tiny_vit(), datamodule=digits())
    assert budget.planned_steps is None
    assert BUDGET <= monitor.total_executed < BUDGET + monitor.last_step_executed


def test_budget_before_the_techniques_is_refused():
    trainer = make_trainer(callbacks=[FlopsMonitor(), FlopsBudget(BUDGET), LayerFreezing()], max_steps=2)
    with pytest.raises(ValueError, match=r"FlopsBudget plans the run .* move it after LayerFreezing"):
        trainer.fit(tiny_vit(), datamodule=digits())


def test_a_technique_that_cannot_plan_is_refused_with_the_way_out():
    from lit_eff.callbacks import StructuredPruning

    trainer = make_trainer(callbacks=[FlopsMonitor(), StructuredPruning(), FlopsBudget(BUDGET)], max_steps=10)
    with pytest.raises(ValueError, match=r"cannot tell ahead how StructuredPruning .* use `plan: false`"):
        trainer.fit(tiny_vit(), datamodule=digits())
