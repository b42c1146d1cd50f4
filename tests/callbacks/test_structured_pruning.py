"""StructuredPruning in a fit: LAPP's FLOPs penalty reaches the thresholds' gradients exactly
(once per optimizer step), removal carries the optimizer state of the kept rows, the model and
its executed FLOPs shrink during the run (logged), the magnitude baseline keeps the top group
norms on a linear schedule, export gives a plain module with the same outputs, a fresh model
tests a pruned checkpoint, CNN channels, bad arguments (exact resume across removals and DDP:
tests/contract)."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.loggers import TensorBoardLogger

from lit_eff.callbacks import FlopsMonitor, NMSparsity, StructuredPruning
from lit_eff.flops import count_flops
from lit_eff.structured import find_groups
from tests.helpers import fit


def lapp(**kwargs):
    defaults = {"flops_target": 0.5, "end": 0.5, "prune_every": 2, "threshold_scale": 300.0}
    return StructuredPruning(**{**defaults, **kwargs})


class Grads(Callback):
    """θ gradients as the optimizer step begins (placed before or after StructuredPruning)."""

    def __init__(self):
        self.grads = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        technique = next(cb for cb in trainer.callbacks if isinstance(cb, StructuredPruning))
        self.grads[trainer.global_step] = {g.name: g.owner.__getattr__(g.gate_name).theta.grad.clone()
                                           for g in technique.groups if hasattr(g.owner, g.gate_name)}


def expected_penalty_grads(technique):
    """∂/∂θ of λ·max(0, R − target)², re-derived: masks σ((s/max s − scale·θ)/T) with s the
    group L1 norm (LAPP's default for heads and units), R from the cost model's FLOPs."""
    thetas, fractions = [], []
    for group in technique.groups:
        gate = getattr(group.owner, group.gate_name)
        theta = gate.theta.detach().clone().requires_grad_()
        s = group.importance(1)
        s = s.double()
        mask = torch.sigmoid((s / s.max() - technique.threshold_scale * theta.double()) / technique.temperature)
        thetas.append(theta)
        fractions.append(mask.sum() / group.dense)
    ratio = technique.cost.ratio(fractions)
    loss = technique.penalty * torch.relu(ratio - technique.flops_target) ** 2
    return dict(zip([g.name for g in technique.groups], torch.autograd.grad(loss, thetas))), float(ratio)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_penalty_gradient_is_added_once_per_optimizer_step(accumulate):
    class Expected(Callback):
        def __init__(self):
            self.expected = {}

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            technique = next(cb for cb in trainer.callbacks if isinstance(cb, StructuredPruning))
            if technique.penalty_active(trainer.global_step):
                self.expected[trainer.global_step] = expected_penalty_grads(technique)

    before, after, expected = Grads(), Grads(), Expected()
    technique = lapp(threshold_scale=5.0, flops_target=0.3, end=0.75)  # the penalty acts in steps 0-2
    fit([before, expected, technique, after], "vit", max_steps=4, accumulate_grad_batches=accumulate)
    assert sorted(expected.expected) == [0, 1, 2]
    for step, (grads, ratio) in expected.expected.items():
        assert ratio > 0.3  # the penalty is active
        for name, grad in grads.items():
            added = after.grads[step][name] - before.grads[step][name]
            assert torch.allclose(added, grad.float(), rtol=1e-5, atol=1e-12), (step, name)
            assert grad.abs() > 0  # float64 masks: no gradient lost to saturation


class History(Callback):
    """Per optimizer step: the FLOPs of the step and the technique's member counts."""

    def __init__(self):
        self.flops, self.counts = {}, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        technique = next(cb for cb in trainer.callbacks if isinstance(cb, StructuredPruning))
        self.counts[trainer.global_step] = [g.count for g in technique.groups]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        monitor = next(cb for cb in trainer.callbacks if isinstance(cb, FlopsMonitor))
        self.flops[trainer.global_step - 1] = monitor.last_step_executed


def test_lapp_shrinks_the_model_during_training_and_logs_it(tmp_path):
    history, technique = History(), lapp()
    logger = TensorBoardLogger(tmp_path, name="run")
    trainer, module = fit([FlopsMonitor(), technique, history], "vit", max_steps=8, logger=logger,
                          log_every_n_steps=1)
    assert technique.events == [2, 4] and technique.hardened
    # members are only ever removed, at the events; the executed FLOPs fall with them
    removed_at = [s for s in range(1, 8) if history.counts[s] != history.counts[s - 1]]
    assert set(removed_at) <= {2, 4} and removed_at
    assert history.flops[7] < history.flops[0]
    assert all(history.flops[s] <= history.flops[s - 1] for s in range(1, 8))
    # TensorBoard: the FLOPs ratio and the executed FLOPs per step fall over the run
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(logger.log_dir)
    events.Reload()
    ratio = [e.value for e in events.Scalars("pruning/flops_ratio")]
    flops = [e.value for e in events.Scalars("flops/step")]
    assert ratio[0] == 1.0 and ratio[-1] < 1.0 and flops[-1] < flops[0]
    assert "pruning/step_seconds" in events.Tags()["scalars"]


def test_removal_carries_the_kept_rows_of_the_optimizer_state():
    class AroundRemoval(Callback):
        def __init__(self):
            self.seen = {}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            fc1 = pl_module.model.blocks[0].mlp.fc1.weight  # runs before and after the technique's hook
            state = trainer.optimizers[0].state.get(fc1)
            self.seen.setdefault(trainer.global_step, []).append((fc1.shape[0], None if state is None else
                                                                   {k: v.clone() for k, v in state.items()}))

    first, last = AroundRemoval(), AroundRemoval()
    technique = StructuredPruning("magnitude", flops_target=0.5, start=0.5, end=0.5)  # one shot at step 4
    fit([first, technique, last], "vit", max_steps=8)
    assert technique.events == [4]
    (dense_rows, old), = first.seen[4]
    (rows, new), = last.seen[4]
    kept = technique.groups[1].kept
    assert dense_rows == 64 and rows == kept.numel() < 64
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(new[key], old[key][kept])
    assert torch.equal(new["step"], old["step"])


def test_magnitude_keeps_the_top_group_norms_on_a_linear_schedule():
    class Counts(Callback):
        def __init__(self):
            self.before = {}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            groups = find_groups(pl_module)
            self.before[trainer.global_step] = {g.name: (g.count, g.importance(2)) for g in groups}

    counts, technique = Counts(), StructuredPruning("magnitude", flops_target=0.6, start=0.25, end=0.5,
                                                    prune_every=2)
    fit([counts, technique], "gpt", max_steps=8)
    assert technique.events == [2, 4]
    rho = technique.ratio
    for group in technique.groups:  # half the ratio after the first event, all of it after the second
        assert counts.before[4][group.name][0] == max(1, round(group.dense * (1 - rho / 2)))
        assert group.count == max(1, round(group.dense * (1 - rho)))
    assert technique.cost.ratio(technique.fractions()) <= 0.6


def test_magnitude_removes_the_lowest_norms():
    class Before(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 3:
                self.scores = {g.name: g.importance(2) for g in find_groups(pl_module)}

    before, technique = Before(), StructuredPruning("magnitude", flops_target=0.5, start=0.5, end=0.5)
    fit([before, technique], "gpt", max_steps=6)  # one shot at step 3 (after steps 0-2)
    assert technique.events == [3]
    for group in technique.groups:
        scores = before.scores[group.name]
        expected = torch.sort(torch.argsort(scores, descending=True)[: group.count]).values
        assert torch.equal(group.kept, expected), group.name


def test_export_is_a_plain_module_with_the_same_outputs():
    technique = lapp()
    trainer, module = fit([technique], "vit", max_steps=6)
    exported = technique.export(module.model)
    assert not any("lit_eff" in type(m).__module__ for m in exported.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in exported.modules())
    x = torch.randn(5, 1, 8, 8)
    module.eval()
    exported.eval()
    with torch.no_grad():
        assert torch.allclose(exported(x), module.model(x), atol=1e-5)
    dense = sum(p.numel() for p in module.model.parameters()) + sum(
        (g.dense - g.count) for g in technique.groups)
    assert sum(p.numel() for p in exported.parameters()) < dense
    assert count_flops(lambda: exported(x)).total < count_flops(lambda: type(module)(
        **module.hparams).model(x)).total


def test_export_refuses_before_the_masks_harden():
    class Stop(Callback):
        def on_train_batch_end(self, trainer, *args):
            trainer.should_stop = trainer.global_step >= 3

    technique = lapp(end=0.75)
    trainer, module = fit([technique, Stop()], "vit", max_steps=8)
    assert trainer.global_step == 3
    with pytest.raises(ValueError, match=r"before its masks hardened \(at step 6\)"):
        technique.export(module.model)


def test_cnn_channels_with_batchnorm_scales():
    monitor, technique = FlopsMonitor(), StructuredPruning("magnitude", flops_target=0.5, start=0.25, end=0.5,
                                                           importance="bn")
    trainer, module = fit([monitor, technique], "cnn", max_steps=4)
    assert all(g.kind == "channels" for g in technique.groups) and len(technique.groups) == 4
    assert all(g.count < g.dense for g in technique.groups)
    batch = next(iter(trainer.datamodule.train_dataloader()))
    assert monitor.last_step_executed == count_flops(lambda: module(batch[0])).total
    assert technique.cost.ratio(technique.fractions()) <= 0.5


@pytest.mark.parametrize("kwargs, message", [
    ({"flops_target": 1.0}, r"Expected `flops_target` in \(0, 1\), got flops_target=1.0"),
    ({"flops_target": 0.0}, r"Expected `flops_target` in \(0, 1\), got flops_target=0.0"),
    ({"start": 0.3, "end": 0.3}, r"Expected `start` < `end`, got start=0.3, end=0.3 \(LAPP learns"),
    ({"method": "magnitude", "start": 0.5, "end": 0.3}, r"Expected `start` <= `end`"),
    ({"end": 1.0}, r"Expected `end` in \[0, 1\), got end=1.0"),
    ({"prune_every": 0}, r"Expected `prune_every` to be an integer >= 1 or None, got prune_every=0"),
    ({"structures": ["neurons"]}, r"Expected `structures` to be None or a non-empty list from \['heads', 'mlp'"),
    ({"temperature": 0.0}, r"Expected `temperature` in \(0, inf\)"),
    ({"method": "obd"}, r"Expected `method` in \['lapp', 'magnitude'\]"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StructuredPruning(**kwargs)


@pytest.mark.parametrize("kwargs, message", [
    ({"importance": "bn"}, r"Expected `importance` 'bn' only with BatchNorm channels, but model.blocks.0.attn.heads"),
    ({"min_keep": 3, "structures": ["heads"]}, r"Expected `min_keep` <= the 2 members of model.blocks.0.attn.heads"),
    ({"include": ["*classifier*"]}, r"No prunable structures of ImageClassifier .*include=\['\*classifier\*'\]"),
    ({"structures": ["channels"]}, r"No prunable structures of ImageClassifier for structures=\['channels'\]"),
    ({"end": 0.95}, r"`end`=0.95 puts the last pruning step at 8, but the run has 8 optimizer steps"),
])
def test_bad_model_or_schedule_fails_before_training(kwargs, message):
    seen = []

    class Spy(Callback):
        def on_train_batch_start(self, *args):
            seen.append(1)

    with pytest.raises(ValueError, match=message):
        fit([StructuredPruning(**kwargs), Spy()], "vit", max_steps=8)
    assert not seen


def test_refuses_masked_weights():
    with pytest.raises(ValueError, match=r"removes rows and columns of model.blocks.0.attn.heads's weights, which "
                                         r"another callback masks"):
        fit([NMSparsity(n=2, m=4), lapp()], "vit", max_steps=4)


def test_a_fresh_model_tests_a_pruned_checkpoint(tmp_path):
    """`trainer.test(ckpt_path=...)` (`lit-eff test --ckpt_path`) with the callback in the config
    takes the checkpoint's smaller shapes."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from tests.helpers import digits, make_trainer, tiny_vit

    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    trainer, module = fit([lapp(), checkpoint], "vit", max_steps=6, enable_checkpointing=True)
    expected = trainer.test(module, datamodule=trainer.datamodule, verbose=False)
    fresh = tiny_vit()
    result = make_trainer(callbacks=[lapp()]).test(fresh, datamodule=digits(), ckpt_path=str(tmp_path / "last.ckpt"),
                                                   verbose=False)
    assert result == expected
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in module.state_dict().items()}
