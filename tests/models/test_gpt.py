import math

import pytest
import torch

from lit_eff.models import GPT
from tests.helpers import make_trainer, mean_val_loss, seeded, text, tiny_gpt


def test_gpt_is_causal_and_ties_embeddings():
    seeded()
    gpt = GPT(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16)
    assert gpt.head.weight is gpt.wte.weight
    assert isinstance(gpt.blocks, torch.nn.ModuleList) and len(gpt.blocks) == 2
    idx = torch.randint(0, 50, (2, 16))
    changed = idx.clone()
    changed[:, 9:] = (changed[:, 9:] + 1) % 50
    a, b = gpt(idx), gpt(changed)
    assert a.shape == (2, 16, 50)
    assert torch.allclose(a[:, :9], b[:, :9], atol=1e-6), "a future token changed a past output"
    assert not torch.allclose(a[:, 9:], b[:, 9:])


def test_gpt_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"Expected `n_head` to divide `n_embd`, got n_embd=30, n_head=4"):
        GPT(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match=r"Expected `block_size` > 0, got block_size=0"):
        GPT(block_size=0)
    gpt = GPT(vocab_size=10, block_size=8, n_layer=1, n_head=1, n_embd=8)
    with pytest.raises(ValueError, match="at most block_size=8 tokens, got 9"):
        gpt(torch.zeros(1, 9, dtype=torch.long))


def test_causal_lm_learns_and_generates():
    seeded()
    model, dm = tiny_gpt(lr=3e-3), text(batch_size=16)
    before = mean_val_loss(model, dm, lambda m, b: m.loss(b)) / math.log(2)
    trainer = make_trainer(max_steps=40, limit_train_batches=40, limit_val_batches=None, val_check_interval=40)
    trainer.fit(model, datamodule=dm)
    after = trainer.callback_metrics["val/bpb"].item()
    assert before > 7.5, "an untrained byte model is near uniform (8 bits per byte)"
    assert after < before - 2.0, f"val/bpb did not fall: {before} -> {after}"
    # the logged value weights batches by token count; this mean weights batches equally
    assert after == pytest.approx(mean_val_loss(model, dm, lambda m, b: m.loss(b)) / math.log(2), rel=3e-3)
    assert trainer.callback_metrics["val/ppl"].item() == pytest.approx(2 ** after, rel=1e-3)
    sample = model.generate("The ", max_new_tokens=20, seed=1)
    assert isinstance(sample, str) and len(sample.encode("utf-8", "replace")) >= 10
    assert sample == model.generate("The ", max_new_tokens=20, seed=1)
    with pytest.raises(ValueError, match=r"Expected `temperature` > 0"):
        model.generate(temperature=0)
