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

from lit_eff.sparsity.group import MaskGroup


@torch.no_grad()
def mask_gradients(modules: Iterable[nn.Module]) -> None:
    """Multiply each masked module's dense-weight gradient by its mask."""
    MaskGroup({str(i): module for i, module in enumerate(modules)}).mask_gradients()


@torch.no_grad()
def zero_pruned(modules: Iterable[nn.Module], optimizers: Iterable[torch.optim.Optimizer] = ()) -> None:
    """Zero the dense weights of masked modules at pruned positions, and every optimizer-state
    tensor of the same shape (momentum, Adam moments)."""
    MaskGroup({str(i): module for i, module in enumerate(modules)}).zero_pruned(optimizers)
