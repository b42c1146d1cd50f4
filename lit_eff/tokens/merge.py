"""ToMe: merge ``r`` tokens per block by bipartite soft matching, as the official code does.

Between attention and MLP, tokens alternate into sets A and B; each A token finds its most
similar B token (cosine of the keys averaged over heads) and the ``r`` best-matched A tokens are
added into their partners weighted by size (patches per token). Later blocks add ``log(size)``
to the attention logits through ``attn_mask``; average pooling becomes size-weighted.
``variant="official"`` follows the official code (the whole sequence alternates, class token
first and never merged); ``"ordered"`` sets prefix tokens aside and keeps unmerged tokens in
order. :func:`attach_merge` swaps the class of every block from the first merging one on
(:mod:`lit_eff.tokens.attach`) and reads the keys from ``attn.qkv`` with a forward hook.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
from torch import nn

from lit_eff.tokens.adapters import TokenAdapter
from lit_eff.tokens.attach import BlockMixin, attach, detach
from lit_eff.tokens.drop import active
from lit_eff.tokens.select import gather_tokens

__all__ = ["TokenMerger", "attach_merge", "bipartite_merge", "check_merge_block", "ordered_merge", "tome_merge"]

VARIANTS = ("official", "ordered")
_BLOCK_PARTS = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")
_NAME = "_token_merge"


def check_merge_block(block: nn.Module, index: int) -> None:
    """Raise unless ``block`` is a timm-style pre-norm block whose attention takes ``attn_mask``."""
    missing = [part for part in _BLOCK_PARTS if not isinstance(getattr(block, part, None), nn.Module)]
    if not isinstance(getattr(getattr(block, "attn", None), "qkv", None), nn.Linear):
        missing.append("attn.qkv (nn.Linear)")
    if missing:
        raise ValueError(f"TokenMerge needs timm-style blocks (x + drop_path1(ls1(attn(norm1(x)))), then the MLP); "
                         f"block {index} ({type(block).__name__}) lacks {', '.join(missing)}")


def _check_r(r: int, limit: int, patches: int) -> None:
    if r > limit:
        raise ValueError(f"Expected `r` <= {limit} ({patches} patch tokens reach the block), got r={r}")


def tome_merge(x: torch.Tensor, size: torch.Tensor, metric: torch.Tensor, r: int,
               prefix: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Official ToMe: merge ``r`` tokens of ``x`` (``[B, N, C]``, sizes ``[B, N, 1]``, similarity
    feature ``metric`` ``[B, N, D]``); the first ``prefix`` tokens are never merged and stay first.

    Even positions form A, odd positions B; prefix tokens in A are never chosen to merge, prefix
    tokens in B never receive a merge (the official class and distillation tokens)."""
    in_a, in_b = (prefix + 1) // 2, prefix // 2
    _check_r(r, min((x.shape[1] - prefix) // 2, (x.shape[1] + 1) // 2 - in_a), x.shape[1] - prefix)
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        scores = metric[..., ::2, :] @ metric[..., 1::2, :].transpose(-1, -2)
        if in_a:
            scores[..., :in_a, :] = -math.inf
        if in_b:
            scores[..., :, :in_b] = -math.inf
        best, partner = scores.max(dim=-1)
        order = best.argsort(dim=-1, descending=True)[..., None]
        unmerged, src = order[..., r:, :], order[..., :r, :]
        dst = partner[..., None].gather(dim=-2, index=src)
        if prefix:
            unmerged = unmerged.sort(dim=1).values

    def merge(t: torch.Tensor) -> torch.Tensor:  # sum into partners
        a, b = t[..., ::2, :], t[..., 1::2, :]
        n, na, c = a.shape
        kept = a.gather(dim=-2, index=unmerged.expand(n, na - r, c))
        b = b.scatter_reduce(-2, dst.expand(n, r, c), a.gather(dim=-2, index=src.expand(n, r, c)), reduce="sum")
        head = [(kept if i % 2 == 0 else b)[:, i // 2 : i // 2 + 1] for i in range(prefix)]
        return torch.cat([*head, kept[:, in_a:], b[:, in_b:]], dim=1)

    merged, new_size = merge(x * size), merge(size)
    return (merged / new_size).to(x.dtype), new_size


def ordered_merge(x: torch.Tensor, size: torch.Tensor, metric: torch.Tensor, r: int,
                  prefix: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``"ordered"`` variant: prefix tokens set aside, patch tokens alternate from the first
    (A), output = prefix, unmerged A tokens in their original order, then B."""
    _check_r(r, (x.shape[1] - prefix) // 2, x.shape[1] - prefix)
    with torch.no_grad():
        m = metric[:, prefix:].float()
        m = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        best, partner = (m[:, ::2] @ m[:, 1::2].transpose(-1, -2)).max(dim=-1)
        order = best.argsort(dim=-1, descending=True)
        src, unmerged = order[:, :r], order[:, r:].sort(dim=-1).values
        dst = partner.gather(1, src)
    tokens, sizes = x[:, prefix:], size[:, prefix:]
    xa, xb, sa, sb = tokens[:, ::2], tokens[:, 1::2], sizes[:, ::2], sizes[:, 1::2]
    weighted_b = (xb * sb).scatter_add(1, dst.unsqueeze(-1).expand(-1, -1, x.shape[-1]), gather_tokens(xa * sa, src))
    sb = sb.scatter_add(1, dst.unsqueeze(-1), sa.gather(1, src.unsqueeze(-1)))
    merged = torch.cat([x[:, :prefix], gather_tokens(xa, unmerged), (weighted_b / sb).to(x.dtype)], dim=1)
    return merged, torch.cat([size[:, :prefix], sa.gather(1, unmerged.unsqueeze(-1)), sb], dim=1)


def bipartite_merge(x: torch.Tensor, size: torch.Tensor, metric: torch.Tensor, r: int, prefix: int = 0,
                    variant: str = "official") -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``r`` tokens (:func:`tome_merge` or :func:`ordered_merge`); returns tokens and sizes."""
    if r <= 0:
        return x, size
    return (tome_merge if variant == "official" else ordered_merge)(x, size, metric, r, prefix)


class MergeSettings:
    """What a block reads in ``forward`` (copied with the model: ``previous`` is the settings of
    the previous merging block, whose ``size_out`` this block starts from)."""

    def __init__(self, index: int, r: int, previous: MergeSettings | None, prefix: int, prop_attn: bool,
                 mode: str, variant: str) -> None:
        self.index, self.r, self.previous = index, r, previous
        self.prefix, self.prop_attn, self.mode, self.variant = prefix, prop_attn, mode, variant
        self.size_out: torch.Tensor | None = None  # token sizes leaving this block in the last forward
        self.keys: torch.Tensor | None = None  # this forward's attention keys, from the qkv hook


class TokenMerging(BlockMixin):
    """A timm-style block that merges ``r`` tokens between attention and MLP (``self._token_merge``)."""

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        m: MergeSettings = self._token_merge
        on = active(m.mode, self.training)
        size = m.previous.size_out if on and m.previous is not None else None
        if size is not None and m.prop_attn:
            bias = size.log()[:, None, None, :, 0].to(x.dtype)
            attn_mask = bias if attn_mask is None else attn_mask + bias
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, **kwargs)))
        keys, m.keys = m.keys, None
        if on and m.r > 0:
            b, n, _ = keys.shape
            if size is None:
                size = x.new_ones(b, n, 1, dtype=torch.promote_types(x.dtype, torch.float32))
            metric = keys.reshape(b, n, self.attn.num_heads, -1).mean(dim=2)
            x, size = bipartite_merge(x, size, metric, m.r, m.prefix, m.variant)
        m.size_out = size if on else None
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def _token_merge_keys(self, module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        dim = out.shape[-1] // 3
        self._token_merge.keys = out.detach()[..., dim : 2 * dim]


def size_weighted_pool(last: MergeSettings, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
    """Forward hook on the final norm of an average-pooling model: reweight the patch tokens so
    their mean is the size-weighted mean."""
    size = last.size_out
    if size is None or size.shape[1] != out.shape[1]:
        return None
    patch = size[:, last.prefix :]
    scale = patch * (patch.shape[1] / patch.sum(dim=1, keepdim=True))
    return torch.cat([out[:, : last.prefix], out[:, last.prefix :] * scale.to(out.dtype)], dim=1)


class TokenMerger:
    """Token merging attached to one model; ``remove`` detaches it.

    Attributes:
        r: tokens merged in each block (0 for blocks that only carry sizes).
        wrapped: indices of the blocks that run :class:`TokenMerging` (from the first merging one).
    """

    def __init__(self, adapter: TokenAdapter, r: Sequence[int], prop_attn: bool = True, mode: str = "eval",
                 variant: str = "official") -> None:
        if len(r) != adapter.depth:
            raise ValueError(f"Expected one `r` per block ({adapter.depth}), got {len(r)}")
        if variant not in VARIANTS:
            raise ValueError(f"Expected `variant` in {list(VARIANTS)}, got variant={variant!r}")
        self.adapter, self.r, self.mode = adapter, [int(v) for v in r], mode
        first = next((i for i, v in enumerate(self.r) if v > 0), adapter.depth)
        self.wrapped = list(range(first, adapter.depth))
        for i in self.wrapped:
            check_merge_block(adapter.blocks[i], i)
        self._handles, previous = [], None
        for i in self.wrapped:
            block = adapter.blocks[i]
            previous = MergeSettings(i, self.r[i], previous, adapter.num_prefix_tokens, prop_attn, mode, variant)
            attach(block, TokenMerging, _NAME, previous)
            self._handles.append(block.attn.qkv.register_forward_hook(block._token_merge_keys))
        if previous is not None and adapter.global_pool == "avg" and adapter.norm is not None:
            self._handles.append(adapter.norm.register_forward_hook(functools.partial(size_weighted_pool, previous)))

    def active(self, training: bool) -> bool:
        return active(self.mode, training)

    def lengths(self, tokens: int, training: bool = True) -> list[int]:
        """Tokens entering each block when ``tokens`` enter the first one."""
        out = []
        for r in self.r:
            out.append(tokens)
            tokens -= r if self.active(training) else 0
        return out

    def tokens_out(self, tokens: int, training: bool = False) -> int:
        """Tokens leaving the last block when ``tokens`` enter the first one."""
        return tokens - (sum(self.r) if self.active(training) else 0)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for i in self.wrapped:
            detach(self.adapter.blocks[i], TokenMerging, _NAME)


def merge_schedule(depth: int, r: int | Sequence[int], blocks: Sequence[int] | None) -> list[int]:
    """``r`` per block: ``r`` at ``blocks`` (all blocks when ``None``), 0 elsewhere; a list is per block."""
    if not isinstance(r, int):
        return [int(v) for v in r]
    chosen = range(depth) if blocks is None else blocks
    return [r if i in chosen else 0 for i in range(depth)]


def check_merge_fits(r: Sequence[int], patches: int) -> None:
    """Raise if some block would merge more than half of the patch tokens reaching it."""
    tokens = patches
    for index, value in enumerate(r):
        if value > tokens // 2:
            raise ValueError(f"Expected `r` <= {tokens // 2} at block {index} ({tokens} patch tokens reach it), "
                             f"got r={value}: lower `r` or merge in fewer blocks")
        tokens -= value


def attach_merge(model: nn.Module | TokenAdapter, r: int | Sequence[int], blocks: Sequence[int] | None = None,
                 prop_attn: bool = True, mode: str = "both", variant: str = "official") -> TokenMerger:
    """Merge ``r`` tokens in each of ``blocks`` of ``model``; ``.remove()`` detaches it::

        merger = attach_merge(vit, r=8)  # every block, evaluation and training
    """
    from lit_eff.tokens.adapters import find_adapter

    adapter = model if isinstance(model, TokenAdapter) else find_adapter(model)
    schedule = merge_schedule(adapter.depth, r, blocks)
    if adapter.num_patches is not None:
        check_merge_fits(schedule, adapter.num_patches)
    return TokenMerger(adapter, schedule, prop_attn, mode, variant)
