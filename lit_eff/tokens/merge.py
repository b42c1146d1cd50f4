"""ToMe: merge ``r`` tokens per block by bipartite soft matching (ALGORITHMS.md §7.4).

In each merging block, between attention and MLP: the patch tokens (prefix tokens are never
merged) split alternately into sets A and B; every A token finds its most similar B token (cosine
of the attention keys, averaged over heads); the ``r`` A tokens with the best matches are averaged
into their partners, weighted by token size (how many input patches a token stands for); sizes
add. Attention in every block after the first merge adds ``log(size)`` to the logits
(proportional attention) through ``attn_mask`` of timm's own attention, so the fused
``F.scaled_dot_product_attention`` path is kept. With average pooling, the final tokens are
reweighted by size so the pooled feature is the size-weighted mean.

:func:`attach_merge` replaces ``forward`` on the block *instances* (and hooks ``attn.qkv`` to read
the keys); ``.remove()`` restores them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lit_eff.tokens.adapters import TokenAdapter
from lit_eff.tokens.select import gather_tokens

__all__ = ["TokenMerger", "attach_merge", "bipartite_merge", "check_merge_block"]

_BLOCK_PARTS = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")


def check_merge_block(block: nn.Module, index: int) -> None:
    """Raise unless ``block`` is a timm-style pre-norm block whose attention takes ``attn_mask``."""
    missing = [part for part in _BLOCK_PARTS if not isinstance(getattr(block, part, None), nn.Module)]
    if not isinstance(getattr(getattr(block, "attn", None), "qkv", None), nn.Linear):
        missing.append("attn.qkv (nn.Linear)")
    if missing:
        raise ValueError(f"TokenMerge needs timm-style blocks (x + drop_path1(ls1(attn(norm1(x)))), then the MLP); "
                         f"block {index} ({type(block).__name__}) lacks {', '.join(missing)}")


def bipartite_merge(x: torch.Tensor, size: torch.Tensor, metric: torch.Tensor, r: int,
                    prefix: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``r`` patch tokens of ``x`` (``[B, N, C]``) into their most similar partners.

    ``size`` (``[B, N, 1]``) counts the patches each token stands for; ``metric`` (``[B, N, D]``)
    is the similarity feature. The first ``prefix`` tokens are never merged and stay first.
    Returns the merged tokens and sizes (``N − r`` tokens): prefix, unmerged A tokens in their
    original order, then B tokens.
    """
    if r <= 0:
        return x, size
    with torch.no_grad():
        m = metric[:, prefix:].float()
        m = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        scores = m[:, ::2] @ m[:, 1::2].transpose(-1, -2)  # A x B
        best, partner = scores.max(dim=-1)
        order = best.argsort(dim=-1, descending=True)
        src = order[:, :r]
        unmerged = order[:, r:].sort(dim=-1).values
        dst = partner.gather(1, src)
    tokens, sizes = x[:, prefix:], size[:, prefix:]
    xa, xb = tokens[:, ::2], tokens[:, 1::2]
    sa, sb = sizes[:, ::2], sizes[:, 1::2]
    weighted_b = (xb * sb).scatter_add(1, dst.unsqueeze(-1).expand(-1, -1, x.shape[-1]),
                                       gather_tokens(xa * sa, src))
    sb = sb.scatter_add(1, dst.unsqueeze(-1), sa.gather(1, src.unsqueeze(-1)))
    merged = torch.cat([x[:, :prefix], gather_tokens(xa, unmerged), (weighted_b / sb).to(x.dtype)], dim=1)
    new_size = torch.cat([size[:, :prefix], sa.gather(1, unmerged.unsqueeze(-1)), sb], dim=1)
    return merged, new_size


class TokenMerger:
    """The attached merging machinery of one model.

    Attributes:
        r: tokens merged in each block (0 for blocks that only carry sizes).
        tokens_out: tokens leaving each wrapped block in the last forward.
        layer_tokens: tokens that entered a block during training forwards (running total).
    """

    def __init__(self, adapter: TokenAdapter, r: Sequence[int], prop_attn: bool = True, mode: str = "eval") -> None:
        if len(r) != adapter.depth:
            raise ValueError(f"Expected one `r` per block ({adapter.depth}), got {len(r)}")
        self.adapter = adapter
        self.r = [int(v) for v in r]
        self.prop_attn = prop_attn
        self.mode = mode
        self.layer_tokens = 0
        self.dense_layer_tokens = 0
        first = next((i for i, v in enumerate(self.r) if v > 0), adapter.depth)
        self.wrapped = list(range(first, adapter.depth))
        self.tokens_out: list[int] = [0] * len(self.wrapped)
        for i in self.wrapped:
            check_merge_block(adapter.blocks[i], i)
        self._size: torch.Tensor | None = None
        self._keys: torch.Tensor | None = None
        self._handles = [block.register_forward_pre_hook(self._count(i)) for i, block in enumerate(adapter.blocks)]
        for i in self.wrapped:
            block = adapter.blocks[i]
            self._handles.append(block.attn.qkv.register_forward_hook(self._read_keys(block.attn.num_heads)))
            block.forward = self._forward(block, i)
        if adapter.global_pool == "avg" and adapter.norm is not None:
            self._handles.append(adapter.norm.register_forward_hook(self._size_weighted))

    def active(self, training: bool) -> bool:
        return self.mode == "both" or self.mode == ("train" if training else "eval")

    def _count(self, index: int):
        def hook(block: nn.Module, args: tuple) -> None:
            if index == 0:
                self._size = None  # a new forward
                if block.training and args:
                    self.dense_layer_tokens += args[0].shape[0] * args[0].shape[1] * self.adapter.depth
            if block.training and args:
                self.layer_tokens += args[0].shape[0] * args[0].shape[1]

        return hook

    def _read_keys(self, heads: int):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            b, n, three_dim = out.shape
            keys = out.detach()[..., three_dim // 3 : 2 * three_dim // 3]
            self._keys = keys.reshape(b, n, heads, -1).mean(dim=2)

        return hook

    def _forward(self, block: nn.Module, index: int):
        position = self.wrapped.index(index)

        def forward(x: torch.Tensor, attn_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
            active = self.active(block.training)
            size = self._size if active else None
            if size is not None and self.prop_attn:
                bias = size.log().to(x.dtype).view(x.shape[0], 1, 1, x.shape[1])
                attn_mask = bias if attn_mask is None else attn_mask + bias
            x = x + block.drop_path1(block.ls1(block.attn(block.norm1(x), attn_mask=attn_mask, **kwargs)))
            r = self.r[index] if active else 0
            if r > 0:
                prefix = self.adapter.num_prefix_tokens
                if r > (x.shape[1] - prefix) // 2:
                    raise ValueError(f"Expected `r` <= {(x.shape[1] - prefix) // 2} at block {index} "
                                     f"({x.shape[1] - prefix} patch tokens reach it), got r={r}")
                if size is None:
                    size = x.new_ones(x.shape[0], x.shape[1], 1, dtype=torch.float32)
                x, size = bipartite_merge(x, size, self._keys, r, prefix)
                self._size = size
            self._keys = None
            self.tokens_out[position] = x.shape[1]
            return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))

        return forward

    def _size_weighted(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
        # avg pooling over patch tokens then gives sum(size * x) / sum(size)
        size = self._size
        if size is None or size.shape[1] != out.shape[1]:
            return None
        prefix = self.adapter.num_prefix_tokens
        patch_size = size[:, prefix:]
        scale = patch_size * (patch_size.shape[1] / patch_size.sum(dim=1, keepdim=True))
        return torch.cat([out[:, :prefix], out[:, prefix:] * scale.to(out.dtype)], dim=1)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for i in self.wrapped:
            self.adapter.blocks[i].__dict__.pop("forward", None)
        self._size = self._keys = None


def merge_schedule(depth: int, r: int | Sequence[int], blocks: Sequence[int] | None) -> list[int]:
    """``r`` per block: ``r`` at ``blocks`` (all blocks when ``None``), 0 elsewhere; a list is per block."""
    if not isinstance(r, int):
        return [int(v) for v in r]
    chosen = range(depth) if blocks is None else blocks
    return [r if i in chosen else 0 for i in range(depth)]


def check_merge_fits(r: Sequence[int], patches: int, prefix_note: str = "") -> None:
    """Raise if some block would merge more than half of the patch tokens reaching it."""
    tokens = patches
    for index, value in enumerate(r):
        if value > tokens // 2:
            raise ValueError(f"Expected `r` <= {tokens // 2} at block {index} ({tokens} patch tokens reach it"
                             f"{prefix_note}), got r={value}: lower `r` or merge in fewer blocks")
        tokens -= value


def attach_merge(model: nn.Module | TokenAdapter, r: int | Sequence[int], blocks: Sequence[int] | None = None,
                 prop_attn: bool = True, mode: str = "both") -> TokenMerger:
    """Merge ``r`` tokens in each of ``blocks`` of ``model``; ``.remove()`` detaches it::

        merger = attach_merge(vit, r=8)  # every block, evaluation and training
    """
    from lit_eff.tokens.adapters import find_adapter

    adapter = model if isinstance(model, TokenAdapter) else find_adapter(model)
    schedule = merge_schedule(adapter.depth, r, blocks)
    if adapter.num_patches is not None:
        check_merge_fits(schedule, adapter.num_patches)
    return TokenMerger(adapter, schedule, prop_attn, mode)
