"""NMSparsity: N:M exactness, SR-STE gradient term, schedules, warm-up, errors and FLOPs."""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch import Callback

from lit_eff import sparsity
from lit_eff.callbacks import FlopsMonitor, NMSparsity
from tests.helpers import fit as run, masked_layer_flops


def groups_nonzero(tensor: torch.Tensor, m: int) -> torch.Tensor:
    return (tensor.detach() != 0).reshape(-1, m).sum(dim=1)


# --------------------------------------------------------------------------------------------
# N:M exactness
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("n", "m", "method"), [(2, 4, "ste"), (1, 8, "srste"), (2, 8, "mask_decay")])
def test_effective_weight_is_exactly_nm_after_fit(n, m, method):
    # mask_decay with finetune_steps: the last step is binary
    technique = NMSparsity(n=n, m=m, method=method, decay_rate=0.5, finetune_steps=1)
    trainer, _ = run([technique], max_steps=3)
    assert list(technique.targets) == [name for name, _ in trainer.lightning_module.named_modules()
                                       if name.startswith("model.blocks.") and isinstance(_, torch.nn.Linear)]
    for name, module in technique.targets.items():
        dense = module.parametrizations.weight.original
        assert torch.equal(sparsity.get_mask(module), sparsity.nm_mask(dense, n, m)), name
        assert (groups_nonzero(module.weight, m) == n).all(), name
        assert float(sparsity.get_parametrization(module).beta) == 0.0
    # the patch embedding and the head stay dense
    assert not sparsity.has_mask(trainer.lightning_module.model.head)
    assert not sparsity.has_mask(trainer.lightning_module.model.patch_embed.proj)


class ExactnessProbe(Callback):
    """Records, after each optimizer step's callbacks ran, whether the masks equal the N:M
    masks of the current dense weights, and the masks themselves."""

    def __init__(self, technique: NMSparsity):
        self.technique = technique
        self.exact: list[bool] = []
        self.masks: list[list[torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        n, m = self.technique.frame(trainer.global_step)
        targets = self.technique.targets.values()
        self.masks.append([sparsity.get_mask(t).clone() for t in targets])
        self.exact.append(all(torch.equal(sparsity.get_mask(t), sparsity.nm_mask(t.parametrizations.weight.original,
                                                                                 n, m)) for t in targets))


def test_update_every_recomputes_masks_only_on_those_steps():
    technique = NMSparsity(n=2, m=4, method="ste", update_every=3)
    probe = ExactnessProbe(technique)
    run([technique, probe], max_steps=7)  # steps reached: 1..7; masks recomputed after steps 3 and 6
    assert [probe.exact[i] for i in (2, 5)] == [True, True]
    assert not all(probe.exact)  # in between, the masks lag the weights (lr 0.1 reorders some groups)
    for step in (1, 2, 4, 5, 7):  # reached step s keeps the masks of the last multiple of 3 (step 0 at the start)
        kept = probe.masks[step // 3 * 3 - 1] if step >= 3 else None
        if kept is not None:
            assert all(torch.equal(a, b) for a, b in zip(probe.masks[step - 1], kept)), step
    default = NMSparsity(n=2, m=4, method="ste")
    exact = ExactnessProbe(default)
    run([default, exact], max_steps=4)
    assert all(exact.exact)  # the default recomputes after every step


# --------------------------------------------------------------------------------------------
# SR-STE
# --------------------------------------------------------------------------------------------
class GradProbe(Callback):
    """Copies the targeted layers' dense-weight gradients in on_before_optimizer_step."""

    def __init__(self, technique: NMSparsity):
        self.technique = technique
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append({name: module.parametrizations.weight.original.grad.clone()
                           for name, module in self.technique.targets.items()})


@pytest.mark.parametrize("accumulate", [1, 2])
def test_srste_adds_lambda_pruned_weights_once_per_step(accumulate):
    lam = 0.05
    results = {}
    for method in ("ste", "srste"):
        technique = NMSparsity(n=2, m=4, method=method, srste_lambda=lam)
        before, after = GradProbe(technique), GradProbe(technique)
        # weights and masks at step 0 are equal in both runs: record them before the step
        start = {}

        class Snapshot(Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                for name, module in technique.targets.items():
                    start[name] = (module.parametrizations.weight.original.detach().clone(),
                                   sparsity.get_mask(module).clone())

        run([Snapshot(), before, technique, after], max_steps=1, accumulate_grad_batches=accumulate)
        results[method] = (before.grads, after.grads, start)
    (ste_before, ste_after, start), (sr_before, sr_after, sr_start) = results["ste"], results["srste"]
    assert len(sr_after) == 1
    for name, (weight, mask) in start.items():
        assert torch.equal(weight, sr_start[name][0]) and torch.equal(mask, sr_start[name][1])
        assert not mask.all()
        term = lam * (~mask) * weight  # λ(1−E)⊙W, computed here independently
        # the gradient before the hook is the plain STE gradient; the hook adds the term once
        torch.testing.assert_close(sr_before[0][name], ste_after[0][name], rtol=0, atol=1e-7)
        torch.testing.assert_close(sr_after[0][name] - sr_before[0][name], term, rtol=0, atol=1e-7)
        torch.testing.assert_close(sr_after[0][name], ste_after[0][name] + term, rtol=0, atol=1e-7)
        torch.testing.assert_close(ste_after[0][name], ste_before[0][name], rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# schedules
# --------------------------------------------------------------------------------------------
def test_beta_schedule_values():
    linear = NMSparsity(method="mask_decay", decay="linear", decay_rate=0.1, dense_steps=2, finetune_steps=3,
                        total_steps=20)
    expected = {0: 1.0, 1: 1.0, 2: 1.0, 3: 0.9, 7: 0.5, 11: 0.1, 12: 0.0, 16: 0.0, 17: 0.0, 25: 0.0}
    assert {s: linear.beta(s) for s in expected} == pytest.approx(expected, abs=1e-12)
    exp = NMSparsity(method="mask_decay", decay="exp", decay_rate=0.1, dense_steps=2, finetune_steps=3,
                     total_steps=20)
    expected = {1: 1.0, 2: 1.0, 5: math.exp(-0.3), 16: math.exp(-1.4), 17: 0.0}
    assert {s: exp.beta(s) for s in expected} == pytest.approx(expected, abs=1e-12)
    srste = NMSparsity(method="srste", dense_steps=2, total_steps=20)
    assert [srste.beta(s) for s in (0, 1, 2, 19)] == [1.0, 1.0, 0.0, 0.0]
    assert [srste.phase(s) for s in (1, 2, 19)] == ["dense", "decay", "decay"]


def test_structure_decay_frames():
    stepwise = NMSparsity(n=1, m=8, method="ste", structure_decay="stepwise", dense_steps=2, finetune_steps=2,
                          total_steps=14)
    assert stepwise.frames() == [(7, 8), (4, 8), (2, 8), (1, 8)]
    # decay phase: steps 2..11 (10 steps), frame i starts at 2 + floor(i * 10 / 4) = 2, 4, 7, 9
    expected = {0: (8, 8), 1: (8, 8), 2: (7, 8), 3: (7, 8), 4: (4, 8), 6: (4, 8), 7: (2, 8), 8: (2, 8),
                9: (1, 8), 11: (1, 8), 12: (1, 8), 13: (1, 8)}
    assert {s: stepwise.frame(s) for s in expected} == expected
    assert NMSparsity(n=2, m=8, method="ste", structure_decay="stepwise", total_steps=9).frames() == \
        [(7, 8), (4, 8), (2, 8)]
    geometric = NMSparsity(n=1, m=8, method="ste", structure_decay="geometric", total_steps=8)
    assert geometric.frames() == [(8, 64), (4, 32), (2, 16), (1, 8)]
    assert [geometric.frame(s) for s in range(8)] == [(8, 64), (8, 64), (4, 32), (4, 32), (2, 16), (2, 16),
                                                      (1, 8), (1, 8)]
    assert NMSparsity(n=2, m=4, total_steps=5).frames() == [(2, 4)]


class MaskProbe(Callback):
    """What forward uses at each optimizer step: mask pattern, β, and whether weights are masked."""

    def __init__(self, technique: NMSparsity):
        self.technique = technique
        self.seen: dict[int, dict] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        name, module = next(iter(self.technique.targets.items()))
        mask = sparsity.get_mask(module)
        kept = {int(k) for k in groups_nonzero(mask, self.technique.m).unique()}
        beta = float(sparsity.get_parametrization(module).beta)
        unmasked = all(torch.equal(mod.weight, mod.parametrizations.weight.original)
                       for mod in self.technique.targets.values())
        self.seen.setdefault(trainer.global_step, {"kept": kept, "beta": beta, "unmasked": unmasked})


def test_schedules_in_a_fit_follow_global_step_and_dense_warmup_is_unmasked():
    technique = NMSparsity(n=1, m=4, method="mask_decay", decay="linear", decay_rate=0.25,
                           structure_decay="stepwise", dense_steps=2, finetune_steps=2)
    probe = MaskProbe(technique)
    trainer, _ = run([technique, probe], model="gpt", max_steps=8, accumulate_grad_batches=2,
                     limit_train_batches=16)
    assert sorted(probe.seen) == list(range(8))
    for step, seen in probe.seen.items():
        n, m = technique.frame(step)
        assert seen["kept"] == {n}, step
        assert seen["beta"] == pytest.approx(technique.beta(step)), step
        # warm-up: all-ones masks; at the first decay step beta = 1 still gives the dense weight
        assert seen["unmasked"] == (step <= 2), step
    # decay phase steps 2-5 (4 steps, 3 frames start at 2 + floor(i * 4 / 3)): 3:4, 2:4, 1:4, 1:4;
    # binary 1:4 fine-tune at steps 6-7
    assert [technique.frame(s)[0] for s in range(8)] == [4, 4, 3, 2, 1, 1, 1, 1]
    assert [probe.seen[s]["beta"] for s in range(8)] == pytest.approx([1, 1, 1, 0.75, 0.5, 0.25, 0, 0])
    metrics = trainer.callback_metrics
    assert float(metrics["sparsity/beta"]) == 0.0
    assert (float(metrics["sparsity/n"]), float(metrics["sparsity/m"])) == (1.0, 4.0)
    assert float(metrics["sparsity/density"]) == 0.25


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "match"), [
    ({"n": 4, "m": 2}, r"Expected `n` < `m`, got n=4, m=2"),
    ({"n": 4, "m": 4}, r"Expected `n` < `m`, got n=4, m=4"),
    ({"n": 0, "m": 4}, r"Expected `n` > 0, got n=0"),
    ({"n": 2.0, "m": 4}, r"Expected `n` to be an integer, got n=2.0"),
    ({"method": "sr-ste"}, r"Expected `method` in \['ste', 'srste', 'mask_decay'\], got method='sr-ste'"),
    ({"decay": "cosine"}, r"Expected `decay` in \['linear', 'exp'\], got decay='cosine'"),
    ({"structure_decay": "densify"}, r"Expected `structure_decay` in .*got structure_decay='densify'"),
    ({"srste_lambda": -1e-4}, r"Expected `srste_lambda` in \[0, inf\), got srste_lambda=-0.0001"),
    ({"decay_rate": 0.0}, r"Expected `decay_rate` in \(0, inf\), got decay_rate=0.0"),
    ({"dense_steps": -1}, r"Expected `dense_steps` to be an integer >= 0, got dense_steps=-1"),
    ({"finetune_steps": -2}, r"Expected `finetune_steps` to be an integer >= 0, got finetune_steps=-2"),
    ({"total_steps": 0}, r"Expected `total_steps` to be an integer >= 1 or None, got total_steps=0"),
    ({"update_every": 0}, r"Expected `update_every` to be an integer >= 1, got update_every=0"),
    ({"dense_steps": 5, "finetune_steps": 6, "total_steps": 10},
     r"Expected `dense_steps` \+ `finetune_steps` <= `total_steps`, got dense_steps=5, finetune_steps=6, "
     r"total_steps=10"),
    ({"n": 3, "m": 8, "structure_decay": "stepwise"},
     r"Expected `m / n` to be a power of 2 with structure_decay='stepwise'.*got n=3, m=8"),
    ({"include": "*blocks*"}, r"Expected `include` to be a list of name patterns"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NMSparsity(**kwargs)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"n": 1, "m": 3},
     r"Expected `m` to divide the input size of layer `model.blocks.0.attn.qkv` \(weight shape \(96, 32\)\), "
     r"got m=3 for 32 inputs"),
    ({"n": 1, "m": 8, "structure_decay": "geometric"},
     r"layer `model.blocks.0.attn.qkv` \(weight shape \(96, 32\)\), got m=64 \(a geometric structure-decay "
     r"frame\) for 32 inputs"),
    ({"include": ["*decoder*"]}, r"No linear layer matched include=\['\*decoder\*'\].*model.blocks.0.attn.qkv"),
    ({"dense_steps": 1, "finetune_steps": 2}, r"Expected `dense_steps` \+ `finetune_steps` <= `total_steps`, "
                                              r"got dense_steps=1, finetune_steps=2, total_steps=2"),
])
def test_bad_setup_fails_before_training(kwargs, match):
    technique = NMSparsity(**kwargs)
    with pytest.raises(ValueError, match=match):
        run([technique], max_steps=2)


def test_two_sparsity_callbacks_on_the_same_weight_are_refused():
    first, second = NMSparsity(n=2, m=4), NMSparsity(n=1, m=4, include=["*mlp*"])
    with pytest.raises(ValueError, match=r"`model.blocks.0.mlp.fc1.weight` is already masked by NMSparsity "
                                         r"\(trainer.callbacks\[\d\]\); NMSparsity \(trainer.callbacks\[\d\]\) "
                                         r"cannot mask it too"):
        run([first, second], max_steps=1)
    # on different layers they compose
    attn, mlp = NMSparsity(n=2, m=4, include=["*attn*"]), NMSparsity(n=1, m=4, include=["*mlp*"])
    run([attn, mlp], max_steps=1)
    assert all((groups_nonzero(mod.weight, 4) == 2).all() for mod in attn.targets.values())
    assert all((groups_nonzero(mod.weight, 4) == 1).all() for mod in mlp.targets.values())


# --------------------------------------------------------------------------------------------
# FLOPs
# --------------------------------------------------------------------------------------------
def test_effective_flops_of_a_2of4_run_count_masked_matmuls_at_half():
    technique, monitor = NMSparsity(n=2, m=4, method="srste"), FlopsMonitor()
    trainer, module = run([monitor, technique], max_steps=2)
    masked = masked_layer_flops(technique, trainer, module)
    assert masked > 0
    assert monitor.last_step_effective == monitor.last_step_executed - masked / 2
    assert monitor.total_effective == monitor.total_executed - masked  # two steps at 2:4
