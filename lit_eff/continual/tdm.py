"""SparCL's task-aware dynamic masking (Wang et al., NeurIPS 2022): the mask update, pure math.

At an update, each layer keeps the weights whose importance ``|w| + λ·|g|`` lies strictly above
the ``p_low`` percentile of the layer's importances (``g``: the gradient of the last training
batch), then re-activates randomly chosen zero positions, at value 0, until the layer's sparsity
is ``p_up``. The bounds ``(p_low, p_up)`` change at epoch boundaries within a task.

>>> bounds(0, [0.75, 0.76, 0.75], [0.74, 0.75, 0.75], [5, 45]), bounds(45, [0.75, 0.76, 0.75], [0.74, 0.75, 0.75], [5, 45])
((0.75, 0.74), (0.75, 0.75))
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["bounds", "percentile", "prune_mask", "prune_and_grow"]


def bounds(epoch: int, lower: Sequence[float], upper: Sequence[float], boundaries: Sequence[int]) -> tuple[float, float]:
    """``(p_low, p_up)`` at ``epoch`` of a task: entry ``i`` = how many ``boundaries`` ``epoch`` reached."""
    index = sum(1 for boundary in boundaries if epoch >= boundary)
    return float(lower[index]), float(upper[index])


def percentile(values: torch.Tensor, q: float) -> torch.Tensor:
    """The ``q``-th percentile (0..100) of all entries, interpolated linearly between the two
    nearest ranks (NumPy's default), in float64; no size limit (two ``kthvalue`` calls)."""
    flat = values.flatten()
    position = q / 100.0 * (flat.numel() - 1)
    low = int(position)
    high = min(low + 1, flat.numel() - 1)
    a = flat.kthvalue(low + 1).values.double()
    b = flat.kthvalue(high + 1).values.double() if high != low else a
    t = position - low
    return a + (b - a) * t if t < 0.5 else b - (b - a) * (1 - t)


@torch.no_grad()
def prune_mask(weight: torch.Tensor, grad: torch.Tensor | None, grad_weight: float, sparsity: float) -> torch.Tensor:
    """Positions whose ``|w| + grad_weight·|g|`` (``|w|`` without a gradient) is strictly above the
    ``sparsity`` percentile of the layer."""
    importance = weight.abs()
    if grad is not None and grad_weight:
        importance = importance + grad_weight * grad.abs().to(importance.device, importance.dtype)
    return importance.double() > percentile(importance, sparsity * 100.0)


@torch.no_grad()
def prune_and_grow(weight: torch.Tensor, grad: torch.Tensor | None, grad_weight: float, p_low: float, p_up: float,
                   gen: torch.Generator) -> torch.Tensor:
    """The new mask of one layer: prune to ``p_low`` by importance, then grow random zero positions
    (by the weights after pruning) until the sparsity is ``p_up``. ``p_up == 0`` gives a dense
    mask; ``p_up == p_low`` grows nothing."""
    if p_up == 0:
        return torch.ones_like(weight, dtype=torch.bool)
    kept = prune_mask(weight, grad, grad_weight, p_low) & (weight != 0)  # zero weights count as pruned
    if p_up == p_low:
        return kept
    zeros = (~kept).flatten().nonzero().flatten()
    grow = int(len(zeros) - p_up * weight.numel())
    grow = max(0, min(grow, len(zeros)))
    mask = kept.flatten().clone()
    if grow:
        chosen = torch.randperm(len(zeros), generator=gen)[:grow].to(zeros.device)
        mask[zeros[chosen]] = True
    return mask.view_as(weight)
