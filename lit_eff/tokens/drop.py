"""PyramidDrop-style token dropping: at chosen blocks, keep the top fraction of the patch
tokens and physically remove the rest for every later block (ALGORITHMS.md §7.1).

:func:`attach_drop` puts a forward pre-hook on every block (instance-level, removable); a stage
block's hook scores the tokens entering it, keeps ``⌊N₀·ratio⌋`` patch tokens (N₀: patch tokens
at the first block) in their original order plus all prefix tokens, and hands the block the
gathered tensor, so later blocks, the final norm and the pooling all run on fewer tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from lit_eff.seeding import generator
from lit_eff.tokens.adapters import TokenAdapter
from lit_eff.tokens.select import check_attn_block, gather_tokens, score_tokens, topk_sorted

__all__ = ["TokenDropper", "attach_drop"]

MODES = ("train", "eval", "both")
QUERIES = ("auto", "cls", "mean")


class TokenDropper:
    """The attached dropping machinery of one model; the callback sets ``ratios`` and ``keys``.

    Attributes:
        ratios: current keep ratio of each stage (fractions of the original patch count).
        keys: seed keys of the random score (``(run_seed, step, batch)``, set per batch).
        kept_fraction: patch tokens kept after each stage in the last forward, over N₀.
        layer_tokens: tokens that entered a block during training forwards (running total).
        last_choice: a fingerprint of the last random choice (equal on every DDP rank).
        query_token: index of the token whose view scores the others (``"attn"``, ``"cosine"``),
            ``None`` for the mean token: ``query="auto"`` uses the mean token when the model pools
            by averaging (its class token does not feed the head) or has no class token.
    """

    def __init__(self, adapter: TokenAdapter, blocks: Sequence[int], ratios: Sequence[float], score: str = "attn",
                 mode: str = "both", name: str = "token_drop", query: str = "auto") -> None:
        self.adapter = adapter
        self.stages = list(blocks)
        self.ratios = [float(r) for r in ratios]
        self.score = score
        self.mode = mode
        self.name = name
        if query not in QUERIES:
            raise ValueError(f"Expected `query` in {list(QUERIES)}, got query={query!r}")
        mean = query == "mean" or (query == "auto" and adapter.global_pool == "avg")
        self.query_token = None if mean or adapter.class_token is None else adapter.class_token
        self.keys: tuple = (0,)
        self.kept_fraction = [1.0] * len(self.stages)
        self.layer_tokens = 0
        self.dense_layer_tokens = 0
        self.last_choice = 0
        self._n0 = 0
        if score == "attn":
            for index in self.stages:
                check_attn_block(adapter.blocks[index])
        self._handles = [block.register_forward_pre_hook(self._hook(i), with_kwargs=True)
                         for i, block in enumerate(adapter.blocks)]

    def active(self, training: bool) -> bool:
        return self.mode == "both" or self.mode == ("train" if training else "eval")

    def _hook(self, index: int):
        stage = self.stages.index(index) if index in self.stages else None

        def hook(block: nn.Module, args: tuple, kwargs: dict):
            x = args[0] if args else kwargs["x"]
            prefix = self.adapter.num_prefix_tokens
            if index == 0:
                self._n0 = x.shape[1] - prefix
                if block.training:
                    self.dense_layer_tokens += x.shape[0] * x.shape[1] * self.adapter.depth
            if stage is not None and self.active(block.training):
                x = self._drop(block, x, stage, index)
            if block.training:
                self.layer_tokens += x.shape[0] * x.shape[1]
            if args:
                return (x, *args[1:]), kwargs
            return args, {**kwargs, "x": x}

        return hook

    def _drop(self, block: nn.Module, x: torch.Tensor, stage: int, index: int) -> torch.Tensor:
        prefix = self.adapter.num_prefix_tokens
        n0 = self._n0 or x.shape[1] - prefix
        keep = max(1, math.floor(n0 * self.ratios[stage] + 1e-9))
        patches = x.shape[1] - prefix
        if keep >= patches:
            self.kept_fraction[stage] = patches / max(n0, 1)
            return x
        gen = generator(*self.keys, self.name, index) if self.score == "random" else None
        scores = score_tokens(self.score, x, block, self.query_token, gen)[:, prefix:]
        index_kept = topk_sorted(scores, keep) + prefix
        if self.score == "random":
            weights = torch.arange(1, keep + 1, device=x.device, dtype=torch.float64)
            self.last_choice = int((index_kept.double() * weights).sum().item())
        if prefix:
            head = torch.arange(prefix, device=x.device).expand(x.shape[0], prefix)
            index_kept = torch.cat([head, index_kept], dim=1)
        self.kept_fraction[stage] = keep / n0
        return gather_tokens(x, index_kept)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def attach_drop(model: nn.Module | TokenAdapter, blocks: Sequence[int], ratios: Sequence[float], score: str = "attn",
                mode: str = "both", query: str = "auto") -> TokenDropper:
    """Drop tokens in ``model`` (or an adapter) at ``blocks`` keeping ``ratios`` of the patch tokens;
    ``.remove()`` detaches it. Works outside a Trainer (benchmarks, inference)::

        dropper = attach_drop(vit, blocks=[4, 8], ratios=[0.5, 0.25], score="cosine")
    """
    from lit_eff.tokens.adapters import find_adapter

    adapter = model if isinstance(model, TokenAdapter) else find_adapter(model)
    return TokenDropper(adapter, blocks, ratios, score, mode, query=query)
