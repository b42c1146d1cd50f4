"""Elastic ViT and GPT: one set of weights at the largest size; a :class:`SubnetConfig` slices
width, heads, MLP hidden units and depth at every forward (``model(x, cfg)``, or
``model.set_subnet(cfg)`` then ``model(x)``).

Slicing keeps the first units of each dimension: the first ``embed_dim`` channels everywhere
(embeddings, LayerNorms, residual stream, head), the first ``h`` heads of q, k and v (the
head size is fixed, so ``h * head_dim`` rows of each), the first ``hidden`` MLP units and the
first ``depth`` blocks. Module names follow timm and the kit's GPT (``blocks.i.attn.qkv``,
``mlp.fc1``...), so an exported plain model takes sliced tensors under the same names.

Under ``torch.compile`` the loop over blocks and the cutting of weights run as Python, and the
math of each part (:func:`block_math`, embedding, readout) compiles with contiguous inputs whose
sizes become symbolic, so a few graphs serve every subnet.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lit_eff.supernet.space import SearchSpace, SubnetConfig


@torch.compiler.disable(recursive=False)
def _take(t: torch.Tensor, *sizes: int) -> torch.Tensor:
    """The leading ``sizes`` of ``t`` as a contiguous tensor that is not a ``Parameter``: a view at
    full size or when only rows are cut (no copy), a copy when columns are cut. Compiled code then
    sees the same kind of input for every subnet, so one graph serves them all."""
    if not torch.is_grad_enabled():  # evaluation: no view that still requires grad
        t = t.detach()
    if tuple(t.shape[: len(sizes)]) == sizes:
        return t.view(t.shape)
    return t[tuple(slice(0, s) for s in sizes)].contiguous()


def block_math(x: torch.Tensor, norm1_w, norm1_b, qkv_w, qkv_b, proj_w, proj_b, norm2_w, norm2_b, fc1_w, fc1_b,
               fc2_w, fc2_b, head_dim: int, causal: bool, gelu: str, eps: float) -> torch.Tensor:
    """A pre-norm transformer block on weights already cut to the subnet's sizes."""
    b, t, d = x.shape
    q, k, v = F.linear(F.layer_norm(x, (d,), norm1_w, norm1_b, eps), qkv_w, qkv_b).view(
        b, t, 3, -1, head_dim).permute(2, 0, 3, 1, 4)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    x = x + F.linear(y.transpose(1, 2).reshape(b, t, proj_w.shape[1]), proj_w, proj_b)
    y = F.gelu(F.linear(F.layer_norm(x, (d,), norm2_w, norm2_b, eps), fc1_w, fc1_b), approximate=gelu)
    return x + F.linear(y, fc2_w, fc2_b)


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

    @torch.compiler.disable(recursive=False)  # cuts the weights in Python; block_math compiles
    def forward(self, x: torch.Tensor, heads: int, hidden: int) -> torch.Tensor:
        d, inner = x.shape[-1], heads * self.head_dim
        qkv, proj, fc1, fc2 = self.attn.qkv, self.attn.proj, self.mlp.fc1, self.mlp.fc2
        if heads == self.max_heads:
            qkv_w, qkv_b = _take(qkv.weight, 3 * inner, d), _take(qkv.bias, 3 * inner)
        else:  # the first heads of q, k and v (copies)
            qkv_w = qkv.weight.view(3, -1, qkv.weight.shape[1])[:, :inner, :d].reshape(3 * inner, d)
            qkv_b = qkv.bias.view(3, -1)[:, :inner].reshape(3 * inner)
        return block_math(x, _take(self.norm1.weight, d), _take(self.norm1.bias, d), qkv_w, qkv_b,
                          _take(proj.weight, d, inner), _take(proj.bias, d), _take(self.norm2.weight, d),
                          _take(self.norm2.bias, d), _take(fc1.weight, hidden, d), _take(fc1.bias, hidden),
                          _take(fc2.weight, d, hidden), _take(fc2.bias, d), self.head_dim, self.causal, self.gelu,
                          self.norm1.eps)


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

    @torch.compiler.disable(recursive=False)
    def embed(self, x: torch.Tensor, d: int) -> torch.Tensor:
        pos = self.pos_embed[0]
        return vit_embed(x, _take(self.patch_embed.weight, d), _take(self.patch_embed.bias, d),
                         _take(pos, pos.shape[0], d), self.patch_size)

    @torch.compiler.disable(recursive=False)
    def readout(self, x: torch.Tensor, d: int) -> torch.Tensor:
        return vit_readout(x, _take(self.fc_norm.weight, d), _take(self.fc_norm.bias, d),
                           _take(self.head.weight, self.num_classes, d), self.head.bias.view(-1), self.fc_norm.eps)


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

    @torch.compiler.disable(recursive=False)
    def embed(self, idx: torch.Tensor, d: int) -> torch.Tensor:
        if idx.shape[1] > self.block_size:
            raise ValueError(f"Expected a sequence of at most block_size={self.block_size} tokens, got {idx.shape[1]}")
        wte, wpe = self.wte.weight, self.wpe.weight
        return gpt_embed(idx, _take(wte, wte.shape[0], d), _take(wpe, wpe.shape[0], d))

    @torch.compiler.disable(recursive=False)
    def readout(self, x: torch.Tensor, d: int) -> torch.Tensor:
        wte = self.wte.weight
        return gpt_readout(x, _take(self.norm.weight, d), _take(self.norm.bias, d), _take(wte, wte.shape[0], d),
                           self.norm.eps)


def vit_embed(x: torch.Tensor, weight, bias, pos, patch_size: int) -> torch.Tensor:
    return F.conv2d(x, weight, bias, stride=patch_size).flatten(2).transpose(1, 2) + pos


def vit_readout(x: torch.Tensor, norm_w, norm_b, head_w, head_b, eps: float) -> torch.Tensor:
    x = x.mean(1)
    return F.linear(F.layer_norm(x, (x.shape[-1],), norm_w, norm_b, eps), head_w, head_b)


def gpt_embed(idx: torch.Tensor, wte, wpe) -> torch.Tensor:
    return F.embedding(idx, wte) + F.embedding(torch.arange(idx.shape[1], device=idx.device), wpe)


def gpt_readout(x: torch.Tensor, norm_w, norm_b, wte, eps: float) -> torch.Tensor:
    return F.linear(F.layer_norm(x, (x.shape[-1],), norm_w, norm_b, eps), wte)
