"""SupernetModule under torch.compile, activation checkpointing and FlopsMonitor: the same weights
and FLOPs as eager/plain, a few graphs serving every sampled subnet, and FlopsMonitor's per-step
count equal to FlopCounterMode's on steps with different subnets."""

import pytest
import torch
from lightning.pytorch import Callback

from lit_eff.callbacks import FlopsMonitor
from lit_eff.models.naming import clean_name
from lit_eff.supernet import DelayedShrinking, Sandwich, SupernetModule
from tests.helpers import digits, flat_state, make_trainer, max_abs_diff, seeded, text
from tests.supernet.common import tiny_supernet
from tests.test_flops import ReferenceCounter


class StepRecorder(Callback):
    """Per training batch: graphs torch.compile built, and the subnets the step trained."""

    def __init__(self):
        self.graphs, self.subnets, self.shapes = [], [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        self.subnets.append(pl_module.flops_key().keys)
        self.shapes.append(tuple(batch[0].shape))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"] - self._before)


def fit(arch, sampler, compiled=None, monitor=False, steps=8, **module_kwargs):
    seeded(0)
    module = tiny_supernet(arch, sampler=sampler(), **module_kwargs)
    recorder = StepRecorder()
    callbacks = [recorder, *([FlopsMonitor()] if monitor else [])]
    trainer = make_trainer(max_steps=steps, callbacks=callbacks, limit_val_batches=1, val_check_interval=4)
    target = module
    if compiled == "module":  # Lightning compiles training_step, validation_step, ...
        target = torch.compile(module, backend="aot_eager")
    elif compiled == "inner":
        module.model = torch.compile(module.model, backend="aot_eager")
    trainer.fit(target, datamodule=digits() if arch == "vit" else text())
    return trainer, module, recorder


def weights(module):
    return {clean_name(k): v for k, v in flat_state(module).items()}


CASES = {
    "vit-module-sandwich": ("vit", "module", lambda: Sandwich(k=2), set()),
    # DεpS: the full model alone for 4 steps, then reorganization and the whole space (a phase change)
    "gpt-inner-deps": ("gpt", "inner", lambda: DelayedShrinking(start_fraction=0.5, warmup_fraction=0.25, k=2), {4}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_compiled_equals_eager_with_a_few_graphs_for_every_subnet(case):
    arch, form, sampler, phases = CASES[case]
    _, eager, eager_steps = fit(arch, sampler)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    try:
        trainer, compiled, steps = fit(arch, sampler, compiled=form)
        assert trainer.global_step == 8 and steps.subnets == eager_steps.subnets
        assert max_abs_diff(weights(compiled), weights(eager)) <= 1e-5
        # graphs are built on the first batch (and the one that changes phase), then reused for
        # the subnets later steps draw, which the earlier steps never ran
        built = {i for i, n in enumerate(steps.graphs) if n}
        assert built <= {0} | phases, f"compiled again on batches {sorted(built)}: {steps.graphs}"
        seen = {cfg for key in steps.subnets[: max(phases, default=0) + 1] for cfg in key}
        assert {cfg for key in steps.subnets for cfg in key} - seen, "no new subnet after the compiled batches"
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 20  # training and evaluation
    finally:
        torch._dynamo.reset()


def test_compiled_with_flops_monitor_counts_what_eager_counts():
    eager_trainer, eager, _ = fit("vit", lambda: Sandwich(k=1), monitor=True, steps=6)
    torch._dynamo.reset()
    try:
        trainer, compiled, _ = fit("vit", lambda: Sandwich(k=1), compiled="module", monitor=True, steps=6)
        monitors = [next(cb for cb in t.callbacks if isinstance(cb, FlopsMonitor)) for t in (eager_trainer, trainer)]
        assert monitors[0].total_executed == monitors[1].total_executed > 0
        assert max_abs_diff(weights(compiled), weights(eager)) <= 1e-5
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("arch", ["vit", "gpt"])
def test_checkpointed_equals_plain(arch):
    """activation_checkpointing=True recomputes every block in backward (each block runs twice per
    subnet) and changes neither the weights nor the FLOPs FlopsMonitor counts."""
    runs = {}
    for checkpointing in (False, True):
        seeded(0)
        module = tiny_supernet(arch, sampler=Sandwich(k=1), activation_checkpointing=checkpointing)
        calls = [0]
        for block in module.model.blocks:
            block.register_forward_pre_hook(lambda *args: calls.__setitem__(0, calls[0] + 1))
        monitor = FlopsMonitor()
        make_trainer(max_steps=4, callbacks=[monitor], limit_val_batches=0).fit(
            module, datamodule=digits() if arch == "vit" else text())
        runs[checkpointing] = (weights(module), monitor.total_executed, calls[0])
    assert max_abs_diff(runs[True][0], runs[False][0]) <= 1e-6
    assert runs[True][1] == runs[False][1] > 0
    assert runs[True][2] == 2 * runs[False][2] > 0  # every block forward is recomputed once in backward


def test_flops_monitor_counts_each_supernet_step_like_flop_counter_mode():
    """Steps with different subnets: FlopsMonitor's count of each equals FlopCounterMode's, and it
    traces a step only when its batch shape is new: new subnets are counted as parts."""
    seeded(0)
    space = {"embed_dim": [16, 32], "depth": [1, 2], "num_heads": [2], "mlp_ratio": [1.0]}
    module = SupernetModule("vit", space=space, sampler=Sandwich(k=1), val_subnets=2)
    monitor = FlopsMonitor()
    probe, steps = ReferenceCounter(monitor), StepRecorder()
    make_trainer(max_steps=10, callbacks=[steps, monitor, probe], limit_val_batches=0).fit(module,
                                                                                         datamodule=digits())
    assert len(probe.reference) == 10
    assert probe.monitored == pytest.approx(probe.reference, rel=1e-6)
    keys = steps.subnets
    assert len(set(probe.reference)) > 1, "the sampled subnets did not change the step's FLOPs"
    assert monitor.counted_batches == len(set(steps.shapes)) < len(set(keys))


def test_flops_key_is_the_next_steps_subnets():
    seeded(0)
    module = tiny_supernet("vit", sampler=Sandwich(k=2))
    assert module.flops_key() is None  # no training step coming
    steps = StepRecorder()

    class Trained(Callback):
        def __init__(self):
            self.trained = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.trained.append(tuple(d.config for d in pl_module.sampler.sample(trainer.global_step - 1)))

    trained = Trained()
    make_trainer(max_steps=4, callbacks=[steps, trained], limit_val_batches=0).fit(module, datamodule=digits())
    assert steps.subnets == trained.trained and len(set(steps.subnets)) == 4
