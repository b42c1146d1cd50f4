"""GradientMasking: the kept entries are the top of the accumulated, unscaled gradient (checked
against plain PyTorch), only pattern entries move (AdamW included), refresh timing, density
schedules, composition with sparsity callbacks, errors."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback
from lightning.pytorch.plugins.precision import MixedPrecision

from lit_eff import sparsity
from lit_eff.callbacks import GradientMasking, LayerFreezing, MagnitudePruning, NMSparsity
from lit_eff.gradients import dense_weight, kept_count
from lit_eff.schedules import Linear
from tests.helpers import fit as run, seeded, tiny_vit


def grad_mask(callbacks):
    return next(cb for cb in callbacks if isinstance(cb, GradientMasking))


# --------------------------------------------------------------------------------------------
# must show: top fraction of the fully accumulated, unscaled gradient, vs plain PyTorch
# --------------------------------------------------------------------------------------------
class FirstStep(Callback):
    """Records the initial weights, the micro-batches of the first optimizer step and the
    gradients the optimizer receives (place it after GradientMasking)."""

    def __init__(self):
        self.batches, self.grads = [], {}

    def on_train_start(self, trainer, pl_module):
        self.initial = copy.deepcopy(pl_module.state_dict())

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 0:
            self.batches.append([t.clone() for t in batch])

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == 0:
            technique = grad_mask(trainer.callbacks)
            self.patterns = {n: p.clone() for n, p in technique.patterns.items()}
            self.grads = {n: dense_weight(m).grad.clone() for n, m in technique.layers.items()}


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_kept_entries_are_the_top_of_the_accumulated_unscaled_gradient(precision):
    dtype = torch.float16 if precision == "16-mixed" else torch.bfloat16
    # a real loss scaler on CPU (Lightning's CPU 16-mixed has none): scaled backward, unscale_ before the hook
    plugins = [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 12))] \
        if precision == "16-mixed" else []
    probe = FirstStep()
    kwargs = {"plugins": plugins} if plugins else {"precision": precision}
    run([GradientMasking(density=0.3, refresh_every=5), probe], max_steps=1, accumulate_grad_batches=2, **kwargs)
    assert len(probe.batches) == 2

    # the same step in plain PyTorch: both micro-batches, loss / 2 each, autocast, scaled backward, unscale
    seeded(0)
    model = tiny_vit()
    model.load_state_dict(probe.initial)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, enabled=precision == "16-mixed")
    for images, labels in probe.batches:
        with torch.autocast("cpu", dtype=dtype):
            loss = F.cross_entropy(model(images).float(), labels) / 2
        scaler.scale(loss).backward()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler.unscale_(optimizer)

    layers = dict(model.named_modules())
    for name, pattern in probe.patterns.items():
        g = layers[name].weight.grad
        k = kept_count(g.numel(), 0.3)
        assert int(pattern.sum()) == k, name
        assert g.abs()[pattern].min() >= g.abs()[~pattern].max(), name  # exactly a top-k set of |g|
        # what the optimizer gets: the unscaled accumulated gradient, zero outside the pattern
        assert torch.equal(probe.grads[name], g * pattern), name


# --------------------------------------------------------------------------------------------
# only pattern entries move; refresh timing; schedules; composition
# --------------------------------------------------------------------------------------------
class StepProbe(Callback):
    """Around every optimizer step (an optimizer post-hook registered after GradientMasking's):
    which dense-weight entries changed, the pattern in force, and the AdamW momentum outside it."""

    def __init__(self):
        self.steps = []

    def on_train_start(self, trainer, pl_module):
        self.technique = grad_mask(trainer.callbacks)
        self.optimizer = trainer.optimizers[0]
        trainer.optimizers[0].register_step_post_hook(self._after)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        t = self.technique
        self.before = {n: dense_weight(m).detach().clone() for n, m in t.layers.items()}
        self.keep = {n: t.patterns[n] & (sparsity.get_mask(m) if sparsity.has_mask(m) else True)
                     for n, m in t.layers.items()}
        self.step, self.density = trainer.global_step, t.density_in_force
        self.patterns = {n: p.clone() for n, p in t.patterns.items()}

    def _after(self, optimizer, args, kwargs):
        t, record = self.technique, {}
        for name, module in t.layers.items():
            weight = dense_weight(module)
            changed = weight.detach() != self.before[name]
            state = optimizer.state[weight]
            record[name] = {
                "outside": int((changed & ~self.keep[name]).sum()),
                "inside": int(changed.sum()),
                "momentum_outside": int(((state["exp_avg"] != 0) & ~self.keep[name]).sum()),
                "allowed": int(sparsity.get_mask(module).sum()) if sparsity.has_mask(module) else weight.numel(),
                "pattern_outside_mask": int((self.patterns[name] & ~self.keep[name]).sum()),
            }
        self.steps.append((self.step, self.density, self.patterns, record))


@pytest.mark.parametrize("companion", ["none", "nm", "gmp"])
def test_only_pattern_entries_move_under_adamw(companion):
    companions = {
        "none": [],
        # 2:4 SR-STE: the gradient (and the decay term) reach pruned weights; masking keeps among kept ones
        "nm": [NMSparsity(n=2, m=4, method="srste", dense_steps=0, finetune_steps=0)],
        "gmp": [MagnitudePruning(final_sparsity=0.5, start_step=0, end_step=3, update_every=1)],
    }[companion]
    probe = StepProbe()
    trainer, module = run([*companions, GradientMasking(density=0.25, refresh_every=3), probe], max_steps=6)
    assert [s for s, *_ in probe.steps] == list(range(6))
    for step, density, patterns, record in probe.steps:
        for name, r in record.items():
            assert r["outside"] == 0, (step, name)  # nothing outside pattern ∧ sparsity mask moved
            assert r["inside"] > 0, (step, name)
        if step in (0, 3):
            for name, r in record.items():
                assert int(patterns[name].sum()) == kept_count(r["allowed"], 0.25), (step, name)
                assert r["pattern_outside_mask"] == 0, (step, name)  # chosen among the kept weights
    # patterns change at refreshes (steps 0 and 3) only
    p = [patterns for _, _, patterns, _ in probe.steps]
    assert all(torch.equal(p[i][n], p[0][n]) for i in (1, 2) for n in p[0])
    assert all(torch.equal(p[i][n], p[3][n]) for i in (4, 5) for n in p[3])
    assert any(not torch.equal(p[3][n], p[0][n]) for n in p[0])
    # not vacuous: after the refresh at 3, AdamW momentum sits outside the new pattern (it would move them)
    assert sum(r["momentum_outside"] for r in probe.steps[3][3].values()) > 0
    if companion != "none":  # the sparsity masks did prune: "allowed" is a strict subset
        assert all(r["allowed"] < module_numel for r, module_numel in
                   ((r, dense_weight(grad_mask(trainer.callbacks).layers[n]).numel())
                    for n, r in probe.steps[-1][3].items()))


def test_density_schedule_is_read_at_each_refresh_and_logged():
    probe = StepProbe()
    schedule = Linear(0.5, 0.1, 0, 4)
    trainer, _ = run([GradientMasking(density=schedule, refresh_every=2), probe], max_steps=6)
    for step, density, patterns, record in probe.steps:
        refreshed = step - step % 2
        assert density == pytest.approx(schedule(refreshed))
        for name, r in record.items():
            assert int(patterns[name].sum()) == kept_count(r["allowed"], schedule(refreshed))
    assert float(trainer.callback_metrics["grad_mask/density"]) == pytest.approx(schedule(4))
    assert 0.0 < float(trainer.callback_metrics["grad_mask/kept_norm_fraction"]) < 1.0


def test_frozen_layers_are_skipped_with_layer_freezing():
    trainer, module = run([LayerFreezing(final_fraction=0.5, freeze_start=0.5, freeze_end=0.5),
                           GradientMasking(density=0.5, refresh_every=2)], max_steps=4)
    technique = grad_mask(trainer.callbacks)
    assert all(not p.requires_grad for p in module.model.blocks[0].parameters())
    assert set(technique.patterns) == set(technique.layers)


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("density", [0.0, 1.5, -0.2])
def test_density_outside_unit_interval(density):
    with pytest.raises(ValueError, match=rf"Expected `density` in \(0, 1\], got density={density}"):
        GradientMasking(density=density)


def test_a_density_schedule_leaving_the_unit_interval_is_refused_before_training():
    seen = []

    class Steps(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(trainer.global_step)

    with pytest.raises(ValueError, match=r"GradientMasking: Expected `density` in \(0, 1\] at every step of the run "
                                         r"\(0..7\), got Linear\(.*\) = 0 at step 4"):
        run([GradientMasking(density=Linear(0.5, 0.0, 0, 4)), Steps()], max_steps=8)
    assert seen == []
    # reaching 0 only when the run is over is fine
    run([GradientMasking(density=Linear(0.5, 0.0, 0, 8), refresh_every=2)], max_steps=8)


@pytest.mark.parametrize("refresh_every", [0, -3, 2.5, True])
def test_refresh_every_below_one(refresh_every):
    with pytest.raises(ValueError, match=r"Expected `refresh_every` to be an integer >= 1, got refresh_every="):
        GradientMasking(refresh_every=refresh_every)


def test_patterns_that_match_nothing_list_the_layers():
    with pytest.raises(ValueError, match=r"No linear layer matched include=\['\*nothing\*'\].*model.blocks.0.attn.qkv"):
        run([GradientMasking(include=["*nothing*"])], max_steps=1)


def test_fsdp1_is_refused_with_its_reason():
    from lightning.pytorch.strategies import FSDPStrategy

    trainer = SimpleNamespace(strategy=FSDPStrategy(), callbacks=[])
    with pytest.raises(ValueError, match=r"GradientMasking does not support FSDPStrategy: FSDP1 keeps gradients in "
                                         r"flattened, sharded parameters. Use DDP or ModelParallelStrategy \(FSDP2\)"):
        GradientMasking().setup(trainer, tiny_vit(), "fit")


def test_kept_norm_fraction_reaches_the_logger_on_every_logged_step(tmp_path):
    """Measured exactly on the steps whose values the logger writes (log_every_n_steps=2)."""
    import csv

    from lightning.pytorch.loggers import CSVLogger

    run([GradientMasking(density=0.25, refresh_every=3)], max_steps=7, log_every_n_steps=2,
        logger=CSVLogger(tmp_path, name="run", version=0))
    rows = [r for r in csv.DictReader(open(tmp_path / "run" / "version_0" / "metrics.csv")) if r["grad_mask/density"]]
    assert [int(r["step"]) for r in rows] == [1, 3, 5]
    fractions = [float(r["grad_mask/kept_norm_fraction"]) for r in rows]
    assert all(0.0 < f < 1.0 for f in fractions) and len(set(fractions)) == len(fractions)


def test_an_endless_run_checks_the_density_schedule_at_each_refresh():
    """Without a known run length the schedule is checked when a refresh reads it."""
    technique = GradientMasking(density=Linear(0.5, 0.0, 0, 4), refresh_every=2)
    technique.on_fit_start(SimpleNamespace(estimated_stepping_batches=float("inf")), None)
    assert technique.density_at(2) == pytest.approx(0.25)
    with pytest.raises(ValueError, match=r"Expected `density \(at step 4\)` in \(0, 1\], got density \(at step 4\)=0.0"):
        technique.density_at(4)
