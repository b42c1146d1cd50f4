"""Export a subnet as a plain, smaller model with sliced weights.

- Language: the kit's :class:`~lit_eff.models.GPT`. Blocks whose attention width
  (``heads * head_dim``) differs from the embedding width, or whose MLP ratio differs from the
  first block's, get their ``attn``/``mlp`` replaced on the instance by plain modules of the
  right sizes.
- Vision: :class:`PlainViT`, an ordinary ``nn.Module`` ViT (Conv2d patches, positions, blocks,
  average pooling, LayerNorm, head) with per-block sizes.

The exported model computes what the supernet computes with that subnet active::

    small = export_subnet(supernet, cfg)     # raises if cfg is outside supernet.space
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lit_eff.models.gpt import GPT, CausalSelfAttention, Mlp
from lit_eff.supernet.elastic import ElasticGPT, ElasticViT, _Elastic, qkv_rows
from lit_eff.supernet.space import SubnetConfig


class Attention(nn.Module):
    """Multi-head self-attention with its own head count and head size (``heads * head_dim``
    need not equal the width)."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, causal: bool) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.causal = num_heads, head_dim, causal
        self.qkv = nn.Linear(dim, 3 * num_heads * head_dim)
        self.proj = nn.Linear(num_heads * head_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.proj(y.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


class ViTBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, head_dim: int, hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, head_dim, causal=False)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, hidden)
        self.mlp.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PlainViT(nn.Module):
    """A ViT without class token (average pooling), with per-block heads and MLP widths."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, num_classes: int, embed_dim: int,
                 num_heads: list[int], hidden: list[int], head_dim: int) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, (img_size // patch_size) ** 2, embed_dim))
        self.blocks = nn.Sequential(*[ViTBlock(embed_dim, h, head_dim, n) for h, n in zip(num_heads, hidden)])
        self.fc_norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        return self.head(self.fc_norm(self.blocks(x).mean(1)))


@torch.no_grad()
def _copy_blocks(dst_blocks, src: _Elastic, cfg: SubnetConfig) -> None:
    d, hd, H = cfg.embed_dim, src.space.head_dim, src.space.num_heads[-1]
    for i in range(cfg.depth):
        s, t, h, n = src.blocks[i], dst_blocks[i], cfg.num_heads[i], cfg.hidden(i)
        rows = qkv_rows(h, H, hd)
        for name in ("norm1", "norm2"):
            getattr(t, name).weight.copy_(getattr(s, name).weight[:d])
            getattr(t, name).bias.copy_(getattr(s, name).bias[:d])
        t.attn.qkv.weight.copy_(s.attn.qkv.weight[rows, :d])
        t.attn.qkv.bias.copy_(s.attn.qkv.bias[rows])
        t.attn.proj.weight.copy_(s.attn.proj.weight[:d, : h * hd])
        t.attn.proj.bias.copy_(s.attn.proj.bias[:d])
        t.mlp.fc1.weight.copy_(s.mlp.fc1.weight[:n, :d])
        t.mlp.fc1.bias.copy_(s.mlp.fc1.bias[:n])
        t.mlp.fc2.weight.copy_(s.mlp.fc2.weight[:d, :n])
        t.mlp.fc2.bias.copy_(s.mlp.fc2.bias[:d])


@torch.no_grad()
def export_vit(src: ElasticViT, cfg: SubnetConfig) -> PlainViT:
    src.space.check(cfg)
    d, k = cfg.embed_dim, src.kwargs
    out = PlainViT(k["img_size"], k["patch_size"], k["in_chans"], k["num_classes"], d, list(cfg.num_heads),
                   [cfg.hidden(i) for i in range(cfg.depth)], src.space.head_dim)
    out.patch_embed.weight.copy_(src.patch_embed.weight[:d])
    out.patch_embed.bias.copy_(src.patch_embed.bias[:d])
    out.pos_embed.copy_(src.pos_embed[..., :d])
    out.fc_norm.weight.copy_(src.fc_norm.weight[:d])
    out.fc_norm.bias.copy_(src.fc_norm.bias[:d])
    out.head.weight.copy_(src.head.weight[:, :d])
    out.head.bias.copy_(src.head.bias)
    _copy_blocks(out.blocks, src, cfg)
    return out.to(src.pos_embed.device)


@torch.no_grad()
def export_gpt(src: ElasticGPT, cfg: SubnetConfig) -> GPT:
    src.space.check(cfg)
    d, hd = cfg.embed_dim, src.space.head_dim
    heads0 = cfg.num_heads[0] if d % cfg.num_heads[0] == 0 else 1
    out = GPT(src.vocab_size, src.block_size, cfg.depth, heads0, d, cfg.hidden(0) / d, 0.0, True)
    for i, block in enumerate(out.blocks):
        h, n = cfg.num_heads[i], cfg.hidden(i)
        if h * hd != d or h != block.attn.num_heads:
            block.attn = Attention(d, h, hd, causal=True) if h * hd != d else CausalSelfAttention(d, h)
        if block.mlp.fc1.out_features != n:
            block.mlp = Mlp(d, n)
    out.wte.weight.copy_(src.wte.weight[:, :d])
    out.wpe.weight.copy_(src.wpe.weight[:, :d])
    out.norm.weight.copy_(src.norm.weight[:d])
    out.norm.bias.copy_(src.norm.bias[:d])
    _copy_blocks(out.blocks, src, cfg)
    return out.to(src.wte.weight.device)


def export_subnet(model: _Elastic, cfg: SubnetConfig) -> nn.Module:
    """A plain model with ``cfg``'s sliced weights (PlainViT or the kit's GPT), in eval mode."""
    if isinstance(model, ElasticGPT):
        return export_gpt(model, cfg).eval()
    if isinstance(model, ElasticViT):
        return export_vit(model, cfg).eval()
    raise TypeError(f"Expected an ElasticViT or ElasticGPT, got {type(model).__name__}")
