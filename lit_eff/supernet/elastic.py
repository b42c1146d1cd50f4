"""Elastic ViT and GPT: one set of weights at the largest size; a :class:`SubnetConfig` slices
width, heads, MLP hidden units and depth at every forward (``model(x, cfg)``, or
``model.set_subnet(cfg)`` then ``model(x)``).

Slicing keeps the first units of each dimension: the first ``embed_dim`` channels everywhere
(embeddings, LayerNorms, residual stream, head), the first ``h`` heads of q, k and v (the
head size is fixed, so ``h * head_dim`` rows of each), the first ``hidden`` MLP units and the
first ``depth`` blocks. Module names follow timm and the kit's GPT (``blocks.i.attn.qkv``,
``mlp.fc1``...), so an exported plain model takes sliced tensors under the same names.

Under ``torch.compile`` the loop over blocks runs as Python and each block call is compiled
with its width, heads and hidden units as symbolic sizes, so a handful of graphs serve every
subnet. Eager runs skip the slice at full size (its backward would copy a full-size gradient).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lit_eff.supernet.space import SearchSpace, SubnetConfig


def _cut(t: torch.Tensor, *sizes) -> torch.Tensor:
    """The leading ``sizes`` of ``t``. When compiling always a slice (one graph for every size);
    in eager ``t`` itself at full size."""
    if not torch.compiler.is_compiling() and tuple(t.shape[: len(sizes)]) == sizes:
        return t
    return t[tuple(slice(0, s) for s in sizes)]


def _ln(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    d = x.shape[-1]
    return F.layer_norm(x, (d,), _cut(norm.weight, d), _cut(norm.bias, d), norm.eps)


def _linear(x: torch.Tensor, layer: nn.Linear, out: int) -> torch.Tensor:
    return F.linear(x, _cut(layer.weight, out, x.shape[-1]), _cut(layer.bias, out))


def qkv_rows(heads: int, max_heads: int, head_dim: int) -> slice | torch.Tensor:
    """Row indices of the qkv weight that the first ``heads`` heads of q, k and v use."""
    if heads == max_heads:
        return slice(None)
    inner = max_heads * head_dim
    return torch.cat([torch.arange(i * inner, i * inner + heads * head_dim) for i in range(3)])


class ElasticBlock(nn.Module):
    """A pre-norm transformer block at its largest size, run at any width (that of its input),
    number of heads and MLP hidden units."""

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

    def qkv(self, y: torch.Tensor, heads: int) -> torch.Tensor:
        qkv = self.attn.qkv
        if not torch.compiler.is_compiling() and heads == self.max_heads:
            return _linear(y, qkv, qkv.weight.shape[0])
        inner, d = heads * self.head_dim, y.shape[-1]
        weight = qkv.weight.view(3, -1, qkv.weight.shape[1])[:, :inner, :d]  # the first heads of q, k and v
        bias = qkv.bias.view(3, -1)[:, :inner]
        return F.linear(y, torch.cat(weight.unbind(0)), torch.cat(bias.unbind(0)))

    def forward(self, x: torch.Tensor, heads: int, hidden: int) -> torch.Tensor:
        b, t, d = x.shape
        hd = self.head_dim
        q, k, v = self.qkv(_ln(x, self.norm1), heads).view(b, t, 3, heads, hd).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        x = x + _linear(y.transpose(1, 2).reshape(b, t, heads * hd), self.attn.proj, d)
        y = F.gelu(_linear(_ln(x, self.norm2), self.mlp.fc1, hidden), approximate=self.gelu)
        return x + _linear(y, self.mlp.fc2, d)


class _Elastic(nn.Module):
    causal = False

    def __init__(self, space: SearchSpace | dict) -> None:
        super().__init__()
        self.space = SearchSpace.from_dict(space)
        self.subnet = self.space.max()
        self.grad_checkpointing = False
        s = self.space
        self.max_hidden = int(round(s.embed_dim[-1] * s.mlp_ratio[-1]))
        self.blocks = nn.ModuleList(
            ElasticBlock(s.embed_dim[-1], s.num_heads[-1], s.head_dim, self.max_hidden, self.causal, self.causal)
            for _ in range(s.depth[-1]))

    def set_subnet(self, cfg: SubnetConfig) -> None:
        """The subnet ``model(x)`` runs when called without one."""
        self.space.check(cfg)
        self.subnet = cfg

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward instead of storing them."""
        self.grad_checkpointing = enable

    def forward(self, x: torch.Tensor, subnet: SubnetConfig | None = None) -> torch.Tensor:
        return self.run(x, subnet or self.subnet)

    @torch.compiler.disable(recursive=False)  # Python over the subnet; the calls below compile
    def run(self, x: torch.Tensor, cfg: SubnetConfig) -> torch.Tensor:
        x = self.embed(x, cfg.embed_dim)
        torch._dynamo.maybe_mark_dynamic(x, 2)  # the width: symbolic from the first compile on
        for i in range(cfg.depth):
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(self.blocks[i], x, cfg.num_heads[i], cfg.hidden(i), use_reentrant=False)
            else:
                x = self.blocks[i](x, cfg.num_heads[i], cfg.hidden(i))
        return self.readout(x, cfg.embed_dim)

    def embed(self, x: torch.Tensor, d: int) -> torch.Tensor:
        raise NotImplementedError

    def readout(self, x: torch.Tensor, d: int) -> torch.Tensor:
        raise NotImplementedError


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
        x = F.conv2d(x, _cut(self.patch_embed.weight, d), _cut(self.patch_embed.bias, d), stride=self.patch_size)
        pos = self.pos_embed[0]
        return x.flatten(2).transpose(1, 2) + _cut(pos, pos.shape[0], d)

    def readout(self, x: torch.Tensor, d: int) -> torch.Tensor:
        return _linear(_ln(x.mean(1), self.fc_norm), self.head, self.num_classes)


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
        wte, wpe = self.wte.weight, self.wpe.weight
        return F.embedding(idx, _cut(wte, wte.shape[0], d)) + F.embedding(pos, _cut(wpe, wpe.shape[0], d))

    def readout(self, x: torch.Tensor, d: int) -> torch.Tensor:
        wte = self.wte.weight
        return F.linear(_ln(x, self.norm), _cut(wte, wte.shape[0], d))
