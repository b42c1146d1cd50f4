"""Structured replacements of ``nn.Linear`` (Wei et al., 2024): low-rank, block-shuffle and
block-dense weights, each with an optional dense *guide* for self-guided training.

Every layer computes ``y = S(x) + b`` with a structured map ``S``; while it holds a guide ``G``
(a dense ``out × in`` weight) it computes ``y = α·(x Gᵀ) + (1 − α)·S(x) + b``, ``α`` a buffer
the training callback anneals from 1 to 0. :meth:`StructuredLinear.drop_guide` removes ``G``
(and its compute). :meth:`StructuredLinear.dense_weight` is the ``out × in`` matrix the layer
computes (guide mixed in), so :func:`to_linear` gives back a plain ``nn.Linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BlockDenseLinear", "BlockShuffleLinear", "LowRankLinear", "StructuredLinear", "to_linear"]


class StructuredLinear(nn.Module):
    """Base of the structured layers: bias, guide, ``α`` and the dense equivalent."""

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.guide: nn.Parameter | None = None

    # the structured map, without bias ----------------------------------------------------------
    def structured(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.structured(x)
        if self.guide is not None:
            guide = F.linear(x, self.guide)
            y = self.alpha.to(guide.dtype) * guide + (1.0 - self.alpha).to(y.dtype) * y
        return y if self.bias is None else y + self.bias.to(y.dtype)

    # guide ---------------------------------------------------------------------------------------
    def add_guide(self) -> None:
        """Add the dense guide, initialised to the structured map (the layer's function is kept),
        and ``α = 1`` (a persistent buffer: it travels in checkpoints)."""
        with torch.no_grad():
            self.guide = nn.Parameter(self.structured_weight())
        ref = self.guide
        self.register_buffer("alpha", torch.ones((), dtype=torch.float32, device=ref.device))

    def drop_guide(self) -> None:
        """Remove the guide and ``α``: from now on the layer computes ``S(x) + b`` only."""
        self.guide = None
        self._buffers.pop("alpha", None)
        self.__dict__.pop("alpha", None)

    @property
    def guided(self) -> bool:
        return self.guide is not None

    # dense equivalents ---------------------------------------------------------------------------
    @torch.no_grad()
    def structured_weight(self) -> torch.Tensor:
        """The ``out × in`` matrix of the structured map alone."""
        ref = next(p for p in self.parameters() if p is not self.guide and p is not self.bias)
        eye = torch.eye(self.in_features, dtype=ref.dtype, device=ref.device)
        return self.structured(eye).t().contiguous()

    @torch.no_grad()
    def dense_weight(self) -> torch.Tensor:
        """The ``out × in`` matrix this layer computes now (the guide mixed in by ``α``)."""
        weight = self.structured_weight()
        if self.guide is not None:
            weight = self.alpha * self.guide + (1.0 - self.alpha) * weight
        return weight

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, guided={self.guided}")


def _orthogonal_blocks(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Normal entries (std ``shape[-1]**-0.5``), then each matrix replaced by its orthogonal polar
    factor ``U Vᴴ`` (the official code's ``ortho`` initialisation)."""
    weight = torch.randn(shape, generator=generator) * shape[-1] ** -0.5
    u, _, vh = torch.linalg.svd(weight, full_matrices=False)
    return u @ vh


class LowRankLinear(StructuredLinear):
    """``S(x) = x Vᵀ Uᵀ`` with ``V`` (``rank × in``) and ``U`` (``out × rank``).

    :meth:`from_linear` initialises ``U = U_r √S_r``, ``V = √S_r V_rᵀ`` from the SVD of the
    dense weight (the best rank-``r`` approximation, split evenly).
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias)
        self.rank = rank
        self.v = nn.Parameter(torch.empty(rank, in_features))
        self.u = nn.Parameter(torch.empty(out_features, rank))
        nn.init.normal_(self.v, std=in_features ** -0.5)
        nn.init.normal_(self.u, std=rank ** -0.5)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, rank: int) -> LowRankLinear:
        layer = cls(linear.in_features, linear.out_features, rank, linear.bias is not None)
        weight = linear.weight.detach()
        u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
        root = s[:rank].sqrt()
        layer.u.copy_(u[:, :rank] * root)
        layer.v.copy_(root[:, None] * vh[:rank])
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach())
        return layer.to(device=weight.device, dtype=weight.dtype)

    def structured(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.v), self.u)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}"


class BlockShuffleLinear(StructuredLinear):
    """Two block-diagonal factors with a shuffle between (Monarch-style): ``x`` is cut into
    ``blocks`` chunks, each mapped by its own block of ``w1``; the results are interleaved
    (entry ``i`` goes to block ``i mod blocks``) and each block mapped again by ``w2``.

    Shapes as in the official code: ``w1`` is ``blocks × q × in/blocks`` and ``w2`` is
    ``blocks × out/blocks × q`` with ``q = in/blocks`` when ``in < out``, else ``out/blocks``.
    Both are initialised with orthogonal blocks.
    """

    def __init__(self, in_features: int, out_features: int, blocks: int, bias: bool = True,
                 generator: torch.Generator | None = None) -> None:
        super().__init__(in_features, out_features, bias)
        self.blocks = blocks
        p, s = in_features // blocks, out_features // blocks
        q = p if in_features < out_features else s
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        self.w1 = nn.Parameter(_orthogonal_blocks((blocks, q, p), gen))
        self.w2 = nn.Parameter(_orthogonal_blocks((blocks, s, q), gen))

    def structured(self, x: torch.Tensor) -> torch.Tensor:
        lead, n = x.shape[:-1], x.shape[-1]
        k, q, p = self.w1.shape
        l, s, r = self.w2.shape
        rows = x.reshape(-1, k, p).transpose(0, 1)  # k × N × p
        # weights in the activations' dtype: what autocast would do, but visible to the FLOP counter
        mid = torch.bmm(rows, self.w1.to(rows.dtype).transpose(-1, -2))  # k × N × q
        mid = mid.transpose(0, 1).reshape(-1, r, l).transpose(-1, -2).transpose(0, 1)  # l × N × r (shuffled)
        out = torch.bmm(mid, self.w2.to(mid.dtype).transpose(-1, -2))  # l × N × s
        return out.permute(1, 2, 0).reshape(*lead, s * l)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, blocks={self.blocks}"


class BlockDenseLinear(StructuredLinear):
    """A block-diagonal factor then a dense low-rank one: ``x`` is cut into ``blocks`` chunks,
    each mapped to ``rank/blocks`` values by its block of ``w1`` (``blocks × rank/blocks ×
    in/blocks``), and the ``rank`` values are mapped to the output by ``w2`` (``out × rank``).
    Orthogonal initialisation, as in the official code."""

    def __init__(self, in_features: int, out_features: int, rank: int, blocks: int, bias: bool = True,
                 generator: torch.Generator | None = None) -> None:
        super().__init__(in_features, out_features, bias)
        self.rank, self.blocks = rank, blocks
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        self.w1 = nn.Parameter(_orthogonal_blocks((blocks, rank // blocks, in_features // blocks), gen))
        self.w2 = nn.Parameter(_orthogonal_blocks((out_features, rank), gen))

    def structured(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        k, q, p = self.w1.shape
        rows = x.reshape(-1, k, p).transpose(0, 1)  # k × N × p
        mid = torch.bmm(rows, self.w1.to(rows.dtype).transpose(-1, -2)).transpose(0, 1).reshape(-1, k * q)  # N × rank
        return F.linear(mid, self.w2).reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, blocks={self.blocks}"


@torch.no_grad()
def to_linear(layer: StructuredLinear) -> nn.Linear:
    """A plain ``nn.Linear`` computing what ``layer`` computes now (guide mixed in)."""
    weight = layer.dense_weight()
    linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                       device=weight.device, dtype=weight.dtype)
    linear.weight.copy_(weight)
    if layer.bias is not None:
        linear.bias.copy_(layer.bias)
    return linear
