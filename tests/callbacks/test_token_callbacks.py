"""TokenDrop, TokenMerge, TokenSkip: bad input, schedules, apply_in, and exact FLOP accounting."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback

from lit_eff.callbacks import FlopsMonitor, TokenDrop, TokenMerge, TokenSkip
from lit_eff.flops import flop_counter
from lit_eff.models.gpt import Block
from lit_eff.tokens.skip import TokenSkipping
from lit_eff.schedules import Linear
from tests.helpers import digits, make_trainer, seeded, text, tiny_cnn, tiny_gpt, tiny_vit


def _setup(callbacks, model):
    trainer = make_trainer(callbacks=callbacks, max_steps=1)
    for cb in callbacks:
        cb.setup(trainer, model, "fit")
    return trainer


@pytest.mark.parametrize("make, match", [
    (lambda: TokenDrop(blocks=[1], keep_ratios=[0.0]), r"Expected `keep_ratios` in \(0, 1\], got keep_ratios=0.0"),
    (lambda: TokenDrop(blocks=[1], keep_ratios=[1.5]), r"Expected `keep_ratios` in \(0, 1\]"),
    (lambda: TokenDrop(blocks=[1], keep_ratios=[Linear(1.0, 0.0)]), r"`keep_ratios` in \(0, 1\].*value 0.0"),
    (lambda: TokenDrop(blocks=[2, 1], keep_ratios=[0.5, 0.25]), "strictly increasing block indices"),
    (lambda: TokenDrop(blocks=[1, 2], keep_ratios=[0.5]), "one `keep_ratios` value per block"),
    (lambda: TokenDrop(score="entropy"), r"Expected `score` in \['attn', 'cosine', 'norm', 'random'\]"),
    (lambda: TokenSkip(keep=0), r"Expected `keep` in \(0, 1\], got keep=0"),
    (lambda: TokenSkip(method="mod", capacity=1.2), r"Expected `capacity` in \(0, 1\]"),
    (lambda: TokenSkip(blocks=[1, 1]), "strictly increasing"),
    (lambda: TokenMerge(r=-1), r"Expected `r` to be an integer >= 0, got r=-1"),
    (lambda: TokenMerge(variant="paper"), r"Expected `variant` in \['official', 'ordered'\], got variant='paper'"),
    (lambda: TokenMerge(blocks=[-1]), "strictly increasing block indices >= 0"),
])
def test_bad_arguments_fail_in_init(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_block_indices_out_of_range_fail_at_setup():
    with pytest.raises(ValueError, match=r"Expected `blocks` < 2 \(the model has 2 blocks, indices 0..1\), got blocks=\[1, 2\]"):
        _setup([TokenDrop(blocks=[1, 2], keep_ratios=[0.5, 0.25])], tiny_vit())
    with pytest.raises(ValueError, match=r"Expected `blocks` < 2"):
        _setup([TokenSkip(blocks=[5])], tiny_gpt())


def test_r_too_large_for_the_sequence_fails_at_setup():
    with pytest.raises(ValueError, match=r"Expected `r` <= 4 at block 1 \(8 patch tokens reach it\), got r=8"):
        _setup([TokenMerge(r=8)], tiny_vit())


def test_token_drop_and_merge_refuse_a_causal_language_model():
    with pytest.raises(ValueError, match="TokenDrop removes tokens for good.*use lit_eff.callbacks.TokenSkip"):
        _setup([TokenDrop()], tiny_gpt())
    with pytest.raises(ValueError, match="TokenMerge averages tokens.*TokenSkip"):
        _setup([TokenMerge(r=2)], tiny_gpt())


@pytest.mark.parametrize("callback", [TokenDrop(), TokenMerge(r=2), TokenSkip()])
def test_token_callbacks_refuse_a_model_without_tokens(callback):
    with pytest.raises(ValueError, match="Found no token sequence in ImageClassifier.*A CNN has no tokens"):
        _setup([callback], tiny_cnn())


def test_two_token_callbacks_on_the_same_blocks_are_refused():
    with pytest.raises(ValueError, match=r"TokenSkip \(trainer.callbacks\[0\]\) skips tokens in blocks \[1\], which "
                                         r"TokenDrop \(trainer.callbacks\[1\]\) drops tokens at too"):
        _setup([TokenSkip(blocks=[1]), TokenDrop(blocks=[1], keep_ratios=[0.5])], tiny_vit())
    with pytest.raises(ValueError, match="TokenDrop both change the token count"):
        _setup([TokenMerge(r=2, blocks=[1]), TokenDrop(blocks=[0], keep_ratios=[0.5])], tiny_vit())
    # disjoint blocks compose
    _setup([TokenSkip(blocks=[0]), TokenDrop(blocks=[1], keep_ratios=[0.5])], tiny_vit())


class CountStep(Callback):
    """FlopCounterMode (PyTorch's own counter) around each whole training batch: forward, backward, step."""

    def __init__(self):
        self.counts = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.counter = flop_counter()
        self.counter.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.counter.__exit__(None, None, None)
        self.counts.append(self.counter.get_total_flops())


@pytest.mark.parametrize("technique, model, data", [
    (lambda: TokenDrop(blocks=[1], keep_ratios=[0.25], score="attn"), tiny_vit, digits),
    (lambda: TokenMerge(r=4, apply_in="both"), tiny_vit, digits),
    (lambda: TokenSkip(method="ltd", blocks=[1], keep=0.5), tiny_gpt, text),
    (lambda: TokenSkip(method="mod", blocks=[0, 1], capacity=0.25), tiny_gpt, text),
])
def test_flops_monitor_counts_the_reduced_step_exactly(technique, model, data):
    def run(*extra):
        seeded(0)
        monitor, counter = FlopsMonitor(), CountStep()
        trainer = make_trainer(callbacks=[*extra, monitor, counter], max_steps=2, limit_val_batches=0)
        trainer.fit(model(), datamodule=data())
        return monitor, counter

    monitor, counter = run(technique())
    assert monitor.last_step_executed == counter.counts[-1] > 0
    dense, _ = run()
    assert monitor.last_step_executed < dense.last_step_executed  # the work really shrank


def test_keep_follows_a_schedule_of_the_optimizer_step():
    seeded(0)
    skip = TokenSkip(method="ltd", blocks=[1], keep=Linear(0.25, 1.0, start_step=0, end_step=3))
    model, seen = tiny_gpt(), []
    model.model.blocks[1].attn.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
    trainer = make_trainer(callbacks=[skip], max_steps=4, limit_val_batches=0)
    trainer.fit(model, datamodule=text())
    assert seen == [8, 16, 24, 32]  # tokens block 1 ran on, of 32
    assert skip.state_dict()["layer_tokens"] == 8 * (4 * 32 + 8 + 16 + 24 + 32)  # batch 8: block 0 and block 1


def test_apply_in_train_leaves_evaluation_dense():
    seeded(0)
    model = tiny_vit()
    drop = TokenDrop(blocks=[0], keep_ratios=[0.25], score="cosine", apply_in="train")
    _setup([drop], model)
    x = torch.randn(2, 1, 8, 8)
    model.eval()
    evaluated = model(x)
    drop.detach()
    assert torch.equal(model(x), evaluated)
    drop = TokenDrop(blocks=[0], keep_ratios=[0.25], score="cosine", apply_in="eval")
    _setup([drop], model)
    assert not torch.allclose(model(x), evaluated)
    drop.detach()


def test_mod_stays_attached_after_fit_and_follows_a_new_model():
    seeded(0)
    skip = TokenSkip(method="mod", blocks=[1], capacity=0.25)
    first = tiny_gpt()
    make_trainer(callbacks=[skip], max_steps=1, limit_val_batches=0).fit(first, datamodule=text())
    assert isinstance(first.model.blocks[1], TokenSkipping)  # the routing is part of the trained model
    second = tiny_gpt()
    _setup([skip], second)
    assert skip.machinery.adapter.model is second.model and type(first.model.blocks[1]) is Block
    skip.detach()


class Compiles(Callback):
    def __init__(self):
        self.per_batch = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before = torch._dynamo.utils.counters["stats"]["unique_graphs"]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.per_batch.append(torch._dynamo.utils.counters["stats"]["unique_graphs"] - self.before)


def test_a_keep_schedule_compiles_once_per_phase_and_counts_flops_as_eager():
    from lit_eff.schedules import Step

    def run(compiled):
        seeded(0)
        drop = TokenDrop(blocks=[1], keep_ratios=[Step([1.0, 0.5], milestones=[3])], score="random")
        monitor, compiles, model = FlopsMonitor(), Compiles(), tiny_vit()
        trainer = make_trainer(callbacks=[drop, monitor, compiles], max_steps=5, limit_val_batches=0)
        torch._dynamo.reset()
        trainer.fit(torch.compile(model, backend="aot_eager") if compiled else model, datamodule=digits())
        torch._dynamo.reset()
        return monitor, compiles, {k: v.detach().clone() for k, v in model.state_dict().items()}

    eager, _, eager_weights = run(False)
    compiled, compiles, weights = run(True)
    assert compiled.total_executed == eager.total_executed
    # FlopsMonitor counts batch 0 eagerly and batch 1 compiles; the keep ratio changes at step 3,
    # which FlopsMonitor counts eagerly too: one compile at batch 4, none after
    assert [i for i, built in enumerate(compiles.per_batch) if built] == [1, 4]
    assert all(torch.allclose(weights[k], eager_weights[k], atol=1e-5) for k in weights)


def test_checkpoint_wrapper_keeps_results_and_token_counts():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    def run(wrap):
        seeded(0)
        merge, model = TokenMerge(r=4, apply_in="both"), tiny_vit()
        if wrap:
            blocks = set(model.model.blocks)
            apply_activation_checkpointing(model.model, check_fn=lambda m: m in blocks)
        trainer = make_trainer(callbacks=[merge], max_steps=2, limit_val_batches=0)
        trainer.fit(model, datamodule=digits())
        return merge.state_dict(), {k.replace("._checkpoint_wrapped_module", ""): v for k, v in model.state_dict().items()}

    (plain_state, plain_weights), (state, weights) = run(False), run(True)
    assert state == plain_state and state["layer_tokens"] == 2 * 32 * (17 + 13)
    assert weights.keys() == plain_weights.keys()
    assert all(torch.allclose(weights[k], plain_weights[k], atol=1e-6) for k in weights)
