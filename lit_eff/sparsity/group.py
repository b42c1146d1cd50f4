"""The masks of a technique's layers, for its per-step work as a few fused ops.

:class:`MaskGroup` holds each layer's module and :class:`~lit_eff.sparsity.parametrize.Mask`
and works on all of them with ``torch._foreach_*`` ops. Parameters are looked up when used,
never kept: ``fully_shard`` (FSDP2) replaces them after the group is built, and ``.to()``
replaces buffers. Sharded (FSDP2) weights, gradients and optimizer states are edited shard by
shard; masks are computed from the full weights (:mod:`lit_eff.sparsity.sharded`).

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

from lit_eff.kernels.nm_cpu import add_pruned_, nm_keep_
from lit_eff.sparsity.masks import nm_masks
from lit_eff.sparsity.parametrize import Mask, _report, get_parametrization, set_beta
from lit_eff.sparsity.sharded import full, is_sharded, local, local_part
from lit_eff.validation import check_nm


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


def _times_mask_(tensors: list[torch.Tensor], kept_minus_one: list[torch.Tensor]) -> None:
    """``x ⊙= E`` as ``x += x ⊙ (E − 1)``: exact (x − x = 0), one fused op."""
    torch._foreach_addcmul_(tensors, tensors, kept_minus_one)


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
        self.version = 0  # changes whenever set_masks writes masks
        self._seen_finite: tuple[list[int], list[bool | None]] = ([], [])  # weight versions, flags

    @property
    def weights(self) -> list[nn.Parameter]:
        """The dense weights as they are now (``DTensor`` shards under FSDP2)."""
        # module.parametrizations.weight.original, by dictionary lookups (a tenth of the time, once per step)
        return [module._modules["parametrizations"]._modules["weight"]._parameters["original"]
                for module in self.modules]

    @torch.no_grad()
    def full_weights(self) -> list[torch.Tensor]:
        """The whole dense weights (gathered under FSDP2: every rank must call it); read only."""
        return [full(w) for w in self.weights]

    def _local_kept_minus_one(self, like: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each mask's ``E − 1``, the part matching ``like`` (a shard under FSDP2)."""
        return [local_part(p.kept_minus_one, t) for p, t in zip(self.params, like)]

    # masks -------------------------------------------------------------------------------------
    def nm_masks(self, n: int, m: int) -> list[torch.Tensor]:
        """The N:M masks of the current dense weights, ranked in one batch."""
        return nm_masks(self.full_weights(), n, m, names=self.names)

    @torch.no_grad()
    def set_nm_masks(self, n: int, m: int) -> None:
        """Set every mask to the N:M mask of its current dense weight: ``set_masks(nm_masks(n, m))``,
        with plain float32 CPU weights going through :func:`lit_eff.kernels.nm_cpu.nm_keep_` (one
        pass over each weight, writing only the mask entries that change) and the rest through
        :func:`~lit_eff.sparsity.nm_masks`."""
        check_nm(n, m)
        weights = self.weights
        nonfinite = nm_keep_(weights, n, m, [p.mask for p in self.params], [p.kept_minus_one for p in self.params])
        rest = [i for i, count in enumerate(nonfinite) if count is None]
        if rest:
            masks = nm_masks([full(weights[i].detach()) for i in rest], n, m, names=[self.names[i] for i in rest])
            for i, mask in zip(rest, masks):
                self.params[i].mask.copy_(mask)
                self.params[i].set_values()
        self._masks_changed([n / m] * len(self.params))
        # what the kernel saw: finite() needs no pass of its own while these weights are unchanged
        self._seen_finite = ([w._version for w in weights], [None if c is None else c == 0 for c in nonfinite])

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
        kept_minus_one = [p.kept_minus_one for p in self.params]
        torch._foreach_copy_(kept_minus_one, masks)
        torch._foreach_sub_(kept_minus_one, 1)
        self._masks_changed(density if isinstance(density, list) else [density] * len(self.params))

    def _masks_changed(self, densities: list[float | None]) -> None:
        self.version += 1
        for module, p, d in zip(self.modules, self.params, densities):
            new = float(p.mask.count_nonzero()) / p.mask.numel() if d is None else float(d)
            if new != p._density:
                p._density = new
                p._settle()
                _report(module)

    def set_beta(self, beta: float) -> None:
        """β of every layer (only those whose β changes are touched)."""
        for module, p in zip(self.modules, self.params):
            if p._beta != beta:
                set_beta(module, beta)

    @torch.no_grad()
    def dense_values(self, enabled: bool) -> None:
        """While enabled, forward masks with all ones, so the weights' gradients are dense (RigL's
        growth criterion) at no recompilation. Only valid while the dense weights are zero at
        pruned positions: the forward value is then the same."""
        for p in self.params:
            if enabled:
                p.kept_minus_one.zero_()
            else:
                p.set_values()

    # per-step enforcement ------------------------------------------------------------------------
    @torch.no_grad()
    def mask_gradients(self) -> None:
        """Multiply each dense weight's gradient by its mask."""
        pairs = [(local(w.grad), local_part(p.kept_minus_one, w.grad))
                 for w, p in zip(self.weights, self.params) if w.grad is not None]
        _foreach(_times_mask_, [g for g, _ in pairs], [v for _, v in pairs])

    @torch.no_grad()
    def add_pruned_weights_to_grad(self, scale: float) -> None:
        """``grad += scale · (1 − E) ⊙ W`` for every layer (the SR-STE term); plain float32 CPU
        weights through :func:`lit_eff.kernels.nm_cpu.add_pruned_`, the rest in one fused op."""
        pairs = [(w, p) for w, p in zip(self.weights, self.params) if w.grad is not None]
        served = add_pruned_([w.grad for w, _ in pairs], [w for w, _ in pairs], [p.mask for _, p in pairs], scale)
        pairs = [(w, p.kept_minus_one) for (w, p), done in zip(pairs, served) if not done]
        if not pairs:
            return
        grads = [local(w.grad) for w, _ in pairs]
        dense = [local(w).to(g.dtype) for (w, _), g in zip(pairs, grads)]
        kept_minus_one = [local_part(v, w).to(g.dtype) for (w, v), g in zip(pairs, grads)]
        torch._foreach_addcmul_(grads, dense, kept_minus_one, value=-scale)  # −λ W (E − 1) = λ (1 − E) W

    @torch.no_grad()
    def zero_pruned(self, optimizers: Iterable[torch.optim.Optimizer] = ()) -> None:
        """Zero the dense weights at pruned positions, and every optimizer-state tensor of a
        weight's shape (momentum, Adam moments) for the optimizers given."""
        weights = self.weights
        values = self._local_kept_minus_one(weights)
        tensors = [local(w) for w in weights]
        by_id = {id(w): (w, v) for w, v in zip(weights, values)}
        for optimizer in optimizers:
            for param, state in optimizer.state.items():
                found = by_id.get(id(param))
                if found is None:
                    continue
                for item in state.values():
                    if isinstance(item, torch.Tensor) and item.shape == found[0].shape \
                            and is_sharded(item) == is_sharded(found[0]):
                        tensors.append(local(item))
                        values.append(found[1])
        _foreach(_times_mask_, tensors, values)

    @torch.no_grad()
    def finite(self) -> torch.Tensor:
        """A bool per layer: whether its dense weight (this rank's shard) is finite. One fused norm
        per (dtype, device), no device sync (read it later). The 2-norm is NaN or inf when an entry
        is; it also overflows for |w| > ~1e19, so confirm a flagged layer with :meth:`all_finite`."""
        weights = self.weights
        versions, seen = self._seen_finite
        if weights and None not in seen and versions == [w._version for w in weights]:  # as the kernel read them
            return torch.tensor(seen)  # (the kernel serves CPU weights only)
        shards = [local(w.detach()) for w in weights]
        if versions != [t._version for t in shards]:  # weights changed since the N:M kernel read them
            seen = [None] * len(shards)
        groups: dict[tuple, list[int]] = {}
        for i, t in enumerate(shards):
            if seen[i] is None:
                groups.setdefault((t.dtype, t.device), []).append(i)
        out = torch.tensor([bool(flag) for flag in seen], device=shards[0].device if shards else "cpu")
        for (dtype, _), members in groups.items():
            wide = torch.float32 if dtype in (torch.float16, torch.bfloat16) else None  # no fp16 overflow
            norms = torch._foreach_norm([shards[i] for i in members], 2, dtype=wide)
            out[members] = torch.stack(norms).isfinite().to(out.device)
        return out

    @torch.no_grad()
    def all_finite(self, index: int) -> bool:
        """Whether layer ``index``'s dense weight (this rank's shard) is all finite, exactly."""
        return bool(local(self.weights[index]).isfinite().all())
