"""A small GPT: pre-norm decoder blocks, fused causal attention, learned positions, tied
input/output embeddings, byte vocabulary by default; optionally Mixture-of-Recursions (shared
blocks applied up to R times per token, :mod:`lit_eff.tokens.recursion`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lit_eff.models.kv_cache import KVCache, LayerCache
from lit_eff.tokens.recursion import Recursion, RecursionStats, make_routers, recurse


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads  # attributes: head pruning changes num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        causal = True
        if cache is not None:  # generate(): earlier keys and values come from the cache
            k, v, causal = cache.extend(k, v)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))`` (timm's attribute names)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, bias=bias)
        self.attn = CausalSelfAttention(dim, num_heads, dropout, bias)
        self.norm2 = nn.LayerNorm(dim, bias=bias)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x), cache))
        return x + self.drop(self.mlp(self.norm2(x)))


class GPT(nn.Module):
    """Decoder-only transformer over ``vocab_size`` tokens with context ``block_size``.

    Blocks live in ``self.blocks`` (an ``nn.ModuleList``) so techniques can reach them; the
    output head shares its weight with the token embedding.

    ``recursion``: Mixture-of-Recursions (:class:`~lit_eff.tokens.recursion.Recursion`). ``n_layer``
    is then the depth of the equivalent vanilla model; ``self.blocks`` holds the unique blocks
    (``middle_cycle``: the first, ``(n_layer - 2) / R`` shared ones, the last) and
    ``self.routers`` the routers.
    """

    causal = True

    def __init__(
        self,
        vocab_size: int = 256,
        block_size: int = 256,
        n_layer: int = 4,
        n_head: int = 4,
        n_embd: int = 128,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        bias: bool = True,
        recursion: Recursion | None = None,
    ) -> None:
        super().__init__()
        for name, value in [("vocab_size", vocab_size), ("block_size", block_size), ("n_layer", n_layer),
                            ("n_head", n_head), ("n_embd", n_embd)]:
            if value <= 0:
                raise ValueError(f"Expected `{name}` > 0, got {name}={value}")
        if n_embd % n_head:
            raise ValueError(f"Expected `n_head` to divide `n_embd`, got n_embd={n_embd}, n_head={n_head}")
        self.vocab_size, self.block_size = vocab_size, block_size
        self.recursion = recursion
        self.layout = (n_layer, 0, 0) if recursion is None else recursion.layout(n_layer)
        self.mor_stats = RecursionStats()
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, mlp_ratio, dropout, bias) for _ in range(sum(self.layout)))
        if recursion is not None and recursion.routed:
            self.routers = make_routers(recursion, n_embd)
        self.norm = nn.LayerNorm(n_embd, bias=bias)
        self.head = nn.Linear(n_embd, vocab_size, bias=False)
        self.head.weight = self.wte.weight
        self.grad_checkpointing = False
        self.apply(self._init_weights)
        for name, param in self.named_parameters():
            if name.endswith(("proj.weight", "fc2.weight")):  # GPT-2's scaled init of residual projections
                nn.init.normal_(param, mean=0.0, std=0.02 / (2 * n_layer) ** 0.5)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward instead of storing them (as timm's
        models do): less memory, one more forward of the blocks per step."""
        self.grad_checkpointing = enable

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def embed(self, idx: torch.Tensor, start: int = 0) -> torch.Tensor:
        t = start + idx.shape[1]
        if t > self.block_size:
            raise ValueError(f"Expected a sequence of at most block_size={self.block_size} tokens, got {t}")
        positions = torch.arange(start, t, device=idx.device)
        return self.drop(self.wte(idx) + self.wpe(positions))

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Logits ``[batch, time, vocab]`` for token ids ``[batch, time]``; with a ``cache``
        (:meth:`can_cache`), ``idx`` continues the tokens the cache has seen."""
        x = self.embed(idx, 0 if cache is None else cache.length)
        first, shared, _ = self.layout
        for i in range(first):
            x = self._block(i, x, cache)
        if self.recursion is not None:
            def stack(h: torch.Tensor, r: int) -> torch.Tensor:
                for i in range(first, first + shared):
                    h = self._block(i, h, cache, r)
                return h

            x = recurse(x, stack, getattr(self, "routers", None), self.recursion, self.mor_stats,
                        self.training and cache is None, every_step=cache is None)
            for i in range(first + shared, len(self.blocks)):
                x = self._block(i, x, cache)
        if cache is not None:
            cache.length += idx.shape[1]
        return self.head(self.norm(x))

    def _block(self, index: int, x: torch.Tensor, cache: KVCache | None, step: int = 0) -> torch.Tensor:
        block = self.blocks[index]
        if cache is not None:
            return block(x, cache.layer((index, step)))
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, use_reentrant=False)
        return block(x)

    def can_cache(self) -> bool:
        """Whether :meth:`forward` may decode with a :class:`KVCache`: plain blocks (no token
        technique attached) and causal routing (no evaluation top-k over the sequence)."""
        plain = all(type(block) is Block for block in self.blocks)
        return plain and (self.recursion is None or self.recursion.routing != "expert"
                          or self.recursion.eval_routing == "threshold")
