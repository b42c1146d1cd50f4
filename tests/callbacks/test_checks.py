"""What every sparsity callback shares through MaskingTechnique: the run length, checks of the
schedule over the run, non-finite weights, validate/test setup, convolutions,
mask_changes_after, and hardened weights at the end of a ddp_spawn worker's fit."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import Callback

from lit_eff import sparsity
from lit_eff.callbacks import DynamicSparsity, FlopsMonitor, MagnitudePruning, NMSparsity, StaticSparsity
from lit_eff.flops import get_density
from tests.helpers import MODELS, fit, make_trainer, seeded, tiny_cnn

ALL = {
    "nm": lambda **kw: NMSparsity(n=2, m=4, method="srste", **kw),
    "gmp": lambda **kw: MagnitudePruning(final_sparsity=0.5, start_step=0, end_step=2, update_every=1, **kw),
    "rigl": lambda **kw: DynamicSparsity(sparsity=0.5, update_every=1, stop_fraction=1.0, **kw),
    "static": lambda **kw: StaticSparsity(sparsity=0.5, **kw),
}


def dense(module):
    return module.parametrizations.weight.original


# --------------------------------------------------------------------------------------------
# the run length
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("callback, fix", [
    (MagnitudePruning(final_sparsity=0.5), "set `end_step` or trainer.max_steps"),
    (NMSparsity(), "set `total_steps` or trainer.max_steps"),
    (DynamicSparsity(sparsity=0.5), "set trainer.max_steps"),
    (StaticSparsity(release_fraction=0.5), "set `release_step` or trainer.max_steps"),
])
def test_callbacks_fail_before_training_on_an_endless_run(callback, fix):
    trainer = SimpleNamespace(estimated_stepping_batches=float("inf"))
    with pytest.raises(ValueError, match=rf"{type(callback).__name__} cannot tell the length of training: {fix}"):
        callback.on_fit_start(trainer, None)


def test_when_max_epochs_ends_training_first_the_final_phases_are_reached():
    """max_steps=1000 but one epoch of 6 batches: the schedules end within those 6 steps."""
    nm = NMSparsity(n=2, m=4, method="mask_decay", decay_rate=0.01, finetune_steps=2, include=["*attn*"])
    gmp = MagnitudePruning(final_sparsity=0.5, update_every=1, include=["*mlp*"])
    trainer, _ = fit([nm, gmp], max_steps=1000, max_epochs=1)
    assert trainer.global_step == 6
    assert nm.schedule.total_steps == 6 and nm.beta(5) == 0.0
    for module in nm.targets.values():  # the fine-tune phase: binary 2:4
        assert float(sparsity.get_parametrization(module).beta) == 0.0
        assert ((module.weight != 0).reshape(-1, 4).sum(1) == 2).all()
    assert gmp.schedule.end_step == 4  # 3/4 of 6
    assert all(int((dense(m) == 0).sum()) == m.weight.numel() // 2 for m in gmp.targets.values())


# --------------------------------------------------------------------------------------------
# schedules that cannot act in this run
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("callback, match", [
    (MagnitudePruning(final_sparsity=0.5, start_step=10, end_step=20),
     r"MagnitudePruning: `start_step`=10 never acts in this run of 4 optimizer steps: nothing is ever pruned"),
    (MagnitudePruning(final_sparsity=0.5, start_step=0, end_step=10, update_every=2),
     r"MagnitudePruning: `end_step`=10 never acts .* the run ends before `final_sparsity`=0.5 is reached"),
    (StaticSparsity(sparsity=0.5, release_step=4),
     r"StaticSparsity: `release_step`=4 never acts in this run of 4 .*: the masks are never released"),
    (DynamicSparsity(sparsity=0.5, update_every=5, stop_fraction=1.0),
     r"DynamicSparsity: `update_every`=5 never acts in this run of 4 .* before step 4 .* so they never move"),
    (NMSparsity(dense_steps=4), r"NMSparsity: `dense_steps`=4 never acts.*: the whole run trains dense"),
    (NMSparsity(finetune_steps=2, total_steps=100),
     r"NMSparsity: `total_steps`=100 never acts .*: the schedule reaches 2:4 with β = 0 only at step 98"),
])
def test_a_schedule_that_cannot_act_warns_naming_the_argument(callback, match):
    with pytest.warns(UserWarning, match=match):
        fit([callback], max_steps=4)


# --------------------------------------------------------------------------------------------
# non-finite weights
# --------------------------------------------------------------------------------------------
class Poison(Callback):
    """After the optimizer step that reaches ``at``, the weight of ``layer`` becomes NaN (``rows``
    of it; all with None)."""

    def __init__(self, technique, at, layer="model.blocks.0.mlp.fc1", rows=slice(0, 1)):
        self.technique, self.at, self.layer, self.rows = technique, at, layer, rows

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.at:
            with torch.no_grad():
                dense(self.technique.targets[self.layer])[self.rows] = float("nan")


@pytest.mark.parametrize("kind", sorted(ALL))
def test_nan_weights_stop_training_naming_the_layer_and_the_step(kind):
    """Checked after every step (N:M), at mask updates (GMP and RigL here update every step) and on
    logging steps (StaticSparsity, whose mask never changes: every 2 steps here)."""
    technique = ALL[kind]()
    with pytest.raises(FloatingPointError, match=rf"{type(technique).__name__}: the weights of "
                                                 r"`model.blocks.0.mlp.fc1` hold NaN or inf after optimizer step 2"):
        fit([Poison(technique, at=2), technique], max_steps=6, log_every_n_steps=2)


def test_nan_weights_are_reported_at_the_end_of_training_at_the_latest():
    technique = StaticSparsity(sparsity=0.5)  # after step 1 (masks drawn), no mask change, no logging step
    # by then the NaN has spread through the forward pass to every layer
    with pytest.raises(FloatingPointError, match=r"weights of `model.blocks.0.attn.qkv`, .*`model.blocks.0.mlp.fc1`.* "
                                                 r"hold NaN or inf after optimizer step 3"):
        fit([Poison(technique, at=2), technique], max_steps=3)


def test_an_all_nan_layer_keeps_an_exact_nm_mask_and_its_true_density_with_on_nonfinite_warn():
    technique, monitor = NMSparsity(n=2, m=4, method="ste", on_nonfinite="warn"), FlopsMonitor()
    poison = Poison(technique, at=1, rows=slice(None))
    with pytest.warns(UserWarning, match=r"`model.blocks.0.mlp.fc1` hold NaN or inf after optimizer step 1"):
        fit([monitor, poison, technique], max_steps=3)
    layer = technique.targets["model.blocks.0.mlp.fc1"]
    mask = sparsity.get_mask(layer)
    assert dense(layer).isnan().all()
    assert (mask.reshape(-1, 4).sum(1) == 2).all()  # not an all-ones mask
    assert get_density(layer) == float(mask.float().mean()) == 0.5  # the FLOPs it reports are true
    assert monitor.last_step_effective < monitor.last_step_executed


# --------------------------------------------------------------------------------------------
# validate / test: attach all-ones masks, never draw or zero anything
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(ALL))
def test_validate_attaches_all_ones_masks_and_a_checkpoint_brings_the_trained_ones(kind, tmp_path):
    trainer, trained = fit([ALL[kind]()], max_steps=3)
    path = tmp_path / "run.ckpt"
    trainer.save_checkpoint(path)
    make_model, make_data = MODELS["vit"]
    seeded(1)
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    technique = ALL[kind]()
    make_trainer(callbacks=[technique]).validate(model, datamodule=make_data(), verbose=False)
    for name, module in technique.targets.items():
        assert sparsity.get_mask(module).all(), name
        assert torch.equal(dense(module), before[f"{name}.weight"]), name  # nothing zeroed
        assert torch.equal(module.weight, before[f"{name}.weight"]), name
    technique = ALL[kind]()
    make_trainer(callbacks=[technique]).validate(make_model(), datamodule=make_data(), ckpt_path=str(path),
                                                 verbose=False)
    trained_masks = {name: sparsity.get_mask(m) for name, m in sparsity.masked_modules(trained).items()}
    for name, module in technique.targets.items():
        assert torch.equal(sparsity.get_mask(module), trained_masks[name]), name


# --------------------------------------------------------------------------------------------
# convolutions
# --------------------------------------------------------------------------------------------
def test_nm_on_convolutions_groups_input_channels():
    technique = NMSparsity(n=2, m=4, method="ste", layers=["conv"], include=["*layer*"])
    fit([technique], model="cnn", max_steps=2)
    assert technique.targets and all(isinstance(m, torch.nn.Conv2d) for m in technique.targets.values())
    for name, module in technique.targets.items():
        assert torch.equal(sparsity.get_mask(module), sparsity.nm_mask(dense(module), 2, 4)), name
        groups = (module.weight != 0).movedim(1, -1).reshape(-1, 4).sum(1)  # m consecutive input channels
        assert (groups == 2).all(), name


def test_static_sparsity_on_linear_and_conv_layers():
    technique = StaticSparsity(sparsity=0.75, layers=["linear", "conv"], include=["*layer4*", "*fc"])
    fit([technique], model="cnn", max_steps=2)
    layers = technique.targets.values()
    assert any(isinstance(m, torch.nn.Conv2d) for m in layers) and any(isinstance(m, torch.nn.Linear) for m in layers)
    for name, module in technique.targets.items():
        assert int(sparsity.get_mask(module).sum()) == round(0.25 * module.weight.numel()), name
        assert (dense(module)[~sparsity.get_mask(module)] == 0).all(), name


def test_a_target_matching_only_convolutions_says_to_add_them():
    with pytest.raises(ValueError, match=r"include=\['\*conv\*'\] exclude=\[\] matched only conv layers "
                                         r"\(model.conv1.0, .*\), and only linear layers are masked: .*"
                                         r"layers: \[linear, conv\]"):
        fit([NMSparsity(include=["*conv*"])], model="cnn", max_steps=1)
    with pytest.raises(ValueError, match=r"Expected `layers` in \['linear', 'conv'\], got layers='dense'"):
        NMSparsity(layers=["dense"])


# --------------------------------------------------------------------------------------------
# mask_changes_after (what other techniques ask)
# --------------------------------------------------------------------------------------------
def resolved(callback, total=100):
    callback.resolve(SimpleNamespace(estimated_stepping_batches=total))
    return callback


def test_mask_changes_after():
    nm = resolved(NMSparsity(n=2, m=4, method="srste", dense_steps=10))
    assert nm.mask_changes_after(5, 100) == "its N:M frame/β moves from 4:4/1 at step 5 to 2:4/0 at step 99"
    assert nm.mask_changes_after(10, 100) is None  # masks follow the weights: frozen weights, frozen masks
    pgf = resolved(NMSparsity(n=1, m=4, method="mask_decay", structure_decay="stepwise", finetune_steps=20))
    assert "at step 79" not in pgf.mask_changes_after(50, 100) and pgf.mask_changes_after(80, 100) is None
    gmp = resolved(MagnitudePruning(final_sparsity=0.5, start_step=0, end_step=50, update_every=10))
    assert gmp.mask_changes_after(10, 100) == "it updates masks until step 50 (end_step=50)"
    assert gmp.mask_changes_after(50, 100) is None
    rigl = resolved(DynamicSparsity(sparsity=0.5, update_every=10, stop_fraction=0.75))
    assert rigl.mask_changes_after(60, 100) == "it moves masks until step 70"
    assert rigl.mask_changes_after(70, 100) is None
    spdf = resolved(StaticSparsity(release_step=30))
    assert spdf.mask_changes_after(10, 100) == "it releases its masks at step 30"
    assert spdf.mask_changes_after(30, 100) is None
    assert resolved(StaticSparsity()).mask_changes_after(0, 100) is None


# --------------------------------------------------------------------------------------------
# ddp_spawn: the main process receives the effective weights
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(ALL))
def test_a_spawned_worker_hardens_its_masks_at_the_end_of_fit(kind):
    technique = ALL[kind]()
    technique._origin_pid = -1  # as in a process ddp_spawn started
    effective = {}

    class Record(Callback):
        def on_train_end(self, trainer, pl_module):
            effective.update({n: m.weight.detach().clone() for n, m in technique.targets.items()})

    _, module = fit([Record(), technique], max_steps=3)
    state = module.state_dict()
    assert not any("parametrizations" in key for key in state)
    for name in technique.targets:
        assert torch.equal(state[f"{name}.weight"], effective[name]), name
