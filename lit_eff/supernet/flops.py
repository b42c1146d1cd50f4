"""Forward FLOPs of one sample through any subnet, counted by :func:`lit_eff.flops.count_flops`
on a meta-device twin of the supernet (no compute) and cached.

A subnet's FLOPs are the sum of its parts (embedding, each block at its own width/heads/hidden,
readout), so each distinct part is counted once and reused across the many subnets a sampler
or a search looks at.
"""

from __future__ import annotations

import torch

from lit_eff.flops import count_flops
from lit_eff.supernet.elastic import _Elastic
from lit_eff.supernet.space import SubnetConfig


class SubnetFlops:
    """``flops(cfg)``: forward FLOPs of one input sample (one image, one ``block_size`` sequence)."""

    def __init__(self, model: _Elastic) -> None:
        with torch.device("meta"):
            self.twin = type(model)(model.space, **model.kwargs)
        self.space = model.space
        self._parts: dict[tuple, int] = {}
        self._cache: dict[SubnetConfig, int] = {}

    def _part(self, key: tuple, fn) -> int:
        if key not in self._parts:
            with torch.no_grad():
                self._parts[key] = count_flops(fn, backward=False).forward
        return self._parts[key]

    def __call__(self, cfg: SubnetConfig) -> int:
        if cfg in self._cache:
            return self._cache[cfg]
        twin, d = self.twin, cfg.embed_dim
        x = twin.example_input(1).to("meta")
        tokens = twin.embed(x, d)
        total = self._part(("embed", d), lambda: twin.embed(x, d))
        for i in range(cfg.depth):
            h, hidden = cfg.num_heads[i], cfg.hidden(i)
            total += self._part(("block", d, h, hidden), lambda: twin.blocks[0](tokens, h, hidden))
        total += self._part(("readout", d), lambda: twin.readout(tokens, d))
        self._cache[cfg] = total
        return total

    def min(self) -> int:
        return self(self.space.min())

    def max(self) -> int:
        return self(self.space.max())
