"""Export a subnet as a plain, smaller model with sliced weights.

- Language: the kit's :class:`~lit_eff.models.GPT`. Blocks whose attention width
  (``heads * head_dim``) differs from the embedding width, or whose MLP ratio differs from the
  first block's, get their ``attn``/``mlp`` replaced on the instance by plain modules of the
  right sizes.
- Vision: :class:`PlainViT`, an ordinary ``nn.Module`` ViT (Conv2d patches, positions, blocks,
  average pooling, LayerNorm, head) with per-block sizes.

The exported model computes what the supernet computes with that subnet active::

    small = export_subnet(supernet, cfg)     # raises if cfg is outside supernet.space
    save_subnet(supernet, cfg, "subnet.pt")  # plain data: torch.load(..., weights_only=True) reads it
    small = load_subnet("subnet.pt")
"""

from __future__ import annotations

from typing import Any

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

    def forward(self, x: torch.Tensor, cache: Any = None) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        causal = self.causal
        if cache is not None:  # the exported GPT's generate(): earlier keys and values come from the cache
            k, v, causal = cache.extend(k, v)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
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


def plain_model(arch: str, cfg: SubnetConfig, kwargs: dict, head_dim: int) -> nn.Module:
    """An untrained plain model shaped like subnet ``cfg`` of an ``arch`` ("vit" or "gpt") supernet
    built with ``kwargs`` (its ``arch_kwargs``) and ``head_dim``."""
    d = cfg.embed_dim
    hidden = [cfg.hidden(i) for i in range(cfg.depth)]
    if arch == "vit":
        return PlainViT(kwargs["img_size"], kwargs["patch_size"], kwargs["in_chans"], kwargs["num_classes"], d,
                        list(cfg.num_heads), hidden, head_dim)
    heads0 = cfg.num_heads[0] if d % cfg.num_heads[0] == 0 else 1
    out = GPT(kwargs["vocab_size"], kwargs["block_size"], cfg.depth, heads0, d, hidden[0] / d, 0.0, True)
    for block, h, n in zip(out.blocks, cfg.num_heads, hidden):
        if h * head_dim != d or h != block.attn.num_heads:
            block.attn = Attention(d, h, head_dim, causal=True) if h * head_dim != d else CausalSelfAttention(d, h)
        if block.mlp.fc1.out_features != n:
            block.mlp = Mlp(d, n)
    return out


@torch.no_grad()
def _copy_ends(dst: nn.Module, src: _Elastic, d: int) -> None:
    if isinstance(src, ElasticViT):
        dst.patch_embed.weight.copy_(src.patch_embed.weight[:d])
        dst.patch_embed.bias.copy_(src.patch_embed.bias[:d])
        dst.pos_embed.copy_(src.pos_embed[..., :d])
        dst.fc_norm.weight.copy_(src.fc_norm.weight[:d])
        dst.fc_norm.bias.copy_(src.fc_norm.bias[:d])
        dst.head.weight.copy_(src.head.weight[:, :d])
        dst.head.bias.copy_(src.head.bias)
    else:
        dst.wte.weight.copy_(src.wte.weight[:, :d])
        dst.wpe.weight.copy_(src.wpe.weight[:, :d])
        dst.norm.weight.copy_(src.norm.weight[:d])
        dst.norm.bias.copy_(src.norm.bias[:d])


def export_subnet(model: _Elastic, cfg: SubnetConfig) -> nn.Module:
    """A plain model with ``cfg``'s sliced weights (PlainViT or the kit's GPT), in eval mode."""
    if not isinstance(model, (ElasticViT, ElasticGPT)):
        raise TypeError(f"Expected an ElasticViT or ElasticGPT, got {type(model).__name__}")
    model.space.check(cfg)
    arch = "vit" if isinstance(model, ElasticViT) else "gpt"
    out = plain_model(arch, cfg, model.kwargs, model.space.head_dim)
    _copy_ends(out, model, cfg.embed_dim)
    _copy_blocks(out.blocks, model, cfg)
    return out.to(next(model.parameters()).device).eval()


FORMAT = "lit_eff.supernet.subnet/1"


def save_subnet(model: _Elastic, cfg: SubnetConfig, path: str, **extra: Any) -> nn.Module:
    """Export ``cfg`` and save it to ``path`` as plain data (loadable with ``weights_only=True``):
    the architecture, its arguments, the subnet and the state dict. Returns the exported model."""
    out = export_subnet(model, cfg)
    torch.save({"format": FORMAT, "arch": "vit" if isinstance(model, ElasticViT) else "gpt",
                "arch_kwargs": dict(model.kwargs), "head_dim": model.space.head_dim, "config": cfg.to_dict(),
                "state_dict": {k: v.detach().cpu() for k, v in out.state_dict().items()}, **extra}, path)
    return out


def load_subnet(path: str, map_location: str | torch.device = "cpu") -> nn.Module:
    """The plain model a ``lit-eff search`` run saved (``subnet.pt``), in eval mode::

        model = lit_eff.supernet.load_subnet("search_out/subnet.pt")
    """
    saved = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise ValueError(f"{path} is not a subnet saved by `lit-eff search` (expected format {FORMAT!r})")
    model = plain_model(saved["arch"], SubnetConfig.from_dict(saved["config"]), saved["arch_kwargs"],
                        saved["head_dim"])
    model.load_state_dict(saved["state_dict"])
    return model.to(map_location).eval()
