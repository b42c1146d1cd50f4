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

from lit_eff.sparsity.parametrize import get_parametrization


def _dense(module: nn.Module) -> torch.Tensor:
    return module.parametrizations.weight.original


def _mask_values(module: nn.Module) -> torch.Tensor:
    return get_parametrization(module).mask_values


def _multiply(tensors: list[torch.Tensor], masks: list[torch.Tensor]) -> None:
    """``tensors[i] *= masks[i]`` in fused ``foreach`` calls (one per dtype/device group)."""
    if not tensors:
        return
    groups: dict[tuple, tuple[list, list]] = {}
    for tensor, mask in zip(tensors, masks):
        ts, ms = groups.setdefault((tensor.dtype, tensor.device), ([], []))
        ts.append(tensor)
        ms.append(mask if mask.dtype == tensor.dtype else mask.to(tensor.dtype))
    for ts, ms in groups.values():
        torch._foreach_mul_(ts, ms)


@torch.no_grad()
def mask_gradients(modules: Iterable[nn.Module]) -> None:
    """Multiply each masked module's dense-weight gradient by its mask."""
    pairs = [(grad, _mask_values(module)) for module in modules if (grad := _dense(module).grad) is not None]
    _multiply([g for g, _ in pairs], [m for _, m in pairs])


@torch.no_grad()
def zero_pruned(modules: Iterable[nn.Module], optimizers: Iterable[torch.optim.Optimizer] = ()) -> None:
    """Zero the dense weights of masked modules at pruned positions, and every optimizer-state
    tensor of the same shape (momentum, Adam moments)."""
    tensors, values, masks = [], [], {}
    for module in modules:
        weight, mask = _dense(module), _mask_values(module)
        tensors.append(weight)
        values.append(mask)
        masks[id(weight)] = mask
    for optimizer in optimizers:
        for param, state in optimizer.state.items():
            mask = masks.get(id(param))
            if mask is None:
                continue
            for value in state.values():
                if isinstance(value, torch.Tensor) and value.shape == mask.shape:
                    tensors.append(value)
                    values.append(mask)
    _multiply(tensors, values)
