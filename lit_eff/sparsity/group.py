"""The masks of a technique's layers, for its per-step work as a few fused ops.

A sparsity callback touches all its layers every optimizer step (new N:M masks, the SR-STE
term, masking gradients, zeroing pruned weights). Done layer by layer through module attribute
lookups, the Python overhead alone is a few percent of a small model's step; :class:`MaskGroup`
resolves each layer's dense weight and :class:`~lit_eff.sparsity.parametrize.Mask` once and
works on all of them with ``torch._foreach_*`` ops.

The group holds module, parameter and parametrization objects, never buffer tensors, so it stays
valid when the model moves between devices or dtypes (``.to()`` replaces buffers but keeps
those objects).

>>> layers = {"a": torch.nn.Linear(8, 4), "b": torch.nn.Linear(8, 4)}
>>> from lit_eff.sparsity import attach_mask
>>> _ = [attach_mask(layer) for layer in layers.values()]
>>> group = MaskGroup(layers)
>>> group.set_masks(group.nm_masks(2, 4), density=0.5)
>>> [int(p.mask.sum()) for p in group.params]
[16, 16]
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from lit_eff.sparsity.masks import nm_masks
from lit_eff.sparsity.parametrize import Mask, _report, get_parametrization, set_beta


def _foreach(op, tensors: list[torch.Tensor], others: list[torch.Tensor]) -> None:
    """``op(tensors, others)`` in one fused call per (dtype, device) group; ``others`` are cast
    to each tensor's dtype."""
    groups: dict[tuple, tuple[list, list]] = {}
    for tensor, other in zip(tensors, others):
        ts, os_ = groups.setdefault((tensor.dtype, tensor.device), ([], []))
        ts.append(tensor)
        os_.append(other if other.dtype == tensor.dtype else other.to(tensor.dtype))
    for ts, os_ in groups.values():
        op(ts, os_)


class MaskGroup:
    """Several masked layers (``{name: module}``, each with a lit_eff mask on ``weight``)."""

    def __init__(self, modules: Mapping[str, nn.Module]) -> None:
        self.names = list(modules)
        self.modules = list(modules.values())
        params = [get_parametrization(module) for module in self.modules]
        missing = [name for name, p in zip(self.names, params) if p is None]
        if missing:
            raise ValueError(f"Expected every layer of a MaskGroup to carry a lit_eff mask, got none on {missing}")
        self.params: list[Mask] = params  # type: ignore[assignment]
        self.weights: list[nn.Parameter] = [module.parametrizations.weight.original for module in self.modules]

    # masks -------------------------------------------------------------------------------------
    def nm_masks(self, n: int, m: int) -> list[torch.Tensor]:
        """The N:M masks of the current dense weights, ranked in one batch."""
        return nm_masks(self.weights, n, m, names=self.names)

    @torch.no_grad()
    def set_masks(self, masks: list[torch.Tensor], density: float | list[float | None] | None = None) -> None:
        """Copy ``masks`` (bool, one per layer, the weights' shapes) into the mask buffers.

        ``density`` (one for all layers, e.g. ``n / m``, or one per layer) saves counting them;
        ``None`` counts; ``1.0`` promises an all-ones mask.
        """
        if len(masks) != len(self.params):
            raise ValueError(f"Expected {len(self.params)} masks (one per layer), got {len(masks)}")
        for name, p, mask in zip(self.names, self.params, masks):
            if mask.shape != p.mask.shape or mask.dtype != torch.bool:
                raise ValueError(f"Expected a bool mask of shape {tuple(p.mask.shape)} for layer `{name}`, "
                                 f"got {mask.dtype} of shape {tuple(mask.shape)}")
        torch._foreach_copy_([p.mask for p in self.params], masks)
        torch._foreach_copy_([p.mask_values for p in self.params], masks)
        densities = density if isinstance(density, list) else [density] * len(self.params)
        for module, p, d in zip(self.modules, self.params, densities):
            new = float(p.mask.count_nonzero()) / p.mask.numel() if d is None else float(d)
            if new != p._density:
                p._density = new
                _report(module)

    def set_beta(self, beta: float) -> None:
        """β of every layer (only those whose β changes are touched)."""
        for module, p in zip(self.modules, self.params):
            if p._beta != beta:
                set_beta(module, beta)

    def pass_through(self, enabled: bool) -> None:
        """While enabled, forward reads the dense weights as they are, so their gradients are
        dense (RigL's growth criterion). Only valid while the dense weights are zero at pruned
        positions: the masked value is then the same."""
        for p in self.params:
            p.pass_through = enabled

    # per-step enforcement ------------------------------------------------------------------------
    @torch.no_grad()
    def mask_gradients(self) -> None:
        """Multiply each dense weight's gradient by its mask."""
        pairs = [(w.grad, p.mask_values) for w, p in zip(self.weights, self.params) if w.grad is not None]
        _foreach(torch._foreach_mul_, [g for g, _ in pairs], [v for _, v in pairs])

    @torch.no_grad()
    def add_pruned_weights_to_grad(self, scale: float) -> None:
        """``grad += scale · (1 − E) ⊙ W`` for every layer (the SR-STE term)."""
        pairs = [(w, p.mask_values) for w, p in zip(self.weights, self.params) if w.grad is not None]
        if not pairs:
            return
        grads = [w.grad for w, _ in pairs]
        weights = [w.detach().to(w.grad.dtype) for w, _ in pairs]
        pruned = torch._foreach_add(torch._foreach_neg([v.to(w.grad.dtype) for w, v in pairs]), 1.0)
        torch._foreach_addcmul_(grads, weights, pruned, value=scale)

    @torch.no_grad()
    def zero_pruned(self, optimizers: Iterable[torch.optim.Optimizer] = ()) -> None:
        """Zero the dense weights at pruned positions, and every optimizer-state tensor of a
        weight's shape (momentum, Adam moments) for the optimizers given."""
        tensors = list(self.weights)
        values = [p.mask_values for p in self.params]
        by_id = {id(w): v for w, v in zip(self.weights, values)}
        for optimizer in optimizers:
            for param, state in optimizer.state.items():
                value = by_id.get(id(param))
                if value is None:
                    continue
                for item in state.values():
                    if isinstance(item, torch.Tensor) and item.shape == value.shape:
                        tensors.append(item)
                        values.append(value)
        _foreach(torch._foreach_mul_, tensors, values)
