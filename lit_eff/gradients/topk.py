"""The top-``|g|`` gradient mask (SparCL's dynamic gradient masking, ALGORITHMS.md §2).

>>> g = torch.tensor([[0.1, -3.0, 0.5, 2.0]])
>>> topk_mask(g, 0.5)
tensor([[False,  True, False,  True]])
>>> topk_mask(g, 0.5, allowed=torch.tensor([[True, False, True, True]]))   # among kept weights only
tensor([[False, False,  True,  True]])
"""

from __future__ import annotations

import math

import torch


def validate_density(value: float, name: str = "density") -> float:
    """``value`` as a float in (0, 1], else ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0 \
            or math.isnan(value):
        raise ValueError(f"Expected `{name}` in (0, 1], got {name}={value!r}")
    return float(value)


def kept_count(allowed: int, density: float) -> int:
    """How many of ``allowed`` entries a ``density`` keeps: ``round(density · allowed)``, at
    least 1 when anything is allowed (a layer never loses its whole gradient)."""
    if allowed <= 0:
        return 0
    return min(allowed, max(1, round(density * allowed)))


@torch.no_grad()
def topk_mask(grad: torch.Tensor, density: float, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask of the ``kept_count(allowed.sum(), density)`` largest ``|grad|`` entries
    among the ``allowed`` ones (all entries when ``allowed`` is ``None``).

    Entries outside ``allowed`` are never kept. A NaN counts as the smallest magnitude (an
    AMP step with non-finite gradients is skipped by the scaler anyway). Ties at the threshold
    are broken by ``torch.topk`` (deterministic for equal inputs on one device, so every DDP
    rank, holding the same all-reduced gradient, picks the same entries).
    """
    validate_density(density)
    scores = grad.detach().abs().float().nan_to_num(nan=-1.0)
    total = grad.numel()
    if allowed is not None:
        if allowed.shape != grad.shape:
            raise ValueError(f"Expected `allowed` of shape {tuple(grad.shape)}, got {tuple(allowed.shape)}")
        allowed = allowed.to(device=grad.device, dtype=torch.bool)
        n_allowed = int(allowed.sum())
        scores = torch.where(allowed, scores, -math.inf)
    else:
        n_allowed = total
    k = kept_count(n_allowed, density)
    mask = torch.zeros(total, dtype=torch.bool, device=grad.device)
    if k == n_allowed:
        return allowed.clone() if allowed is not None else ~mask.view_as(grad)
    if k > 0:
        mask[scores.flatten().topk(k, sorted=False).indices] = True
    return mask.view_as(grad)
