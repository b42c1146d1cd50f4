"""Keep pruned weights pruned: zero them in the dense weight, its gradient and its optimizer state.

Techniques whose pruned weights must never come back (gradual magnitude pruning, RigL between
updates) call :func:`mask_gradients` once per optimizer step before the step and
:func:`zero_pruned` after it, so weight decay, momentum and Adam moments cannot resurrect a
pruned position.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from lit_eff.sparsity.parametrize import get_mask


def _dense(module: nn.Module) -> torch.Tensor:
    return module.parametrizations.weight.original


@torch.no_grad()
def mask_gradients(modules: Iterable[nn.Module]) -> None:
    """Multiply each masked module's dense-weight gradient by its mask."""
    for module in modules:
        grad = _dense(module).grad
        if grad is not None:
            grad.mul_(get_mask(module))


@torch.no_grad()
def zero_pruned(modules: Iterable[nn.Module], optimizers: Iterable[torch.optim.Optimizer] = ()) -> None:
    """Zero the dense weights of masked modules at pruned positions, and every optimizer-state
    tensor of the same shape (momentum, Adam moments)."""
    masks: dict[int, torch.Tensor] = {}
    for module in modules:
        weight, mask = _dense(module), get_mask(module)
        weight.mul_(mask)
        masks[id(weight)] = mask
    for optimizer in optimizers:
        for param, state in optimizer.state.items():
            mask = masks.get(id(param))
            if mask is None:
                continue
            for value in state.values():
                if isinstance(value, torch.Tensor) and value.shape == mask.shape:
                    value.mul_(mask)
