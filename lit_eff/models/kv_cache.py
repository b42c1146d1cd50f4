"""Keys and values kept between the steps of :meth:`CausalLM.generate` (one sequence).

One :class:`LayerCache` per attention call of the forward pass: per block for a plain GPT, per
(block, recursion step) for Mixture-of-Recursions, where a step caches only the tokens routed
through it, so a later token attends, at that step, to the earlier tokens that took it
(recursion-wise KV caching).
"""

from __future__ import annotations

from collections.abc import Hashable

import torch

__all__ = ["KVCache", "LayerCache"]


class LayerCache:
    """The keys and values ``[batch, heads, tokens, head_dim]`` one attention call has seen."""

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Append ``k``, ``v``; returns all keys and values and whether attention must be causal
        among the new tokens (the first call: the prompt). Later calls add one token each."""
        if self.k is None:
            self.k, self.v = k, v
            return k, v, True
        if k.shape[2] != 1:
            raise ValueError(f"A KV cache grows by one token per call after the prompt, got {k.shape[2]} tokens")
        self.k, self.v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
        return self.k, self.v, False


class KVCache:
    """The layer caches of one model, created on first use, and the tokens seen so far."""

    def __init__(self) -> None:
        self.layers: dict[Hashable, LayerCache] = {}
        self.length = 0

    def layer(self, key: Hashable) -> LayerCache:
        if key not in self.layers:
            self.layers[key] = LayerCache()
        return self.layers[key]
