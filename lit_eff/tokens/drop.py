"""PyramidDrop-style token dropping: at chosen blocks, keep the top ``⌊N₀·ratio⌋`` patch tokens
(N₀: patch tokens entering the first block), in their original order, plus every prefix token,
and physically remove the rest for that block and every later one.

:func:`attach_drop` swaps the class of each stage block for one that drops before running the
block (:mod:`lit_eff.tokens.attach`); kept counts are plain integers set outside ``forward``, and
a random choice is drawn outside ``forward`` too (:meth:`TokenDropper.draw`), so a compiled
model recompiles only when a count changes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from lit_eff.seeding import generator
from lit_eff.tokens.adapters import TokenAdapter
from lit_eff.tokens.attach import BlockMixin, attach, detach
from lit_eff.tokens.select import check_attn_block, gather_tokens, score_tokens, topk_sorted, with_prefix

__all__ = ["TokenDropper", "attach_drop"]

MODES = ("train", "eval", "both")
QUERIES = ("auto", "cls", "mean")
_NAME = "_token_drop"


def active(mode: str, training: bool) -> bool:
    return mode == "both" or mode == ("train" if training else "eval")


class DropSettings:
    """What a stage block reads in ``forward`` (copied with the block)."""

    def __init__(self, prefix: int, score: str, query_token: int | None, mode: str) -> None:
        self.prefix, self.score, self.query_token, self.mode = prefix, score, query_token, mode
        self.keep: int | None = None  # patch tokens kept from this block on
        self.chosen: torch.Tensor | None = None  # a random choice of patch indices [B, keep], sorted
        self.drawn_from = 0  # patch tokens the random choice was drawn from


class TokenDropping(BlockMixin):
    """Drops tokens before the block runs (the settings live in ``self._token_drop``)."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        s: DropSettings = self._token_drop
        if active(s.mode, self.training):
            x = drop(self, x, s)
        return super().forward(x, *args, **kwargs)


def drop(block: nn.Module, x: torch.Tensor, s: DropSettings) -> torch.Tensor:
    patches = x.shape[1] - s.prefix
    if s.keep is None:
        raise RuntimeError("TokenDrop does not know how many tokens to keep: call `set_ratios(ratios, patches)`")
    if s.keep >= patches:
        return x
    if s.score != "random":
        chosen = topk_sorted(score_tokens(s.score, x, block, s.query_token)[:, s.prefix:], s.keep)
    elif s.chosen is not None and s.chosen.shape == (x.shape[0], s.keep) and s.drawn_from == patches:
        chosen = s.chosen
    else:  # nothing drawn for this shape (outside a Trainer): the global generator
        chosen = topk_sorted(torch.rand(x.shape[0], patches, device=x.device), s.keep)
    return gather_tokens(x, with_prefix(chosen, s.prefix))


class TokenDropper:
    """Token dropping attached to one model; ``set_ratios`` and ``draw`` update it, ``remove``
    detaches it.

    Attributes:
        stages: the block indices where a stage starts.
        query_token: index of the token whose view scores the others (``"attn"``, ``"cosine"``),
            ``None`` for the mean token: ``query="auto"`` uses the mean token when the model pools
            by averaging (its class token does not feed the head) or has no class token.
    """

    def __init__(self, adapter: TokenAdapter, blocks: Sequence[int], ratios: Sequence[float], score: str = "attn",
                 mode: str = "both", name: str = "token_drop", query: str = "auto") -> None:
        if query not in QUERIES:
            raise ValueError(f"Expected `query` in {list(QUERIES)}, got query={query!r}")
        if score == "attn":
            for index in blocks:
                check_attn_block(adapter.blocks[index])
        self.adapter, self.stages, self.score, self.mode, self.name = adapter, list(blocks), score, mode, name
        mean = query == "mean" or (query == "auto" and adapter.global_pool == "avg")
        self.query_token = None if mean or adapter.class_token is None else adapter.class_token
        self.settings = [DropSettings(adapter.num_prefix_tokens, score, self.query_token, mode) for _ in blocks]
        for index, settings in zip(self.stages, self.settings):
            attach(adapter.blocks[index], TokenDropping, _NAME, settings)
        self.ratios = [float(r) for r in ratios]
        self.patches = adapter.num_patches if adapter.sequence_length is None else None
        if self.patches is not None:
            self.set_ratios(self.ratios, self.patches)

    def active(self, training: bool) -> bool:
        return active(self.mode, training)

    def kept(self, ratios: Sequence[float], patches: int) -> list[int]:
        """Patch tokens left after each stage for ``patches`` at the first block."""
        out, left = [], patches
        for ratio in ratios:
            left = min(left, max(1, math.floor(patches * ratio + 1e-9)))
            out.append(left)
        return out

    def set_ratios(self, ratios: Sequence[float], patches: int) -> None:
        """Keep ``ratios`` of ``patches`` (the patch tokens entering the first block)."""
        self.ratios, self.patches = [float(r) for r in ratios], patches
        for settings, ratio in zip(self.settings, self.ratios):
            settings.keep = max(1, math.floor(patches * ratio + 1e-9))

    def lengths(self, tokens: int, ratios: Sequence[float] | None = None, training: bool = True) -> list[int]:
        """Tokens entering each block when ``tokens`` (prefix included) enter the first one."""
        prefix = self.adapter.num_prefix_tokens
        out, current = [], tokens
        kept = dict(zip(self.stages, self.kept(self.ratios if ratios is None else ratios, tokens - prefix)))
        for index in range(self.adapter.depth):
            if index in kept and self.active(training):
                current = min(current, prefix + kept[index])
            out.append(current)
        return out

    def draw(self, keys: tuple, batch: int, device: torch.device | str = "cpu") -> int:
        """Draw the random choice of every stage (``score="random"``) from generators keyed by
        ``(*keys, name, block)``; returns a fingerprint of the choice (equal on every DDP rank)."""
        fingerprint, patches = 0, self.patches
        for index, settings in zip(self.stages, self.settings):
            settings.chosen = None
            if patches is None or settings.keep >= patches:
                continue
            gen = generator(*keys, self.name, index)
            chosen = topk_sorted(torch.rand(batch, patches, generator=gen), settings.keep)
            weights = torch.arange(1, settings.keep + 1, dtype=torch.float64)
            fingerprint += int((chosen.double() * weights).sum())
            settings.chosen, settings.drawn_from = chosen.to(device, non_blocking=True), patches
            patches = settings.keep
        return fingerprint

    def remove(self) -> None:
        for index in self.stages:
            detach(self.adapter.blocks[index], TokenDropping, _NAME)


def attach_drop(model: nn.Module | TokenAdapter, blocks: Sequence[int], ratios: Sequence[float], score: str = "attn",
                mode: str = "both", query: str = "auto") -> TokenDropper:
    """Drop tokens in ``model`` (or an adapter) at ``blocks`` keeping ``ratios`` of the patch tokens;
    ``.remove()`` detaches it. Works outside a Trainer (benchmarks, inference)::

        dropper = attach_drop(vit, blocks=[4, 8], ratios=[0.5, 0.25], score="cosine")
    """
    from lit_eff.tokens.adapters import find_adapter

    adapter = model if isinstance(model, TokenAdapter) else find_adapter(model)
    return TokenDropper(adapter, blocks, ratios, score, mode, query=query)
