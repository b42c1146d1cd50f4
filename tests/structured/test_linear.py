"""Structured layers against re-derivations of the official StructuredFFN code (Wei et al.,
CLAIRE-Labo/StructuredFFN): SVD initialisation, the block-shuffle and block-dense products,
orthogonal blocks, self-guided mixing, the cosine/linear guide schedules, dense equivalents."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lit_eff.flops import count_flops
from lit_eff.structured import (BlockDenseLinear, BlockShuffleLinear, LowRankLinear, find_linears, guide_alpha,
                                structure_linears, to_linear, to_plain_linears)


def official_block_shuffle(x, w1, w2):
    """The official ``block_shuffle_einsum`` (Monarch order), rewritten without einops."""
    batch_shape, h = x.shape[:-1], x.shape[-1]
    k, q, p = w1.shape
    l, s, r = w2.shape
    out1 = torch.einsum("kqp,bkp->bkq", w1, x.reshape(-1, k, p))
    out1 = out1.reshape(-1, k * q).reshape(-1, r, l).transpose(1, 2)  # "b (r l) -> b l r"
    return torch.einsum("lsr,blr->bsl", w2, out1).reshape(*batch_shape, s * l)


def official_block_dense(x, blkdiag, linear):
    batch_shape = x.shape[:-1]
    k, q, p = blkdiag.shape
    out1 = torch.einsum("kqp,bkp->bkq", blkdiag, x.reshape(-1, k, p)).reshape(-1, k * q)
    return (out1 @ linear.t()).reshape(*batch_shape, linear.shape[0])


def test_low_rank_from_svd_splits_the_best_rank_r_approximation():
    torch.manual_seed(0)
    dense = nn.Linear(24, 40)
    layer = LowRankLinear.from_linear(dense, rank=6)
    u, s, vh = torch.linalg.svd(dense.weight.detach(), full_matrices=False)
    # official post_init "svd": lr1 = sqrt(S_r) Vh_r, lr2 = U_r sqrt(S_r)
    assert torch.allclose(layer.v, torch.diag(s[:6].sqrt()) @ vh[:6], atol=1e-6)
    assert torch.allclose(layer.u, u[:, :6] @ torch.diag(s[:6].sqrt()), atol=1e-6)
    assert torch.allclose(layer.u @ layer.v, u[:, :6] @ torch.diag(s[:6]) @ vh[:6], atol=1e-5)
    assert torch.equal(layer.bias, dense.bias)
    x = torch.randn(3, 5, 24)
    assert torch.allclose(layer(x), x @ (layer.u @ layer.v).t() + dense.bias, atol=1e-5)


def test_block_shuffle_matches_the_official_product_and_has_orthogonal_blocks():
    gen = torch.Generator().manual_seed(1)
    for n_in, n_out in ((32, 64), (64, 32)):
        layer = BlockShuffleLinear(n_in, n_out, blocks=4, generator=gen)
        p, s = n_in // 4, n_out // 4
        q = p if n_in < n_out else s
        assert layer.w1.shape == (4, q, p) and layer.w2.shape == (4, s, q)
        x = torch.randn(2, 7, n_in)
        assert torch.allclose(layer.structured(x), official_block_shuffle(x, layer.w1, layer.w2), atol=1e-5)
        for w in (layer.w1, layer.w2):  # "ortho": every block is U Vᴴ (orthonormal rows or columns)
            gram = w @ w.transpose(1, 2) if w.shape[1] <= w.shape[2] else w.transpose(1, 2) @ w
            assert torch.allclose(gram, torch.eye(gram.shape[-1]).expand_as(gram), atol=1e-5)
        # the shuffle mixes blocks: the dense equivalent is not block-diagonal
        assert (layer.structured_weight()[: s, p:] != 0).any()


def test_block_dense_matches_the_official_product():
    layer = BlockDenseLinear(32, 48, rank=16, blocks=4, generator=torch.Generator().manual_seed(2))
    assert layer.w1.shape == (4, 4, 8) and layer.w2.shape == (48, 16)
    x = torch.randn(3, 32)
    assert torch.allclose(layer.structured(x), official_block_dense(x, layer.w1, layer.w2), atol=1e-5)


@pytest.mark.parametrize("make", [lambda: LowRankLinear(16, 32, 4), lambda: BlockShuffleLinear(16, 32, 4),
                                  lambda: BlockDenseLinear(16, 32, 8, 2)])
def test_guided_output_mixes_dense_and_structured(make):
    torch.manual_seed(0)
    layer = make()
    nn.init.normal_(layer.bias)
    x = torch.randn(4, 16)
    before = layer(x)
    layer.add_guide()
    assert torch.allclose(layer(x), before, atol=1e-5)  # the guide starts as the structured map
    with torch.no_grad():
        layer.guide.add_(torch.randn_like(layer.guide))
        layer.alpha.fill_(0.3)
    expected = 0.3 * x @ layer.guide.t() + 0.7 * layer.structured(x) + layer.bias
    assert torch.allclose(layer(x), expected, atol=1e-5)
    assert torch.allclose(to_linear(layer)(x), expected, atol=1e-5)  # the dense equivalent, guide mixed in
    layer.drop_guide()
    assert layer.guide is None and "alpha" not in dict(layer.named_buffers())
    assert torch.allclose(layer(x), before, atol=1e-5)


def test_guide_schedules_match_the_official_decays():
    steps = 10
    for t in range(14):
        cosine = 0.5 * (1 + math.cos(t / steps * math.pi)) if t <= steps else 0.0
        linear = max(0.0, 1 - t / steps)
        assert guide_alpha(t, steps, "cosine") == pytest.approx(cosine if t < steps else 0.0, abs=1e-12)
        assert guide_alpha(t, steps, "linear") == pytest.approx(linear, abs=1e-12)
    assert guide_alpha(0, steps) == 1.0


def test_structured_layers_cost_fewer_flops_counted_from_their_shapes():
    x = torch.randn(8, 10, 64)
    dense = count_flops(lambda: nn.Linear(64, 256)(x)).forward
    assert dense == 2 * 80 * 64 * 256
    low_rank, shuffle = LowRankLinear(64, 256, 16), BlockShuffleLinear(64, 256, 4)
    assert count_flops(lambda: low_rank(x)).forward == 2 * 80 * 16 * (64 + 256)
    # block shuffle 64 -> 256, 4 blocks: w1 4 x 16 x 16, w2 4 x 64 x 16
    assert count_flops(lambda: shuffle(x)).forward == 2 * 80 * 4 * 16 * (16 + 64)
    guided = LowRankLinear(64, 256, 16)
    guided.add_guide()
    assert count_flops(lambda: guided(x)).forward == dense + 2 * 80 * 16 * (64 + 256)


def test_structure_linears_targets_the_mlp_and_converts_back():
    from tests.helpers import tiny_gpt

    torch.manual_seed(0)
    model = tiny_gpt().model
    x = torch.randint(0, 256, (2, 16))
    layers = structure_linears(model, find_linears(model), "lowrank", rank=0.25, guided=True)
    assert sorted(layers) == ["blocks.0.mlp.fc1", "blocks.0.mlp.fc2", "blocks.1.mlp.fc1", "blocks.1.mlp.fc2"]
    assert all(layer.rank == 8 for layer in layers.values())  # a quarter of min(32, 128)
    out = model(x)
    to_plain_linears(model)
    assert isinstance(model.blocks[0].mlp.fc1, nn.Linear) and torch.allclose(model(x), out, atol=1e-5)
