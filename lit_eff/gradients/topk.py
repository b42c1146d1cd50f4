"""The top-``|g|`` gradient mask of SparCL's dynamic gradient masking.

>>> g = torch.tensor([[0.1, -3.0, 0.5, 2.0]])
>>> topk_mask(g, 0.5)
tensor([[False,  True, False,  True]])
>>> topk_mask(g, 0.5, allowed=torch.tensor([[True, False, True, True]]))   # among kept weights only
tensor([[False, False,  True,  True]])
"""

from __future__ import annotations

import math

import torch

from lit_eff.validation import check_density


def kept_count(allowed: int, density: float) -> int:
    """``round(density · allowed)`` entries, at least 1 when anything is allowed (a layer never
    loses its whole gradient)."""
    if allowed <= 0:
        return 0
    return min(allowed, max(1, round(density * allowed)))


@torch.no_grad()
def topk_mask(grad: torch.Tensor, density: float, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask of the ``kept_count(allowed.sum(), density)`` largest ``|grad|`` entries among
    the ``allowed`` ones (all entries when ``None``); entries outside ``allowed`` are never kept.

    A NaN counts as the smallest magnitude. Ties are broken by ``torch.topk``, deterministic for
    equal inputs on one device, so ranks holding the same gradient pick the same entries.
    """
    check_density(density)
    scores = grad.detach().abs().float().nan_to_num(nan=-1.0)
    if allowed is not None:
        if allowed.shape != grad.shape:
            raise ValueError(f"Expected `allowed` of shape {tuple(grad.shape)}, got {tuple(allowed.shape)}")
        allowed = allowed.to(device=grad.device, dtype=torch.bool)
        n_allowed = int(allowed.sum())
        scores = torch.where(allowed, scores, -math.inf)
    else:
        n_allowed = grad.numel()
    k = kept_count(n_allowed, density)
    mask = torch.zeros(grad.numel(), dtype=torch.bool, device=grad.device)
    if k == n_allowed:
        return allowed.clone() if allowed is not None else ~mask.view_as(grad)
    if k > 0:
        mask[scores.flatten().topk(k, sorted=False).indices] = True
    return mask.view_as(grad)
