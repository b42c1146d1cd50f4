"""Token dropping and merging on tiny timm ViTs: real removal, scores, ToMe's exactness properties."""

from __future__ import annotations

import pytest
import torch
from timm.models.eva import Eva

from lit_eff.tokens import attach_drop, attach_merge, bipartite_merge, find_adapter, score_tokens
from lit_eff.tokens.select import cls_attention
from tests.helpers import tiny_cnn, tiny_gpt, tiny_vit


def _vit(**kwargs):
    torch.manual_seed(0)
    return tiny_vit(**kwargs).model.eval()


def _record_shapes(model):
    """Shapes of the tokens each block computes on (what its attention sees) and of the final norm's output."""
    shapes = []
    adapter = find_adapter(model)
    hooks = [b.attn.register_forward_pre_hook(lambda m, a: shapes.append(tuple(a[0].shape))) for b in adapter.blocks]
    hooks.append(model.norm.register_forward_hook(lambda m, a, out: shapes.append(tuple(out.shape))))
    return shapes, hooks


def test_adapters_find_vit_gpt_and_modulelist_families():
    vit = find_adapter(tiny_vit())
    assert (vit.family, vit.depth, vit.num_prefix_tokens, vit.class_token, vit.num_patches) == ("timm_vit", 2, 1, 0, 16)
    gpt = find_adapter(tiny_gpt())
    assert gpt.causal and gpt.family == "gpt" and gpt.num_prefix_tokens == 0
    eva = Eva(img_size=8, patch_size=2, embed_dim=32, depth=2, num_heads=2, use_rot_pos_emb=False, num_classes=10,
              in_chans=1)
    assert isinstance(eva.blocks, torch.nn.ModuleList) and find_adapter(eva).depth == 2
    with pytest.raises(ValueError, match="no module has `blocks`.*A CNN has no tokens"):
        find_adapter(tiny_cnn())
    rope = Eva(img_size=8, patch_size=2, embed_dim=32, depth=2, num_heads=2, use_rot_pos_emb=True, in_chans=1)
    with pytest.raises(ValueError, match="rotary position embeddings"):
        find_adapter(rope)


@pytest.mark.parametrize("score", ["attn", "cosine", "norm", "random"])
def test_drop_physically_removes_tokens_for_later_blocks_norm_and_pooling(score):
    model = _vit()
    x = torch.randn(3, 1, 8, 8)
    dropper = attach_drop(model, blocks=[1], ratios=[0.25], score=score)
    shapes, hooks = _record_shapes(model)
    out = model(x)
    assert shapes == [(3, 17, 32), (3, 1 + 4, 32), (3, 5, 32)]  # block 0, block 1, final norm
    assert out.shape == (3, 10) and dropper.lengths(17) == [17, 5]
    for h in hooks:
        h.remove()
    dropper.remove()
    shapes, hooks = _record_shapes(model)
    model(x)
    assert shapes[1] == (3, 17, 32)  # removed: a plain model again


def test_drop_on_eva_modulelist_blocks_with_keyword_arguments():
    torch.manual_seed(0)
    eva = Eva(img_size=8, patch_size=2, embed_dim=32, depth=2, num_heads=2, use_rot_pos_emb=False, num_classes=10,
              in_chans=1).eval()
    dropper = attach_drop(eva, blocks=[1], ratios=[0.5], score="cosine")
    shapes, _ = _record_shapes(eva)
    eva(torch.randn(2, 1, 8, 8))
    assert shapes[1] == (2, 9, 32)
    dropper.remove()


def test_cls_attention_score_equals_the_blocks_real_attention_row():
    model = _vit()
    block = model.blocks[1]
    x = torch.randn(2, 17, 32)
    h = block.norm1(x)
    q, k, _ = block.attn.qkv(h).reshape(2, 17, 3, 2, 16).permute(2, 0, 3, 1, 4)
    reference = ((q @ k.transpose(-2, -1)) * 16 ** -0.5).softmax(-1)[:, :, 0].mean(1)
    assert torch.allclose(cls_attention(block, x, 0), reference, atol=1e-6)


def test_kept_tokens_are_the_top_scored_in_original_order_and_prefix_stays():
    model = _vit()
    x = torch.randn(2, 17, 32)
    captured = []
    dropper = attach_drop(model, blocks=[1], ratios=[0.5], score="norm")
    model.blocks[1].norm1.register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    model.blocks[1](x)
    kept = captured[0]
    expected = x[:, 1:].norm(dim=-1).topk(8, dim=1).indices.sort(dim=1).values + 1
    assert torch.equal(kept[:, 0], x[:, 0])
    assert torch.equal(kept[:, 1:], x.gather(1, expected.unsqueeze(-1).expand(-1, -1, 32)))
    dropper.remove()


def test_random_scores_depend_on_keys_only():
    x = torch.randn(2, 17, 32)
    from lit_eff.seeding import generator

    a = score_tokens("random", x, generator=generator(0, 5, 0, "token_drop", 1))
    b = score_tokens("random", x + 1, generator=generator(0, 5, 0, "token_drop", 1))
    c = score_tokens("random", x, generator=generator(0, 6, 0, "token_drop", 1))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("variant", ["official", "ordered"])
def test_bipartite_merge_conserves_size_weighted_mass_and_keeps_prefix(variant):
    torch.manual_seed(0)
    x, metric = torch.randn(2, 1 + 10, 4), torch.randn(2, 11, 3)
    size = torch.randint(1, 4, (2, 11, 1)).float()
    merged, new_size = bipartite_merge(x, size, metric, r=3, prefix=1, variant=variant)
    assert merged.shape == (2, 8, 4) and new_size.shape == (2, 8, 1)
    assert torch.equal(merged[:, 0], x[:, 0]) and torch.equal(new_size[:, 0], size[:, 0])
    assert torch.allclose((merged * new_size)[:, 1:].sum(1), (x * size)[:, 1:].sum(1), atol=1e-5)
    assert torch.equal(new_size.sum(1), size.sum(1))


def test_merge_with_r_zero_is_the_dense_model_and_r_shrinks_every_block():
    model = _vit()
    x = torch.randn(3, 1, 8, 8)
    dense = model(x)
    merger = attach_merge(model, r=[0, 0])
    assert torch.allclose(model(x), dense, atol=1e-6)
    merger.remove()
    merger = attach_merge(model, r=4)
    shapes, _ = _record_shapes(model)
    model(x)
    assert [s[1] for s in shapes] == [17, 13, 9] and merger.lengths(17) == [17, 13] and merger.tokens_out(17) == 9
    merger.remove()
    assert torch.allclose(model(x), dense, atol=1e-6)


@pytest.mark.parametrize("fused", [True, False])
def test_proportional_attention_makes_merged_duplicates_exact(fused):
    """Duplicated tokens merged into one of size 2 must attend like the two originals (ToMe's
    log(size) bias), on timm's fused SDPA path and on its explicit path."""
    model = _vit()
    for block in model.blocks:
        block.attn.fused_attn = fused
    torch.manual_seed(1)
    pairs = torch.randn(2, 8, 32)
    x = torch.cat([torch.randn(2, 1, 32), pairs.repeat_interleave(2, dim=1)], dim=1)  # a_k == b_k
    dense = model.blocks[1](model.blocks[0](x))
    merger = attach_merge(model, r=[8, 0])
    merged = model.blocks[1](model.blocks[0](x))
    assert merged.shape == (2, 9, 32)
    assert torch.allclose(merged[:, 0], dense[:, 0], atol=1e-5)  # the class token saw the same attention
    assert torch.allclose(merged[:, 1:].sort(1).values, dense[:, 1::2].sort(1).values, atol=1e-5)
    merger.remove()


def test_merge_average_pooling_is_size_weighted():
    model = _vit()
    x = torch.randn(2, 1, 8, 8)
    merger = attach_merge(model, r=[8, 0])
    pooled = []
    model.fc_norm.register_forward_pre_hook(lambda m, a: pooled.append(a[0]))
    tokens = []
    model.norm.register_forward_pre_hook(lambda m, a: tokens.append(a[0]))
    model(x)
    size = model.blocks[1]._token_merge.size_out
    expected = (tokens[0][:, 1:] * size[:, 1:]).sum(1) / size[:, 1:].sum(1)
    assert torch.allclose(pooled[0], expected, atol=1e-6)
    merger.remove()


def test_merge_refuses_r_larger_than_half_the_tokens():
    with pytest.raises(ValueError, match=r"Expected `r` <= 6 at block 1 \(12 patch tokens reach it\), got r=7"):
        attach_merge(_vit(), r=[4, 7])
    model = _vit()
    model.patch_embed.num_patches = None  # an input size the model does not fix: checked in forward
    attach_merge(model, r=[4, 7])
    with pytest.raises(ValueError, match=r"Expected `r` <= 6 \(12 patch tokens reach the block\), got r=7"):
        model(torch.randn(1, 1, 8, 8))


def test_query_token_is_the_mean_for_average_pooling_and_the_class_token_otherwise():
    assert attach_drop(_vit(), [1], [0.5]).query_token is None  # the tiny ViT pools by averaging
    assert attach_drop(_vit(), [1], [0.5], query="cls").query_token == 0
    from timm import create_model

    token_pooled = create_model("vit_tiny_patch16_224", img_size=8, patch_size=2, embed_dim=32, depth=2,
                                num_heads=2, in_chans=1, num_classes=10, global_pool="token")
    assert attach_drop(token_pooled, [1], [0.5]).query_token == 0
    with pytest.raises(ValueError, match=r"Expected `query` in \['auto', 'cls', 'mean'\], got query='first'"):
        attach_drop(_vit(), [1], [0.5], query="first")
