"""StructuredFFN in a fit: α follows the schedule, the guides cost FLOPs until they drop and then
the executed FLOPs fall to the structured model's, the optimizer loses the guides, checkpoints
convert to plain models, bad arguments fail before training."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint

from lit_eff.callbacks import FlopsMonitor, NMSparsity, StructuredFFN, StructuredPruning
from lit_eff.flops import count_flops
from lit_eff.structured import guide_alpha
from tests.helpers import MODELS, fit, make_trainer, seeded


class Steps(Callback):
    """Per optimizer step: α of the first layer, FLOPs of the step, parameters in the optimizer."""

    def __init__(self):
        self.alpha, self.flops, self.optimized = {}, {}, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        layer = pl_module.model.blocks[0].mlp.fc1
        self.alpha[trainer.global_step] = float(layer.alpha) if layer.guided else None
        self.optimized[trainer.global_step] = sum(p.numel() for g in trainer.optimizers[0].param_groups
                                                  for p in g["params"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        monitor = next(cb for cb in trainer.callbacks if isinstance(cb, FlopsMonitor))
        self.flops[trainer.global_step - 1] = monitor.last_step_executed


def test_self_guided_phase_then_structured_flops():
    technique, steps, monitor = StructuredFFN(rank=8, guide_fraction=0.5), Steps(), FlopsMonitor()
    trainer, module = fit([technique, monitor, steps], "vit", max_steps=8)
    assert technique.guide_steps == 4
    for step in range(8):  # cosine from 1 at step 0 to 0 at step 4, when the guides drop
        assert steps.alpha[step] == (pytest.approx(guide_alpha(step, 4)) if step < 4 else None)
    assert steps.alpha[1] == pytest.approx(0.5 * (1 + torch.cos(torch.tensor(torch.pi / 4)).item()))
    guided, structured = {steps.flops[s] for s in range(4)}, {steps.flops[s] for s in range(4, 8)}
    assert len(guided) == len(structured) == 1 and guided.pop() > structured.pop()
    batch = next(iter(trainer.datamodule.train_dataloader()))
    assert steps.flops[7] == count_flops(lambda: module(batch[0])).total  # the model as it is now
    # 4 guides of 32 x 64 left the model and the optimizer at step 4
    assert steps.optimized[3] - steps.optimized[4] == 4 * 32 * 64
    assert not any(name.endswith("guide") for name, _ in module.named_parameters())


def test_unguided_layers_from_the_first_step_and_flops_below_dense():
    dense_monitor, monitor = FlopsMonitor(), FlopsMonitor()
    fit([dense_monitor], "gpt", max_steps=2)
    fit([StructuredFFN("blockdense", rank=16, blocks=4, guide_fraction=0.0), monitor], "gpt", max_steps=2)
    assert monitor.total_executed < dense_monitor.total_executed


def test_plain_state_dict_loads_into_the_plain_model(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    trainer, module = fit([StructuredFFN("lowrank", rank=8, guide_fraction=0.9), checkpoint], "gpt", max_steps=4,
                          enable_checkpointing=True)
    assert module.model.blocks[0].mlp.fc1.guided  # still guided: the plain weight mixes the guide in
    plain = MODELS["gpt"][0]()
    plain.load_state_dict(StructuredFFN.plain_state_dict(torch.load(tmp_path / "last.ckpt", weights_only=False)))
    x = torch.randint(0, 256, (2, 32))
    module.eval(), plain.eval()
    with torch.no_grad():
        assert torch.allclose(plain(x), module(x), atol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    ({"structure": "lowrank", "rank": 0}, r"Expected `rank` to be an integer >= 1, got rank=0"),
    ({"structure": "lowrank", "rank": 1.5}, r"Expected `rank` in \(0, 1\), got rank=1.5"),
    ({"structure": "lowrank"}, r"Expected `rank` to be an integer >= 1, got rank=None"),
    ({"structure": "blockshuffle", "blocks": 1}, r"Expected `blocks` to be an integer >= 2, got blocks=1"),
    ({"structure": "blockshuffle", "blocks": 4, "rank": 8}, r"Expected no `rank` for structure='blockshuffle'"),
    ({"structure": "lowrank", "rank": 8, "guide_fraction": 1.0}, r"Expected `guide_fraction` in \[0, 1\)"),
    ({"structure": "tt", "rank": 8}, r"Expected `structure` in \['lowrank', 'blockshuffle', 'blockdense'\]"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StructuredFFN(**kwargs)


@pytest.mark.parametrize("kwargs, message", [
    ({"structure": "lowrank", "rank": 32}, r"Expected `rank` < min\(in, out\) = 32 for model.blocks.0.mlp.fc1 "
                                           r"\(32 -> 64\), got rank=32"),
    ({"structure": "blockshuffle", "blocks": 3}, r"Expected `blocks` to divide the input size of "
                                                 r"model.blocks.0.mlp.fc1 \(32\), got blocks=3"),
    ({"structure": "blockdense", "rank": 6, "blocks": 4}, r"Expected `blocks` to divide the rank of "
                                                          r"model.blocks.0.mlp.fc1 \(6\)"),
    ({"structure": "lowrank", "rank": 4, "include": ["*ffn*"]}, r"No nn.Linear layer of ImageClassifier matches "
                                                                r"include=\['\*ffn\*'\].*model.blocks.0.attn.qkv"),
])
def test_shapes_that_do_not_fit_fail_before_training(kwargs, message):
    seen = []

    class Spy(Callback):
        def on_train_batch_start(self, *args):
            seen.append(1)

    with pytest.raises(ValueError, match=message):
        fit([StructuredFFN(**kwargs), Spy()], "vit", max_steps=2)
    assert not seen


def test_refuses_another_callback_on_the_replaced_layers():
    with pytest.raises(ValueError, match=r"StructuredFFN .* replaces model.blocks.0.mlp.fc1, whose weight "
                                         r"NMSparsity masks"):
        fit([NMSparsity(n=2, m=4, include=["*mlp*"]), StructuredFFN(rank=8, guide_fraction=0.0)], "vit")
    with pytest.raises(ValueError, match=r"StructuredPruning .*model.blocks.0.mlp.fc1's layers were replaced"):
        fit([StructuredPruning(structures=["mlp"], end=0.5), StructuredFFN(rank=8, guide_fraction=0.0)], "vit",
            max_steps=4)


def test_ddp_spawn_resume_across_the_drop(tmp_path):
    """A checkpoint written after the guides dropped restores into a fresh (unguided) model under
    two-process DDP and training continues to the same weights."""
    def run(ckpt_path=None, ckpt_dir=None):
        seeded(0)
        make_model, make_data = MODELS["gpt"]
        callbacks = [StructuredFFN("lowrank", rank=8, guide_fraction=0.25)]
        if ckpt_dir:
            callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=3, save_top_k=-1, filename="{step}"))
        trainer = make_trainer(strategy="ddp_spawn", devices=2, max_steps=6, callbacks=callbacks,
                               enable_checkpointing=ckpt_dir is not None)
        model = make_model()
        trainer.fit(model, datamodule=make_data(), ckpt_path=ckpt_path)
        return model

    full = run(ckpt_dir=tmp_path)
    resumed = run(ckpt_path=str(tmp_path / "step=3.ckpt"))  # the guides dropped at step 2
    full_state, resumed_state = full.state_dict(), resumed.state_dict()
    assert full_state.keys() == resumed_state.keys()
    assert max((full_state[k] - resumed_state[k]).abs().max().item() for k in full_state) <= 1e-6


def test_a_fresh_model_tests_a_structured_checkpoint(tmp_path):
    """`trainer.test(ckpt_path=...)` with the callback in the config: structured layers, and
    the guide when the checkpoint still has it."""
    from tests.helpers import text, tiny_gpt

    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    trainer, module = fit([StructuredFFN(rank=8, guide_fraction=0.9), checkpoint], "gpt", max_steps=4,
                          enable_checkpointing=True)
    expected = trainer.test(module, datamodule=trainer.datamodule, verbose=False)
    fresh = tiny_gpt()
    result = make_trainer(callbacks=[StructuredFFN(rank=8, guide_fraction=0.9)]).test(
        fresh, datamodule=text(), ckpt_path=str(tmp_path / "last.ckpt"), verbose=False)
    assert result == expected and fresh.model.blocks[0].mlp.fc1.guided
