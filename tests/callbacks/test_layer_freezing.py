"""LayerFreezing: the schedule in a fit, frozen weights (and BatchNorm statistics, masks)
bit-identical, CNN stages, resume, composition with sparsity callbacks, errors."""

from __future__ import annotations

import fnmatch
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import Callback

from lit_eff import sparsity
from lit_eff.callbacks import LayerFreezing, MagnitudePruning, NMSparsity
from lit_eff.callbacks.masking import MaskingTechnique
from tests.helpers import MODELS, flat_state, make_trainer, seeded, tiny_vit


def run(callbacks, model="vit", module=None, **trainer_kwargs):
    seeded(0)
    make_model, make_data = MODELS[model]
    module = module or make_model()
    trainer_kwargs.setdefault("max_steps", 8)
    trainer = make_trainer(callbacks=callbacks, **trainer_kwargs)
    trainer.fit(module, datamodule=make_data())
    return trainer, module


class Snapshots(Callback):
    """The full model state after every optimizer step (place it after LayerFreezing)."""

    def __init__(self):
        self.states, self.frozen = {}, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        technique = next(cb for cb in trainer.callbacks if isinstance(cb, LayerFreezing))
        self.states[trainer.global_step] = flat_state(pl_module)
        self.frozen[trainer.global_step] = technique.frozen


def assert_frozen_since(snapshots, prefixes, since, last):
    """Every state entry under ``prefixes`` is bit-identical from step ``since`` to ``last``;
    the rest of the weights changed."""
    first, end = snapshots.states[since], snapshots.states[last]
    frozen = [k for k in first if k.startswith(prefixes)]
    assert frozen
    for key in frozen:
        assert torch.equal(first[key], end[key]), key
    moving = [k for k in first if not k.startswith(prefixes) and first[k].is_floating_point()
              and k.endswith("weight")]
    assert any(not torch.equal(first[k], end[k]) for k in moving)


def test_vit_freezes_the_first_block_and_stem_and_they_stay_bit_identical():
    snapshots = Snapshots()
    trainer, module = run([LayerFreezing(final_fraction=0.5, freeze_start=0.25), snapshots])
    assert [snapshots.frozen[s] for s in range(1, 9)] == [0, 1, 1, 1, 1, 1, 1, 1]  # from step 2 (0.25 * 8)
    stem = ("model.patch_embed.", "model.cls_token", "model.pos_embed", "model.blocks.0.")
    assert_frozen_since(snapshots, stem, 2, 8)
    before = snapshots.states[1]
    assert not torch.equal(before["model.blocks.0.mlp.fc1.weight"], snapshots.states[8]["model.blocks.0.mlp.fc1.weight"])
    assert not module.model.blocks[0].training and module.model.blocks[1].training
    # AdamW state of the frozen weights is still there (for a later resume), untouched
    optimizer = trainer.optimizers[0]
    assert len(optimizer.state[module.model.blocks[0].mlp.fc1.weight]) > 0


def test_cnn_stages_freeze_with_batchnorm_statistics():
    snapshots = Snapshots()
    run([LayerFreezing(final_fraction=0.5, freeze_start=0.25, freeze_end=0.75), snapshots], model="cnn")
    assert [snapshots.frozen[s] for s in (1, 2, 5, 6, 8)] == [0, 1, 1, 2, 2]
    # running_mean/var and num_batches_tracked of the stem and layer1 included
    assert_frozen_since(snapshots, ("model.conv1.", "model.bn1.", "model.layer1."), 2, 8)
    assert_frozen_since(snapshots, ("model.layer2.",), 6, 8)
    assert not torch.equal(snapshots.states[2]["model.layer2.0.bn1.running_mean"],
                           snapshots.states[6]["model.layer2.0.bn1.running_mean"])


def test_frozen_blocks_get_no_gradient_and_need_no_backward():
    """With the stem frozen, nothing before block 1 needs a gradient: block 0's outputs carry no
    autograd graph at all (its backward work is gone, not just its weight update)."""
    seen = {}

    class Peek(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 3:
                hook = pl_module.model.blocks[0].register_forward_hook(
                    lambda mod, args, out: seen.update(out_requires_grad=out.requires_grad))
                self.hook = hook

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step == 3:
                self.hook.remove()
                seen["grads"] = [p.grad for p in pl_module.model.blocks[0].parameters()]

    run([LayerFreezing(final_fraction=0.5, freeze_start=0.25), Peek()], max_steps=4)
    assert seen["out_requires_grad"] is False
    assert all(g is None for g in seen["grads"])


def test_resume_refreezes_the_same_blocks(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1, filename="{step}")
    _, full = run([LayerFreezing(final_fraction=0.5, freeze_start=0.25), ckpt], enable_checkpointing=True)
    technique = LayerFreezing(final_fraction=0.5, freeze_start=0.25)
    seeded(0)
    make_model, make_data = MODELS["vit"]
    resumed = make_model()
    trainer = make_trainer(callbacks=[technique], max_steps=8)
    trainer.fit(resumed, datamodule=make_data(), ckpt_path=str(tmp_path / "step=3.ckpt"))
    assert technique.frozen == 1 and not any(p.requires_grad for p in resumed.model.blocks[0].parameters())
    assert all(torch.equal(a, b) for a, b in zip(flat_state(full).values(), flat_state(resumed).values()))


def test_frozen_layers_keep_their_nm_masks():
    snapshots = Snapshots()
    nm = NMSparsity(n=2, m=4, method="srste", dense_steps=0, finetune_steps=0)
    run([nm, LayerFreezing(final_fraction=0.5, freeze_start=0.25), snapshots])
    # masks, β and dense weights of block 0 are buffers/parameters under model.blocks.0: all bit-identical
    masks = [k for k in snapshots.states[2] if k.startswith("model.blocks.0.") and k.endswith(".mask")]
    assert len(masks) == 4
    assert_frozen_since(snapshots, ("model.blocks.0.",), 2, 8)
    assert any(not torch.equal(snapshots.states[2][k.replace("0.", "1.", 1)], snapshots.states[8][k.replace("0.", "1.", 1)])
               for k in masks)  # block 1's masks kept changing
    for name, layer in nm.targets.items():
        assert sparsity.has_mask(layer), name


class Settling(MaskingTechnique):
    """A masking technique whose masks on the blocks' Linear layers change until ``until``."""

    def __init__(self, until, include="*blocks.*"):
        super().__init__()
        self.until, self.pattern, self.asked = until, include, []

    def setup(self, trainer, pl_module, stage):
        self.targets = {n: m for n, m in pl_module.named_modules()
                        if isinstance(m, torch.nn.Linear) and fnmatch.fnmatch(n, self.pattern)}

    # only the interface LayerFreezing talks to: none of the base's mask work
    def on_fit_start(self, *args, **kwargs):
        pass

    on_train_start = on_train_batch_end = on_train_end = teardown = on_fit_start

    def mask_changes_after(self, step, total_steps):
        self.asked.append((step, total_steps))
        return f"it updates masks until step {self.until}" if self.until >= step else None


def test_masks_still_changing_after_freezing_starts_are_refused():
    with pytest.raises(ValueError, match=r"Settling \(trainer.callbacks\[0\]\) masks layers that LayerFreezing "
                                         r"\(trainer.callbacks\[1\]\) freezes from step 2, and it updates masks until "
                                         r"step 4: frozen layers must keep their masks"):
        run([Settling(until=4), LayerFreezing(final_fraction=0.5, freeze_start=0.25)])
    settled = Settling(until=1)
    trainer, _ = run([settled, LayerFreezing(final_fraction=0.5, freeze_start=0.25)])  # settled before step 2
    assert settled.asked == [(2, 8)] and trainer.global_step == 8
    # masks only on block 1, which never freezes: not asked
    elsewhere = Settling(until=8, include="*blocks.1.*")
    run([elsewhere, LayerFreezing(final_fraction=0.5, freeze_start=0.25)], max_steps=3)
    assert elsewhere.asked == []


def test_magnitude_pruning_still_pruning_after_freezing_starts_is_refused():
    gmp = MagnitudePruning(final_sparsity=0.5, start_step=0, end_step=4, update_every=1)
    with pytest.raises(ValueError, match=r"MagnitudePruning \(trainer.callbacks\[0\]\) masks layers that "
                                         r"LayerFreezing \(trainer.callbacks\[1\]\) freezes from step 2"):
        run([gmp, LayerFreezing(final_fraction=0.5, freeze_start=0.25)])


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    ({"final_fraction": 0.0}, r"Expected `final_fraction` in \(0, 1\], got final_fraction=0.0"),
    ({"final_fraction": 1.5}, r"Expected `final_fraction` in \(0, 1\], got final_fraction=1.5"),
    ({"freeze_start": -0.1}, r"Expected `freeze_start` in \[0, 1\], got freeze_start=-0.1"),
    ({"freeze_start": 0.8, "freeze_end": 0.5}, r"Expected `freeze_start` <= `freeze_end` \(0.75 unless set\), "
                                               r"got freeze_start=0.8, freeze_end=0.5"),
    ({"freeze_start": 0.8}, r"Expected `freeze_start` <= `freeze_end` \(0.75 unless set\), got freeze_start=0.8, "
                            r"freeze_end=None"),
    ({"total_steps": 0}, r"Expected `total_steps` to be an integer >= 1 or None, got total_steps=0"),
    ({"blocks": ""}, r"Expected `blocks` to be a dotted module name"),
    ({"schedule": "freezeout"}, r"Expected `schedule` in \['window', 'composer'\], got schedule='freezeout'"),
    ({"schedule": "composer", "freeze_end": 0.5}, r"Expected no `freeze_end` with schedule='composer'"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LayerFreezing(**kwargs)


def test_a_schedule_that_freezes_every_trainable_parameter_is_refused():
    module = tiny_vit()
    for name, param in module.named_parameters():
        if not name.startswith(("model.blocks.", "model.patch_embed.", "model.cls_token", "model.pos_embed")):
            param.requires_grad_(False)  # head and final norm already frozen
    with pytest.raises(ValueError, match=r"LayerFreezing with final_fraction=1.0 would freeze every trainable "
                                         r"parameter of ImageClassifier \(2 of 2 units and the stem\)"):
        run([LayerFreezing(final_fraction=1.0)], module=module, max_steps=1)


def test_a_fraction_that_freezes_no_unit_is_refused():
    with pytest.raises(ValueError, match=r"Expected `final_fraction` to freeze at least one of the 2 units"):
        run([LayerFreezing(final_fraction=0.4)], max_steps=1)


def test_unknown_blocks_are_refused():
    with pytest.raises(ValueError, match=r"Expected `blocks` to name a submodule of ImageClassifier"):
        run([LayerFreezing(blocks="model.stages")], max_steps=1)


def test_fsdp1_is_refused_with_its_reason():
    from lightning.pytorch.strategies import FSDPStrategy

    trainer = SimpleNamespace(strategy=FSDPStrategy(), callbacks=[])
    with pytest.raises(ValueError, match=r"LayerFreezing does not support FSDPStrategy: FSDP1 flattens .* Use DDP or "
                                         r"ModelParallelStrategy \(FSDP2\)"):
        LayerFreezing().setup(trainer, tiny_vit(), "fit")


@pytest.mark.parametrize("strategy, refused", [("ddp", True), ("ddp_find_unused_parameters_true", False)])
def test_ddp_needs_find_unused_parameters(strategy, refused):
    """One CPU process under DDP: refused before any step unless DDP looks for unused parameters."""
    technique, batches = LayerFreezing(final_fraction=0.5, freeze_start=0.25), []

    class Batches(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            batches.append(batch_idx)

    if refused:
        with pytest.raises(ValueError, match=r"LayerFreezing needs DDP with find_unused_parameters=True "
                                             r"\(and static_graph=False\): .* Set "
                                             r"strategy='ddp_find_unused_parameters_true'"):
            run([technique, Batches()], strategy=strategy, max_steps=4)
        assert batches == []
    else:
        trainer, module = run([technique], strategy=strategy, max_steps=4)
        assert technique.frozen == 1 and not any(p.requires_grad for p in module.model.blocks[0].parameters())


# --------------------------------------------------------------------------------------------
# Composer's schedule; FLOPs recounted when a block freezes; arguments that never act
# --------------------------------------------------------------------------------------------
def test_composer_schedule_in_a_fit():
    """freeze_start 0.25, freeze_level 1.0, 2 blocks, 8 steps: Composer freezes int(2·(d − 0.25)/0.75)
    blocks at d = step/8, so block 0 from step 5 (not 2) and block 1 only at the end."""
    from tests.gradients.test_freezing import composer_reference

    snapshots = Snapshots()
    run([LayerFreezing(final_fraction=1.0, freeze_start=0.25, schedule="composer"), snapshots])
    frozen = [snapshots.frozen[s] for s in range(1, 9)]
    assert frozen == [composer_reference(s, 8, 2, 1.0, 0.25) for s in range(1, 9)]
    assert frozen == [0, 0, 0, 0, 1, 1, 1, 2]
    stem = ("model.patch_embed.", "model.cls_token", "model.pos_embed", "model.blocks.0.")
    assert_frozen_since(snapshots, stem, 5, 8)


def test_flops_are_recounted_when_a_block_freezes():
    from lit_eff.callbacks import FlopsMonitor

    technique, monitor = LayerFreezing(final_fraction=0.5, freeze_start=0.25), FlopsMonitor()
    keys = []

    class Keys(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            keys.append(technique.flops_key(trainer))

    run([technique, Keys(), monitor], max_steps=4)
    assert keys == [0, 1, 1, 1]  # block 0 freezes after step 0 (0.25 · 4 steps)
    assert monitor.counted_batches == 2  # counted once before and once after the freeze
    dense = run([FlopsMonitor()], max_steps=1)[0].callbacks[0]
    assert monitor.last_step_executed < dense.last_step_executed


@pytest.mark.parametrize("kwargs, argument, why", [
    ({"freeze_start": 1.0, "freeze_end": 1.0}, "freeze_start",
     r"the first unit freezes at step 8, after the last step 7"),
    ({"freeze_start": 0.5, "total_steps": 20}, "freeze_start", r"the first unit freezes at step 10, after the last"),
    ({"final_fraction": 1.0, "freeze_start": 0.1, "freeze_end": 0.9, "total_steps": 16}, "freeze_end",
     r"only 1 of the 2 units freeze before the last step \(the last would freeze at step 14\)"),
    ({"final_fraction": 0.5, "schedule": "composer"}, "freeze_start", r"the first unit freezes at step 8"),
])
def test_arguments_that_never_act_in_the_run_warn(kwargs, argument, why):
    module = tiny_vit()
    with pytest.warns(UserWarning, match=rf"LayerFreezing: `{argument}`=.* never acts in this run of 8 optimizer "
                                         rf"steps: {why}"):
        run([LayerFreezing(**kwargs)], module=module)
