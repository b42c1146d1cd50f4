"""DεpS shrink start: sorting MLP units and heads by importance keeps the full model's function,
carries the optimizer state along, and runs once inside a DelayedShrinking fit."""

import copy

import pytest
import torch

import lit_eff.supernet.module as supernet_module
from lit_eff.supernet import DelayedShrinking, ElasticGPT, ElasticViT
from lit_eff.supernet.reorganize import reorganize_middle_weights
from tests.helpers import digits, make_trainer, seeded
from tests.supernet.common import TINY_SPACE, tiny_supernet


def tiny(arch):
    seeded(0)
    if arch == "vit":
        return ElasticViT(TINY_SPACE), torch.randn(4, 1, 8, 8)
    return ElasticGPT(TINY_SPACE, block_size=16), torch.randint(0, 256, (2, 16))


def scramble(model):
    """Give the units clearly different importances (a fresh init has nearly equal ones)."""
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(torch.rand_like(p) * 4)


@pytest.mark.parametrize("arch", ["vit", "gpt"])
def test_full_model_unchanged_and_units_sorted(arch):
    model, x = tiny(arch)
    scramble(model)
    before = model(x)
    old = copy.deepcopy(model)
    reorganize_middle_weights(model)
    assert (model(x) - before).abs().max() <= 1e-5
    for block, old_block in zip(model.blocks, old.blocks):
        mlp = block.mlp.fc2.weight.abs().sum(0)
        assert (mlp[:-1] >= mlp[1:]).all()
        heads = block.attn.proj.weight.abs().reshape(block.attn.proj.weight.shape[0], block.max_heads, -1).sum((0, 2))
        assert (heads[:-1] >= heads[1:]).all()
        assert not torch.equal(block.mlp.fc1.weight, old_block.mlp.fc1.weight)  # something moved
    small = model.space.min()
    model.subnet = old.subnet = small
    assert (model(x) - old(x)).abs().max() > 1e-3  # the smallest subnet now keeps other units


def adamw_steps(model, x, steps, reorganize_after=None):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    for i in range(steps):
        if i == reorganize_after:
            reorganize_middle_weights(model, opt)
        opt.zero_grad()
        model(x).float().pow(2).mean().backward()
        opt.step()
    return opt


@pytest.mark.parametrize("arch", ["vit", "gpt"])
def test_optimizer_state_moves_with_the_weights(arch):
    """Reorganizing between AdamW steps gives the same function as not reorganizing: the moments
    were permuted with the weights. Without them the check fails (second case)."""
    model, x = tiny(arch)
    scramble(model)
    plain, reorganized, stale = model, copy.deepcopy(model), copy.deepcopy(model)
    adamw_steps(plain, x, 4)
    adamw_steps(reorganized, x, 4, reorganize_after=2)
    with torch.no_grad():
        assert (plain(x) - reorganized(x)).abs().max() <= 1e-5
    opt = adamw_steps(stale, x, 2)
    reorganize_middle_weights(stale)  # weights only: the moments now belong to other units
    for _ in range(2):
        opt.zero_grad()
        stale(x).float().pow(2).mean().backward()
        opt.step()
    with torch.no_grad():
        assert (plain(x) - stale(x)).abs().max() > 1e-4


@pytest.mark.parametrize("reorganize", [True, False])
def test_delayed_shrinking_reorganizes_once_at_the_shrink_start(reorganize, monkeypatch):
    calls = []

    def spy(model, optimizer=None):
        calls.append((module.global_step, optimizer))
        reorganize_middle_weights(model, optimizer)

    monkeypatch.setattr(supernet_module, "reorganize_middle_weights", spy)
    seeded(0)
    sampler = DelayedShrinking(start_fraction=0.5, warmup_fraction=0.25, k=1, reorganize=reorganize)
    module = tiny_supernet("vit", sampler=sampler)
    trainer = make_trainer(max_steps=8, accumulate_grad_batches=2)
    trainer.fit(module, datamodule=digits())
    if reorganize:
        assert calls == [(4, trainer.optimizers[0])]
    else:
        assert calls == []


def test_reorganize_flag_is_checked():
    with pytest.raises(ValueError, match=r"Expected `reorganize` to be true or false, got reorganize='yes'"):
        DelayedShrinking(reorganize="yes")


def test_strategy_checks():
    """FSDP1 is refused (FSDP2, ModelParallelStrategy, is supported: tests/supernet/test_fsdp2.py).
    Checked against a stand-in trainer: Lightning's FSDP1 needs a GPU."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    module = tiny_supernet("vit", sampler=DelayedShrinking())
    module._trainer = SimpleNamespace(strategy=FSDPStrategy(), callbacks=[])
    with pytest.raises(ValueError, match=r"SupernetModule runs on a single device, DDP or FSDP2 "
                                         r"\(ModelParallelStrategy\), got strategy FSDPStrategy"):
        module.setup("fit")
    module._trainer = SimpleNamespace(strategy=ModelParallelStrategy(), callbacks=[])
    module.setup("fit")  # reorganization included
