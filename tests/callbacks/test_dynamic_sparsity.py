"""DynamicSparsity: constant sparsity across updates, RigL's grow rule recomputed from the captured
gradient, SET's rank-consistent randomness, ERK densities, the cosine drop fraction, the stop step,
errors and FLOPs."""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch import Callback

from lit_eff import sparsity
from lit_eff.callbacks import DynamicSparsity, FlopsMonitor, MagnitudePruning
from tests.helpers import fit, masked_layer_flops


def dense(module):
    return module.parametrizations.weight.original


class Probe(Callback):
    """After each optimizer step, copies the targeted dense weights, masks and AdamW state (place it
    after the technique to see its work, before it to see what the optimizer left); before each
    optimizer step, copies the gradients (before the technique: the dense ones)."""

    def __init__(self, technique):
        self.technique = technique
        self.weights, self.masks, self.states, self.grads = {}, {}, {}, {}
        self._last = -1

    def on_train_start(self, trainer, pl_module):
        self._last = trainer.global_step
        self.masks[self._last] = {n: sparsity.get_mask(m).clone() for n, m in self.technique.targets.items()}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads[trainer.global_step + 1] = {n: dense(m).grad.clone() for n, m in self.technique.targets.items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self._last:
            return
        self._last = step = trainer.global_step
        self.weights[step] = {n: dense(m).detach().clone() for n, m in self.technique.targets.items()}
        self.masks[step] = {n: sparsity.get_mask(m).clone() for n, m in self.technique.targets.items()}
        state = trainer.optimizers[0].state
        self.states[step] = {n: {k: v.clone() for k, v in state[dense(m)].items() if k != "step"}
                             for n, m in self.technique.targets.items()}


def alpha(step, alpha0, end):
    return alpha0 * (0.5 + 0.5 * math.cos(math.pi * step / end)) if step < end else 0.0


# --------------------------------------------------------------------------------------------
# constant sparsity, grown weights, the stop step
# --------------------------------------------------------------------------------------------
def test_sparsity_is_constant_grown_weights_start_at_zero_and_masks_freeze_after_t_end():
    technique = DynamicSparsity(sparsity=0.6, update_every=1, drop_fraction=0.5, stop_fraction=0.5)
    probe = Probe(technique)
    trainer, _ = fit([technique, probe], max_steps=8)
    assert technique.end_step == 4
    initial = probe.masks[0]
    counts = {n: int(m.sum()) for n, m in initial.items()}
    assert counts == {n: round(0.4 * m.numel()) for n, m in initial.items()}
    changes = {}
    for step in range(1, 9):
        old, new = probe.masks[step - 1], probe.masks[step]
        grown_total = 0
        for name, mask in new.items():
            assert int(mask.sum()) == counts[name], (step, name)  # exactly constant
            grown = mask & ~old[name]
            grown_total += int(grown.sum())
            assert (probe.weights[step][name][~mask] == 0).all(), (step, name)
            assert (probe.weights[step][name][grown] == 0).all(), (step, name)  # grown weights start at 0
            for value in probe.states[step][name].values():
                assert (value[~mask] == 0).all() and (value[grown] == 0).all(), (step, name)
        changes[step] = grown_total / sum(counts.values())
    assert all(changes[t] > 0 for t in (1, 2, 3))  # updates at 1, 2, 3
    assert all(changes[t] == 0 for t in range(4, 9))  # none from T_end = 4 on
    assert technique.state_dict()["last_update"] == 3
    metrics = trainer.callback_metrics
    assert float(metrics["sparsity/mask_changes"]) == pytest.approx(changes[3])
    assert float(metrics["sparsity/drop_fraction"]) == 0.0
    # kept weights still train
    name = next(iter(counts))
    assert not torch.equal(probe.weights[8][name], probe.weights[4][name])


def test_rigl_grows_exactly_the_top_gradient_positions():
    t, end, alpha0 = 2, 4, 0.5
    technique = DynamicSparsity(sparsity=0.75, update_every=2, drop_fraction=alpha0, stop_fraction=1.0)
    before, after = Probe(technique), Probe(technique)
    fit([before, technique, after], max_steps=4)
    for name, old in before.masks[t - 1].items():
        weight, grad = before.weights[t][name], before.grads[t][name]  # grad: dense, before masking
        assert (grad[~old] != 0).any(), name  # straight-through: inactive positions get gradients
        n = int(old.sum())
        k = math.floor(alpha(t, alpha0, end) * n)
        assert k > 0
        # drop the k smallest |w| among the active weights
        order = torch.where(old, weight.abs(), -1.0).flatten().sort(descending=True, stable=True).indices
        kept = torch.zeros(old.numel(), dtype=torch.bool)
        kept[order[: n - k]] = True
        # grow the k largest |grad| among the rest
        order = torch.where(kept, -1.0, grad.abs().flatten()).sort(descending=True, stable=True).indices
        expected = kept.clone()
        expected[order[:k]] = True
        assert torch.equal(after.masks[t][name], expected.reshape(old.shape)), name
        assert not torch.equal(after.masks[t][name], old), name
    # on other steps the optimizer saw masked gradients: pruned weights did not move
    for name, old in before.masks[0].items():
        assert (before.weights[1][name][~old] == 0).all(), name


def test_set_grows_at_random_the_same_with_the_same_seed_and_differently_with_another(monkeypatch):
    def final_masks(seed_env):
        technique = DynamicSparsity(sparsity=0.5, method="set", update_every=1, drop_fraction=0.5,
                                    stop_fraction=1.0)
        probe = Probe(technique)
        fit([technique, probe], model="gpt", max_steps=3, run_seed=seed_env, monkeypatch=monkeypatch)
        for step in (1, 2):
            for name, mask in probe.masks[step].items():
                assert int(mask.sum()) == int(probe.masks[0][name].sum()), (step, name)
        return probe.masks[0], probe.masks[3]

    init_a, end_a = final_masks(None)
    init_b, end_b = final_masks(None)
    init_c, end_c = final_masks(7)
    for name in end_a:
        assert torch.equal(init_a[name], init_b[name]) and torch.equal(end_a[name], end_b[name]), name
        assert not torch.equal(end_a[name], init_a[name]), name
        assert not torch.equal(init_a[name], init_c[name]) and not torch.equal(end_a[name], end_c[name]), name


def test_erk_distribution_sets_each_layers_density():
    technique = DynamicSparsity(sparsity=0.8, distribution="erk", update_every=1, stop_fraction=1.0)
    trainer, _ = fit([technique], max_steps=2)
    shapes = {n: tuple(m.weight.shape) for n, m in technique.targets.items()}
    expected = sparsity.erk_densities(shapes, 0.2)
    assert technique.densities == pytest.approx(expected)
    assert len({round(d, 6) for d in expected.values()}) > 1  # layers differ
    total = sum(math.prod(s) for s in shapes.values())
    active = 0
    for name, module in technique.targets.items():
        count = int(sparsity.get_mask(module).sum())
        assert count == round(expected[name] * module.weight.numel()), name
        active += count
    assert active / total == pytest.approx(0.2, abs=0.01)


def test_drop_fraction_is_cosine_decayed_and_updates_follow_the_interval():
    technique = DynamicSparsity(sparsity=0.9, update_every=100, drop_fraction=0.3, stop_fraction=0.75)
    technique.load_state_dict({"end_step": 750})
    assert technique.alpha(0) == pytest.approx(0.3)
    assert technique.alpha(375) == pytest.approx(0.15)
    assert technique.alpha(250) == pytest.approx(0.3 * (0.5 + 0.5 * math.cos(math.pi / 3)))
    for step in range(0, 800, 50):
        assert technique.alpha(step) == pytest.approx(alpha(step, 0.3, 750), abs=1e-12), step
    assert technique.alpha(750) == technique.alpha(900) == 0.0
    assert [t for t in range(1000) if technique.is_update(t)] == [100, 200, 300, 400, 500, 600, 700]


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "match"), [
    ({"sparsity": 1.0}, r"Expected `sparsity` in \[0, 1\), got sparsity=1.0"),
    ({"sparsity": -0.1}, r"Expected `sparsity` in \[0, 1\), got sparsity=-0.1"),
    ({"sparsity": "0.5"}, r"Expected `sparsity` in \[0, 1\), got sparsity='0.5'"),
    ({"sparsity": 0.5, "drop_fraction": 0.0}, r"Expected `drop_fraction` in \(0, 1\], got drop_fraction=0.0"),
    ({"sparsity": 0.5, "drop_fraction": 1.5}, r"Expected `drop_fraction` in \(0, 1\], got drop_fraction=1.5"),
    ({"sparsity": 0.5, "update_every": 0}, r"Expected `update_every` to be an integer >= 1, got update_every=0"),
    ({"sparsity": 0.5, "stop_fraction": 0}, r"Expected `stop_fraction` in \(0, 1\], got stop_fraction=0"),
    ({"sparsity": 0.5, "stop_fraction": 1.2}, r"Expected `stop_fraction` in \(0, 1\], got stop_fraction=1.2"),
    ({"sparsity": 0.5, "method": "snip"}, r"Expected `method` in \['rigl', 'set'\], got method='snip'"),
    ({"sparsity": 0.5, "distribution": "erdos"},
     r"Expected `distribution` in \['uniform', 'erk'\], got distribution='erdos'"),
    ({"sparsity": 0.5, "include": "*blocks*"}, r"Expected `include` to be a list of name patterns"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DynamicSparsity(**kwargs)


def test_no_matching_layer_fails_before_training():
    seen = []

    class Step(Callback):
        def on_train_batch_start(self, *args):
            seen.append(1)

    with pytest.raises(ValueError, match=r"No linear layer matched include=\['\*decoder\*'\].*model.blocks.0.attn.qkv"):
        fit([DynamicSparsity(sparsity=0.5, include=["*decoder*"]), Step()], max_steps=2)
    assert not seen


def test_a_weight_masked_by_another_callback_is_refused():
    gmp, rigl = MagnitudePruning(final_sparsity=0.5, include=["*mlp*"], end_step=1), DynamicSparsity(sparsity=0.5)
    with pytest.raises(ValueError, match=r"`model.blocks.0.mlp.fc1.weight` is already masked by MagnitudePruning "
                                         r"\(trainer.callbacks\[0\]\); DynamicSparsity \(trainer.callbacks\[1\]\) "
                                         r"cannot mask it too"):
        fit([gmp, rigl], max_steps=1)


# --------------------------------------------------------------------------------------------
# FLOPs
# --------------------------------------------------------------------------------------------
def test_effective_flops_count_the_layer_densities():
    technique, monitor = DynamicSparsity(sparsity=0.5, update_every=1, stop_fraction=1.0), FlopsMonitor()
    trainer, module = fit([monitor, technique], max_steps=2)
    masked = masked_layer_flops(technique, trainer, module)
    assert masked > 0
    assert monitor.last_step_effective < monitor.last_step_executed
    assert monitor.last_step_effective == monitor.last_step_executed - masked / 2
    assert monitor.total_effective == monitor.total_executed - masked  # two steps at 50%
