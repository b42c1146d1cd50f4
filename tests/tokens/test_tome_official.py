"""TokenMerge equals the official ToMe algorithm on timm ViTs.

The reference below is written from the official algorithm (bipartite soft matching over the
whole sequence, the class token in set A with its scores at -inf, a distillation token in B never
receiving a merge, size-weighted merging, proportional attention computed explicitly, and the
size-weighted average pooling of ToMe's patch for average-pooled models). It does not call the kit.
"""

from __future__ import annotations

import math

import pytest
import timm
import torch

from lit_eff.tokens import attach_merge


def reference_matching(metric, r, class_token, distill_token):
    """The official bipartite soft matching: returns the merge function (sum mode)."""
    protected = int(class_token) + int(distill_token)
    r = min(r, (metric.shape[1] - protected) // 2)
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[..., ::2, :], metric[..., 1::2, :]
        scores = a @ b.transpose(-1, -2)
        if class_token:
            scores[..., 0, :] = -math.inf
        if distill_token:
            scores[..., :, 0] = -math.inf
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
        unm_idx, src_idx = edge_idx[..., r:, :], edge_idx[..., :r, :]
        dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
        if class_token:
            unm_idx = unm_idx.sort(dim=1)[0]

    def merge(x):
        src, dst = x[..., ::2, :], x[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce="sum")
        if distill_token:
            return torch.cat([unm[:, :1], dst[:, :1], unm[:, 1:], dst[:, 1:]], dim=1)
        return torch.cat([unm, dst], dim=1)

    return merge


def reference_merge_wavg(merge, x, size):
    if size is None:
        size = torch.ones_like(x[..., 0, None])
    x = merge(x * size)
    size = merge(size)
    return x / size, size


def reference_attention(attn, x, size):
    """Attention with proportional attention, returning the keys averaged over heads."""
    b, n, c = x.shape
    qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    logits = (q @ k.transpose(-2, -1)) * attn.scale
    if size is not None:
        logits = logits + size.log()[:, None, None, :, 0]
    x = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c)
    return attn.proj(x), k.mean(1)


def reference_forward(model, images, r: int):
    """The timm ViT forward with ToMe merging ``r`` tokens in every block."""
    class_token = model.cls_token is not None
    distill_token = getattr(model, "dist_token", None) is not None
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    patches = model.patch_embed.num_patches
    size = None
    for block in model.blocks:
        x_attn, metric = reference_attention(block.attn, block.norm1(x), size)
        x = x + block.drop_path1(x_attn)
        merge = reference_matching(metric, r, class_token, distill_token)
        x, size = reference_merge_wavg(merge, x, size)
        x = x + block.drop_path2(block.mlp(block.norm2(x)))
    x = model.norm(x)
    if model.global_pool != "avg":
        return model.forward_head(x)
    prefix = model.num_prefix_tokens
    pooled = (x * size)[:, prefix:, :].sum(dim=1) / patches  # the pooling of ToMe's patch for MAE
    return model.head(model.head_drop(model.fc_norm(pooled)))


MODELS = {
    "class token, token pooling": dict(global_pool="token"),
    "class token, average pooling": dict(global_pool="avg"),
    "no class token, average pooling": dict(class_token=False, global_pool="avg"),
}


def _vit(name: str = "vit_tiny_patch16_224", **kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4,
                              num_classes=10, **kwargs)
    with torch.no_grad():  # spread the weights so tokens differ clearly
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.double().eval()


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_logits_equal_official_tome(kind):
    model = _vit(**MODELS[kind])
    images = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        dense = model(images)
        expected = reference_forward(model, images, r=8)
        merger = attach_merge(model, r=8)
        merged = model(images)
        assert merger.tokens_out(model.num_prefix_tokens + 64) == model.num_prefix_tokens + 64 - 4 * 8
        assert (merged - dense).abs().max() > 1e-2  # merging changes the logits...
        assert (merged - expected).abs().max() <= 1e-5  # ...exactly as the official algorithm does
        merger.remove()
        ordered = attach_merge(model, r=8, variant="ordered")
        other = model(images)
        ordered.remove()
    # the kit's other variant is a different algorithm: this test tells them apart
    assert (other - expected).abs().max() > 1e-4


def test_logits_equal_official_tome_with_a_distillation_token():
    model = _vit("deit_tiny_distilled_patch16_224")
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        expected = reference_forward(model, images, r=6)
        attach_merge(model, r=6)
        assert (model(images) - expected).abs().max() <= 1e-5


def test_logits_equal_official_tome_in_float32_on_the_fused_attention_path():
    model = _vit(global_pool="token").float()
    assert model.blocks[0].attn.fused_attn
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = reference_forward(model, images, r=8)
        attach_merge(model, r=8)
        assert (model(images) - expected).abs().max() <= 1e-5
