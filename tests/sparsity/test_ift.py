"""Sparse-IFT transformations: the shapes they give the MLPs, the function a parallel layer computes,
the structure a state dict restores, and bad arguments refused with a clear message."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lit_eff.models import GPT
from lit_eff.sparsity.ift import ParallelLinear, branch_count, ift_linears, restore_structure, sparse_ift
from tests.helpers import tiny_vit


def test_wide_multiplies_the_mlp_hidden_width_and_keeps_d_model():
    model = tiny_vit().model  # embed 32, MLP hidden 64
    layers = sparse_ift(model, "wide", 0.75)
    assert sorted(layers) == [f"blocks.{i}.mlp.{fc}" for i in (0, 1) for fc in ("fc1", "fc2")]
    for block in model.blocks:
        assert (block.mlp.fc1.in_features, block.mlp.fc1.out_features) == (32, 256)
        assert (block.mlp.fc2.in_features, block.mlp.fc2.out_features) == (256, 32)
        assert block.attn.qkv.weight.shape == (96, 32)  # attention untouched
    # each new Linear holds 1 / (1 - s) = 4 times the weights: at density 0.25 the dense count
    assert all(layer.weight.numel() == 4 * 32 * 64 for layer in layers.values())
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_new_weights_keep_the_replaced_layers_std_and_are_seeded():
    def build(seed):
        torch.manual_seed(0)  # the same model; only the transformation's generator changes
        model = GPT(n_layer=1, n_embd=32, n_head=2)
        old_std = model.blocks[0].mlp.fc1.weight.std().item()
        sparse_ift(model, "wide", 0.5, generator_for=lambda name: torch.Generator().manual_seed(seed))
        return model, old_std

    (a, std), (b, _), (c, _) = build(0), build(0), build(1)
    new = a.blocks[0].mlp.fc1.weight
    assert new.std().item() == pytest.approx(std, rel=0.05)
    assert torch.equal(new, b.blocks[0].mlp.fc1.weight) and not torch.equal(new, c.blocks[0].mlp.fc1.weight)


def test_parallel_sums_its_branches_plus_one_bias():
    model = GPT(n_layer=1, n_embd=32, n_head=2)
    layers = sparse_ift(model, "parallel", 0.75)
    fc1 = model.blocks[0].mlp.fc1
    assert isinstance(fc1, ParallelLinear) and len(fc1.branches) == branch_count(0.75) == 4
    assert all(b.weight.shape == (128, 32) and b.bias is None for b in fc1.branches)
    x = torch.randn(3, 32)
    expected = sum(x @ b.weight.T for b in fc1.branches) + fc1.bias
    torch.testing.assert_close(fc1(x), expected)
    assert sorted(ift_linears(layers)) == [f"blocks.0.mlp.{fc}.branches.{i}" for fc in ("fc1", "fc2") for i in range(4)]


@pytest.mark.parametrize("transform", ["wide", "parallel"])
def test_a_state_dict_restores_the_transformed_structure(transform):
    source = tiny_vit()
    sparse_ift(source.model, transform, 0.5)
    target = tiny_vit()  # the constructor's dense structure; the kit module's pre-hook restores
    target.load_state_dict(source.state_dict())
    assert str(target.model) == str(source.model)
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(target(x), source(x))


def test_plain_module_with_the_hook_registered():
    source = GPT(n_layer=1, n_embd=32, n_head=2)
    sparse_ift(source, "wide", 0.5)
    target = GPT(n_layer=1, n_embd=32, n_head=2)
    target.register_load_state_dict_pre_hook(restore_structure)
    target.load_state_dict(source.state_dict())
    assert target.blocks[0].mlp.fc1.out_features == 256


@pytest.mark.parametrize("kwargs, match", [
    ({"transform": "deep", "sparsity": 0.5}, r"`transform`.*wide.*parallel.*'deep'"),
    ({"transform": "wide", "sparsity": 0.0}, r"`sparsity`.*0\.0"),
    ({"transform": "wide", "sparsity": 1.0}, r"`sparsity`.*1\.0"),
    ({"transform": "wide", "sparsity": -0.5}, r"`sparsity`.*-0\.5"),
    ({"transform": "parallel", "sparsity": 0.6}, r"1 / \(1 - sparsity\) a whole number.*sparsity=0\.6.*2\.5"),
    ({"transform": "wide", "sparsity": 0.5, "include": ["*nothing*"]},
     r"No linear layer matched include=\[.\*nothing\*.\].*blocks.0.mlp.fc1"),
    ({"transform": "wide", "sparsity": 0.5, "include": ["*blocks.*.attn.qkv"]},
     r"`blocks.0.attn.qkv` is not the fc1/fc2"),
    ({"transform": "wide", "sparsity": 0.5, "include": ["*blocks.*.mlp.fc1"]}, r"`blocks.0.mlp.fc2` did not"),
])
def test_bad_arguments_are_refused_before_changing_the_model(kwargs, match):
    model = GPT(n_layer=1, n_embd=32, n_head=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        sparse_ift(model, **kwargs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_transforming_twice_is_refused():
    model = GPT(n_layer=1, n_embd=32, n_head=2)
    sparse_ift(model, "parallel", 0.5, include=["*mlp.fc1"])
    with pytest.raises(ValueError, match=r"`blocks.0.mlp.fc1` is already Sparse-IFT transformed \(parallel x2\)"):
        sparse_ift(model, "wide", 0.5)


def test_a_normalized_hidden_width_is_refused_for_wide():
    class NormMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.norm, self.fc2 = nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 4)

    model = nn.Module()
    model.blocks = nn.ModuleList([nn.Module()])
    model.blocks[0].mlp = NormMLP()
    with pytest.raises(ValueError, match=r"norm.*LayerNorm.*transform='parallel'"):
        sparse_ift(model, "wide", 0.5)
