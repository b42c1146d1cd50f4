"""MagnitudePruning: the polynomial schedule step by step, pruned weights staying zero, scopes,
N:M structure, errors, two callbacks on one weight and FLOPs."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback

from lit_eff import sparsity
from lit_eff.callbacks import FlopsMonitor, MagnitudePruning, NMSparsity
from tests.helpers import fit as run, MODELS, make_trainer, masked_layer_flops, seeded


def formula(step, s_i, s_f, t0, end, every, power):
    """Zhu & Gupta, written out: s_t at the last update step <= step (dense before t0)."""
    if step < t0:
        return 0.0
    if step >= end:
        return s_f
    t = t0 + (step - t0) // every * every
    return s_f + (s_i - s_f) * (1 - (t - t0) / (end - t0)) ** power


def dense(module):
    return module.parametrizations.weight.original


class Probe(Callback):
    """After each optimizer step, copies the targeted dense weights and masks (place it after the
    technique to see its work, before it to see the weights the optimizer left)."""

    def __init__(self, technique):
        self.technique = technique
        self.weights: dict[int, dict[str, torch.Tensor]] = {}
        self.masks: dict[int, dict[str, torch.Tensor]] = {}
        self._last = -1

    def on_train_start(self, trainer, pl_module):
        self._last = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self._last:
            return
        self._last = step = trainer.global_step
        self.weights[step] = {n: dense(m).detach().clone() for n, m in self.technique.targets.items()}
        self.masks[step] = {n: sparsity.get_mask(m).clone() for n, m in self.technique.targets.items()}


# --------------------------------------------------------------------------------------------
# the schedule
# --------------------------------------------------------------------------------------------
def test_target_is_the_polynomial_at_update_steps_held_between_and_final_after_end():
    args = dict(s_i=0.1, s_f=0.8, t0=10, end=50, every=10, power=3.0)
    technique = MagnitudePruning(final_sparsity=0.8, initial_sparsity=0.1, start_step=10, end_step=50,
                                 update_every=10)
    for step in range(0, 70):
        assert technique.target(step) == pytest.approx(formula(step, **args), abs=1e-12), step
    assert technique.target(9) == 0.0 and technique.target(10) == pytest.approx(0.1)
    assert technique.target(30) == pytest.approx(0.8 - 0.7 * 0.5 ** 3) == technique.target(39)
    assert technique.target(50) == technique.target(1000) == 0.8
    # end_step off the update grid: s_f is set at end_step itself
    odd = MagnitudePruning(final_sparsity=0.5, start_step=0, end_step=7, update_every=3)
    assert [odd.update_step(t) for t in range(9)] == [0, 0, 0, 3, 3, 3, 6, 7, 7]


@pytest.mark.parametrize("accumulate", [1, 2])
def test_sparsity_at_every_step_equals_the_formula_and_masks_only_grow_sparser(accumulate):
    s_i, s_f, t0, end, every = 0.1, 0.75, 2, 8, 2
    technique = MagnitudePruning(final_sparsity=s_f, initial_sparsity=s_i, start_step=t0, end_step=end,
                                 update_every=every)
    probe = Probe(technique)
    run([technique, probe], max_steps=10, accumulate_grad_batches=accumulate)
    assert sorted(probe.weights) == list(range(1, 11))
    previous = None
    for step, weights in probe.weights.items():
        s = formula(step, s_i, s_f, t0, end, every, 3.0)
        for name, w in weights.items():
            assert int((w == 0).sum()) == round(s * w.numel()), (step, name, s)
            assert torch.equal(probe.masks[step][name], w != 0), (step, name)
            if previous is not None:  # pruned earlier -> still pruned
                assert not (probe.masks[step][name] & ~previous[name]).any(), (step, name)
        previous = probe.masks[step]
    # the sparsity reached the formula's intermediate values, not just the end points
    assert 0.1 < formula(4, s_i, s_f, t0, end, every, 3.0) < 0.75


def test_end_step_defaults_to_three_quarters_of_training():
    technique = MagnitudePruning(final_sparsity=0.5, update_every=1)
    run([technique], max_steps=8)
    assert technique.state_dict()["end_step"] == 6
    assert technique.end_step is None  # the argument stays as given (YAML round trip)


# --------------------------------------------------------------------------------------------
# pruned weights stay zero
# --------------------------------------------------------------------------------------------
def test_pruned_weights_never_come_back_through_adamw_momentum_and_weight_decay():
    technique = MagnitudePruning(final_sparsity=0.5, start_step=0, end_step=2, update_every=1)
    probe = Probe(technique)
    seeded(0)
    make_model, make_data = MODELS["vit"]
    module = make_model(weight_decay=0.1)
    trainer = make_trainer(callbacks=[technique, probe], max_steps=8)
    trainer.fit(module, datamodule=make_data())
    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, torch.optim.AdamW) and all(g["weight_decay"] in (0.0, 0.1)
                                                              for g in optimizer.param_groups)
    assert any(g["weight_decay"] == 0.1 and any(p is dense(m) for m in technique.targets.values()
                                               for p in g["params"]) for g in optimizer.param_groups)
    pruned_at_end = {name: ~mask for name, mask in probe.masks[2].items()}
    for name, layer in technique.targets.items():
        pruned = pruned_at_end[name]
        assert pruned.float().mean().item() == 0.5
        assert torch.equal(sparsity.get_mask(layer), ~pruned), name  # six more steps: same mask
        for step in range(2, 9):
            assert (probe.weights[step][name][pruned] == 0).all(), (step, name)
        state = optimizer.state[dense(layer)]
        assert (state["exp_avg"][pruned] == 0).all() and (state["exp_avg_sq"][pruned] == 0).all(), name
        assert (state["exp_avg"][~pruned] != 0).any(), name  # kept weights still train
        assert not torch.equal(probe.weights[8][name], probe.weights[2][name]), name
    sparsity.export(module)
    for name, layer in technique.targets.items():
        assert (layer.weight[pruned_at_end[name]] == 0).all() and "parametrizations" not in dict(layer.named_children())


def test_gradients_of_pruned_weights_are_zero_before_the_optimizer_step():
    technique = MagnitudePruning(final_sparsity=0.5, start_step=0, end_step=1, update_every=1)
    grads = []

    class GradProbe(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            grads.append({n: (dense(m).grad.clone(), sparsity.get_mask(m).clone())
                          for n, m in technique.targets.items()})

    run([technique, GradProbe()], max_steps=3, gradient_clip_val=1.0)
    for step in grads[1:]:
        for name, (grad, mask) in step.items():
            assert (grad[~mask] == 0).all() and (grad[mask] != 0).any(), name


# --------------------------------------------------------------------------------------------
# scope and structure
# --------------------------------------------------------------------------------------------
def test_layer_scope_prunes_each_layer_global_scope_uses_one_threshold():
    results = {}
    for scope in ("layer", "global"):
        technique = MagnitudePruning(final_sparsity=0.6, start_step=0, end_step=3, update_every=3, scope=scope)
        before = Probe(technique)  # weights as the optimizer left them at the final update
        run([before, technique], max_steps=3)
        masks = {n: sparsity.get_mask(m) for n, m in technique.targets.items()}
        weights = before.weights[3]
        sizes = {n: w.numel() for n, w in weights.items()}
        zeros = {n: int((~mask).sum()) for n, mask in masks.items()}
        results[scope] = zeros
        if scope == "layer":
            assert zeros == {n: round(0.6 * size) for n, size in sizes.items()}
            for n, w in weights.items():  # smallest |w| pruned within each layer
                assert w.abs()[~masks[n]].max() <= w.abs()[masks[n]].min(), n
        else:
            assert sum(zeros.values()) == round(0.6 * sum(sizes.values()))
            kept = torch.cat([w.abs()[masks[n]] for n, w in weights.items()])
            pruned = torch.cat([w.abs()[~masks[n]] for n, w in weights.items()])
            assert pruned.max() <= kept.min()  # smallest |w| across all layers
            assert len({z / sizes[n] for n, z in zeros.items()}) > 1  # so layers differ
    assert results["layer"] != results["global"]


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_nm_structure_is_exactly_n_of_m_at_the_end_with_an_nm_floor_before(scope):
    technique = MagnitudePruning(final_sparsity=0.5, start_step=0, end_step=4, update_every=2, structure="nm",
                                 n=2, m=4, scope=scope)
    probe = Probe(technique)
    run([technique, probe], max_steps=6)
    s2 = formula(2, 0.0, 0.5, 0, 4, 2, 3.0)
    for name, w in probe.weights[2].items():
        kept = (w != 0).reshape(-1, 4).sum(dim=1)
        assert (kept >= 2).all(), name  # the N:M floor while the schedule ramps
        if scope == "layer":
            assert int((w == 0).sum()) == round(s2 * w.numel()), name
    for step in (4, 5, 6):
        for name, w in probe.weights[step].items():
            assert ((w != 0).reshape(-1, 4).sum(dim=1) == 2).all(), (step, name)
    for name, layer in technique.targets.items():
        assert torch.equal(sparsity.get_mask(layer), sparsity.nm_mask(dense(layer), 2, 4)), name


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "match"), [
    ({"final_sparsity": 1.2}, r"Expected `final_sparsity` in \[0, 1\), got final_sparsity=1.2"),
    ({"final_sparsity": 1.0}, r"Expected `final_sparsity` in \[0, 1\), got final_sparsity=1.0"),
    ({"final_sparsity": 0.5, "initial_sparsity": -0.1},
     r"Expected `initial_sparsity` in \[0, 1\), got initial_sparsity=-0.1"),
    ({"final_sparsity": "0.5"}, r"Expected `final_sparsity` in \[0, 1\), got final_sparsity='0.5'"),
    ({"final_sparsity": 0.5, "initial_sparsity": 0.6},
     r"Expected `initial_sparsity` <= `final_sparsity`, got initial_sparsity=0.6, final_sparsity=0.5"),
    ({"final_sparsity": 0.5, "start_step": 10, "end_step": 10},
     r"Expected `start_step` < `end_step`, got start_step=10, end_step=10"),
    ({"final_sparsity": 0.5, "start_step": -1}, r"Expected `start_step` to be an integer >= 0, got start_step=-1"),
    ({"final_sparsity": 0.5, "end_step": 0}, r"Expected `end_step` to be an integer >= 1 or None, got end_step=0"),
    ({"final_sparsity": 0.5, "update_every": 0}, r"Expected `update_every` to be an integer >= 1, got update_every=0"),
    ({"final_sparsity": 0.5, "power": 0}, r"Expected `power` in \(0, inf\), got power=0"),
    ({"final_sparsity": 0.5, "scope": "net"}, r"Expected `scope` in \['layer', 'global'\], got scope='net'"),
    ({"final_sparsity": 0.5, "structure": "block"},
     r"Expected `structure` in \['unstructured', 'nm'\], got structure='block'"),
    ({"final_sparsity": 0.5, "structure": "nm", "n": 4, "m": 4}, r"Expected `n` < `m`, got n=4, m=4"),
    ({"final_sparsity": 0.5, "structure": "nm", "n": 0, "m": 4}, r"Expected `n` > 0, got n=0"),
    ({"final_sparsity": 0.6, "structure": "nm", "n": 2, "m": 4},
     r"Expected `final_sparsity` = 1 - n/m = 0.5 with structure='nm'.*got final_sparsity=0.6, n=2, m=4"),
    ({"final_sparsity": 0.5, "include": "*blocks*"}, r"Expected `include` to be a list of name patterns"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MagnitudePruning(**kwargs)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"final_sparsity": 0.5, "include": ["*decoder*"]},
     r"No linear layer matched include=\['\*decoder\*'\].*model.blocks.0.attn.qkv"),
    ({"final_sparsity": 2 / 3, "structure": "nm", "n": 1, "m": 3},
     r"Expected `m` to divide the input size of layer `model.blocks.0.attn.qkv` \(weight shape \(96, 32\)\), "
     r"got m=3 for 32 inputs"),
    ({"final_sparsity": 0.5, "start_step": 10},
     r"Expected `start_step` < `end_step`, got start_step=10, end_step=6 \(3/4 of 8 training steps\); "
     r"set `end_step`"),
])
def test_bad_setup_fails_before_training(kwargs, match):
    technique = MagnitudePruning(**kwargs)
    seen = []

    class Step(Callback):
        def on_train_batch_start(self, *args):
            seen.append(1)

    with pytest.raises(ValueError, match=match):
        run([technique, Step()], max_steps=8)
    assert not seen


def test_two_sparsity_callbacks_on_the_same_weight_are_refused():
    nm, gmp = NMSparsity(n=2, m=4), MagnitudePruning(final_sparsity=0.5, include=["*mlp*"], end_step=1)
    with pytest.raises(ValueError, match=r"`model.blocks.0.mlp.fc1.weight` is already masked by NMSparsity "
                                         r"\(trainer.callbacks\[0\]\); MagnitudePruning \(trainer.callbacks\[1\]\) "
                                         r"cannot mask it too"):
        run([nm, gmp], max_steps=1)
    gmp, nm = MagnitudePruning(final_sparsity=0.5, end_step=1), NMSparsity(n=2, m=4, include=["*attn*"])
    with pytest.raises(ValueError, match=r"`model.blocks.0.attn.qkv.weight` is already masked by MagnitudePruning "
                                         r"\(trainer.callbacks\[0\]\); NMSparsity \(trainer.callbacks\[1\]\)"):
        run([gmp, nm], max_steps=1)
    # on different layers they compose
    nm, gmp = NMSparsity(n=2, m=4, include=["*attn*"]), MagnitudePruning(final_sparsity=0.5, include=["*mlp*"],
                                                                         start_step=0, end_step=1, update_every=1)
    run([nm, gmp], max_steps=2)
    assert all(((mod.weight != 0).reshape(-1, 4).sum(dim=1) == 2).all() for mod in nm.targets.values())
    assert all(int((dense(mod) == 0).sum()) == mod.weight.numel() // 2 for mod in gmp.targets.values())


# --------------------------------------------------------------------------------------------
# FLOPs and logging
# --------------------------------------------------------------------------------------------
def test_effective_flops_reflect_the_pruned_density_and_metrics_are_logged():
    # step 1 runs dense (s_i = 0 at step 0), step 2 at 50% after the update at end_step = 1
    technique, monitor = MagnitudePruning(final_sparsity=0.5, start_step=0, end_step=1, update_every=1), FlopsMonitor()
    trainer, module = run([monitor, technique], max_steps=2)
    masked = masked_layer_flops(technique, trainer, module)
    assert masked > 0
    assert monitor.last_step_effective < monitor.last_step_executed
    assert monitor.last_step_effective == monitor.last_step_executed - masked / 2
    assert monitor.total_effective == monitor.total_executed - masked / 2  # one dense step, one at 50%
    metrics = trainer.callback_metrics
    assert float(metrics["sparsity/target"]) == 0.5 and float(metrics["sparsity/actual"]) == 0.5


def test_sgd_momentum_buffer_of_pruned_weights_is_zero():
    technique = MagnitudePruning(final_sparsity=0.5, start_step=0, end_step=2, update_every=1)
    seeded(0)
    make_model, make_data = MODELS["vit"]
    module = make_model()
    module.configure_optimizers = lambda: torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9,
                                                          weight_decay=0.01)
    trainer = make_trainer(callbacks=[technique], max_steps=5)
    trainer.fit(module, datamodule=make_data())
    for name, layer in technique.targets.items():
        pruned = ~sparsity.get_mask(layer)
        buffer = trainer.optimizers[0].state[dense(layer)]["momentum_buffer"]
        assert pruned.any() and (buffer[pruned] == 0).all() and (buffer[~pruned] != 0).any(), name
        assert (dense(layer)[pruned] == 0).all(), name
