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
        self.model = model
        self.space = model.space
        self._parts: dict[tuple, int] = {}
        self._cache: dict[SubnetConfig, int] = {}
        self._training: dict[tuple, int] = {}
        self._grads: tuple[bool, ...] = ()

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

    def training(self, cfg: SubnetConfig, batch: torch.Tensor) -> int:
        """Executed FLOPs (forward and backward, as FlopsMonitor counts them) of training ``cfg``
        on a batch shaped like ``batch``, with the supernet's parameters training as they are now."""
        grads = tuple(p.requires_grad for p in self.model.parameters())
        key = (cfg, tuple(batch.shape), batch.dtype, grads)
        if key in self._training:
            return self._training[key]
        if grads != self._grads:
            for twin_param, train in zip(self.twin.parameters(), grads):
                twin_param.requires_grad_(train)
            self._grads = grads
        twin, d, shape = self.twin, cfg.embed_dim, key[1:]
        with torch.enable_grad():
            x = torch.empty(batch.shape, dtype=batch.dtype, device="meta")
            tokens = twin.embed(x, d)
            total = self._trained(("embed", d, *shape), lambda: twin.embed(x, d))
            for i in range(cfg.depth):
                h, hidden, grad_in = cfg.num_heads[i], cfg.hidden(i), tokens.requires_grad
                total += self._trained(("block", i, d, h, hidden, grad_in, *shape),
                                       lambda: twin.blocks[i](tokens, h, hidden))
                if not grad_in and any(p.requires_grad for p in twin.blocks[i].parameters()):
                    tokens = tokens.detach().requires_grad_(True)
            total += self._trained(("readout", d, tokens.requires_grad, *shape), lambda: twin.readout(tokens, d))
        self._training[key] = total
        return total

    def _trained(self, key: tuple, fn) -> int:
        if key not in self._parts:
            self._parts[key] = count_flops(fn).total
        return self._parts[key]

    def min(self) -> int:
        return self(self.space.min())

    def max(self) -> int:
        return self(self.space.max())
