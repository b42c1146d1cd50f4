"""Elastic ViT and GPT: one set of weights at the largest size; the active :class:`SubnetConfig`
(``model.subnet``) slices width, heads, MLP hidden units and depth at every forward.

Slicing keeps the first units of each dimension: the first ``embed_dim`` channels everywhere
(embeddings, LayerNorms, residual stream, head), the first ``h`` heads of q, k and v (the
head size is fixed, so ``h * head_dim`` rows of each), the first ``hidden`` MLP units and the
first ``depth`` blocks. Module names follow timm and the kit's GPT (``blocks.i.attn.qkv``,
``mlp.fc1``...), so an exported plain model takes sliced tensors under the same names.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lit_eff.supernet.space import SearchSpace, SubnetConfig


def _ln(x: torch.Tensor, norm: nn.LayerNorm, d: int) -> torch.Tensor:
    if d == norm.weight.shape[0]:  # full width: no slice (its backward would copy a full-size gradient)
        return F.layer_norm(x, (d,), norm.weight, norm.bias, norm.eps)
    return F.layer_norm(x, (d,), norm.weight[:d], norm.bias[:d] if norm.bias is not None else None, norm.eps)


def _linear(x: torch.Tensor, layer: nn.Linear, out: int, inp: int) -> torch.Tensor:
    if (out, inp) == tuple(layer.weight.shape):
        return F.linear(x, layer.weight, layer.bias)
    bias = layer.bias[:out] if layer.bias is not None else None
    return F.linear(x, layer.weight[:out, :inp], bias)


def _cols(weight: torch.Tensor, d: int) -> torch.Tensor:
    return weight if d == weight.shape[1] else weight[:, :d]


def qkv_rows(heads: int, max_heads: int, head_dim: int) -> slice | torch.Tensor:
    """Row indices of the qkv weight that the first ``heads`` heads of q, k and v use."""
    if heads == max_heads:
        return slice(None)
    inner = max_heads * head_dim
    return torch.cat([torch.arange(i * inner, i * inner + heads * head_dim) for i in range(3)])


class ElasticBlock(nn.Module):
    """A pre-norm transformer block at its largest size, run at any (width, heads, hidden)."""

    def __init__(self, dim: int, max_heads: int, head_dim: int, max_hidden: int, causal: bool,
                 approximate_gelu: bool) -> None:
        super().__init__()
        self.max_heads, self.head_dim, self.causal = max_heads, head_dim, causal
        self.gelu = "tanh" if approximate_gelu else "none"
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(dim, 3 * max_heads * head_dim)
        self.attn.proj = nn.Linear(max_heads * head_dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(dim, max_hidden)
        self.mlp.fc2 = nn.Linear(max_hidden, dim)

    def forward(self, x: torch.Tensor, d: int, heads: int, hidden: int) -> torch.Tensor:
        b, t, _ = x.shape
        hd, inner = self.head_dim, heads * self.head_dim
        y = _ln(x, self.norm1, d)
        if heads == self.max_heads:
            qkv = _linear(y, self.attn.qkv, 3 * inner, d)
        else:
            w = self.attn.qkv.weight.view(3, self.max_heads * hd, -1)[:, :inner, :d].reshape(3 * inner, d)
            bias = self.attn.qkv.bias.view(3, -1)[:, :inner].reshape(-1)
            qkv = F.linear(y, w, bias)
        q, k, v = qkv.view(b, t, 3, heads, hd).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        x = x + _linear(y.transpose(1, 2).reshape(b, t, inner), self.attn.proj, d, inner)
        y = F.gelu(_linear(_ln(x, self.norm2, d), self.mlp.fc1, hidden, d), approximate=self.gelu)
        return x + _linear(y, self.mlp.fc2, d, hidden)


class _Elastic(nn.Module):
    causal = False

    def __init__(self, space: SearchSpace | dict) -> None:
        super().__init__()
        self.space = SearchSpace.from_dict(space)
        self.subnet = self.space.max()
        s = self.space
        self.max_hidden = int(round(s.embed_dim[-1] * s.mlp_ratio[-1]))
        self.blocks = nn.ModuleList(
            ElasticBlock(s.embed_dim[-1], s.num_heads[-1], s.head_dim, self.max_hidden, self.causal, self.causal)
            for _ in range(s.depth[-1]))

    def set_subnet(self, cfg: SubnetConfig) -> None:
        self.space.check(cfg)
        self.subnet = cfg

    def run_blocks(self, x: torch.Tensor, cfg: SubnetConfig) -> torch.Tensor:
        for i in range(cfg.depth):
            x = self.blocks[i](x, cfg.embed_dim, cfg.num_heads[i], cfg.hidden(i))
        return x


class ElasticViT(_Elastic):
    """A ViT (patch embedding, learned positions, no class token, average pooling, LayerNorm,
    linear head) whose depth, width, heads and MLP ratios are elastic."""

    def __init__(self, space: SearchSpace | dict, img_size: int = 8, patch_size: int = 2, in_chans: int = 1,
                 num_classes: int = 10) -> None:
        super().__init__(space)
        if img_size % patch_size:
            raise ValueError(f"Expected `patch_size` to divide `img_size`, got img_size={img_size}, "
                             f"patch_size={patch_size}")
        self.img_size, self.patch_size, self.in_chans, self.num_classes = img_size, patch_size, in_chans, num_classes
        self.kwargs = {"img_size": img_size, "patch_size": patch_size, "in_chans": in_chans, "num_classes": num_classes}
        dim = self.space.embed_dim[-1]
        self.patch_embed = nn.Conv2d(in_chans, dim, patch_size, patch_size)
        self.pos_embed = nn.Parameter(torch.randn(1, (img_size // patch_size) ** 2, dim) * 0.02)
        self.fc_norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def example_input(self, batch: int = 1) -> torch.Tensor:
        return torch.zeros(batch, self.in_chans, self.img_size, self.img_size)

    def embed(self, x: torch.Tensor, d: int) -> torch.Tensor:
        p = self.patch_size
        full = d == self.patch_embed.weight.shape[0]
        weight, bias = (self.patch_embed.weight, self.patch_embed.bias) if full else (
            self.patch_embed.weight[:d], self.patch_embed.bias[:d])
        x = F.conv2d(x, weight, bias, stride=p)
        return x.flatten(2).transpose(1, 2) + _cols(self.pos_embed[0], d)

    def readout(self, x: torch.Tensor, d: int) -> torch.Tensor:
        return _linear(_ln(x.mean(1), self.fc_norm, d), self.head, self.num_classes, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.subnet
        return self.readout(self.run_blocks(self.embed(x, cfg.embed_dim), cfg), cfg.embed_dim)


class ElasticGPT(_Elastic):
    """The kit's GPT (pre-norm, causal SDPA, learned positions, tied head) with elastic depth,
    width, heads and MLP ratios."""

    causal = True

    def __init__(self, space: SearchSpace | dict, vocab_size: int = 256, block_size: int = 128) -> None:
        super().__init__(space)
        self.vocab_size, self.block_size = vocab_size, block_size
        self.kwargs = {"vocab_size": vocab_size, "block_size": block_size}
        dim = self.space.embed_dim[-1]
        self.wte = nn.Embedding(vocab_size, dim)
        self.wpe = nn.Embedding(block_size, dim)
        self.norm = nn.LayerNorm(dim)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        for name, p in self.named_parameters():
            if name.endswith(("proj.weight", "fc2.weight")):
                nn.init.normal_(p, std=0.02 / (2 * len(self.blocks)) ** 0.5)

    def example_input(self, batch: int = 1) -> torch.Tensor:
        return torch.zeros(batch, self.block_size, dtype=torch.long)

    def embed(self, idx: torch.Tensor, d: int) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.block_size:
            raise ValueError(f"Expected a sequence of at most block_size={self.block_size} tokens, got {t}")
        pos = torch.arange(t, device=idx.device)
        return F.embedding(idx, _cols(self.wte.weight, d)) + F.embedding(pos, _cols(self.wpe.weight, d))

    def readout(self, x: torch.Tensor, d: int) -> torch.Tensor:
        return F.linear(_ln(x, self.norm, d), _cols(self.wte.weight, d))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        cfg = self.subnet
        return self.readout(self.run_blocks(self.embed(idx, cfg.embed_dim), cfg), cfg.embed_dim)
