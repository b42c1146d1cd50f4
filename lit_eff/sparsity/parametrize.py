"""The masking mechanism: in forward, ``module.weight`` is ``W ⊙ (E + β(1−E))``.

``W`` is the dense weight (the parameter the optimizer updates), ``E`` a boolean mask buffer and
``β`` a scalar buffer: the value pruned positions are scaled by (0 for a plain mask; decaying
from 1 to 0 for mask decay). By default the gradient is straight-through: the gradient of the
effective weight reaches every entry of ``W``, pruned ones included (STE, SR-STE, mask decay
need that); ``ste=False`` gives the plain masked gradient instead.

>>> from lit_eff.sparsity import attach_mask, export, nm_mask
>>> layer = torch.nn.Linear(8, 4)
>>> _ = attach_mask(layer, mask=nm_mask(layer.weight, 2, 4))
>>> int((layer.weight != 0).sum())      # what forward uses: 2 of every 4
16
>>> sorted(layer.state_dict())
['bias', 'parametrizations.weight.0.beta', 'parametrizations.weight.0.mask', 'parametrizations.weight.original']
>>> _ = export(layer)                    # plain Linear again, weight = the masked weight
>>> sorted(layer.state_dict()), int((layer.weight != 0).sum())
(['bias', 'weight'], 16)

It is a ``torch.nn.utils.parametrize`` parametrization, so ``module.weight`` is the effective
weight everywhere (tied or functional uses, monitors, export, FLOP counting); the dense weight
stays the same ``Parameter`` object (optimizers built before or after keep working); masks and
``β`` are buffers, so ``state_dict``, ``.to()`` and DDP carry them.

- **State-dict keys change**: ``fc1.parametrizations.weight.original`` (``W``),
  ``fc1.parametrizations.weight.0.mask`` (``E``) and ``...0.beta`` (``β``) replace
  ``fc1.weight``. Such a state dict loads into a model masked at the same layers; for a plain
  model use :func:`export` or :func:`harden_state_dict`.
- **torch.compile**: forward reads only buffers and :attr:`Mask.mode` (``"identity"`` for an
  all-ones mask, ``"binary"`` for β = 0, ``"scaled"`` otherwise), which changes only when a
  mask becomes or stops being all ones, or β becomes or stops being 0: new masks and new β
  values need no recompilation.
- **FSDP2**: the mask stays a full buffer; under ``fully_shard`` forward sees the gathered
  weight, and reading ``module.weight`` outside forward returns a sharded effective weight.
- The module's class is swapped for a generated subclass of that instance only (restored by
  :func:`export`); parametrized modules cannot be pickled, so attach after processes are spawned.

Masked modules report their density to :func:`lit_eff.flops.set_density` (``β > 0`` counts as
dense: pruned weights still take part), refreshed on ``load_state_dict``; export clears it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize

from lit_eff.flops import clear_density, set_density
from lit_eff.sparsity.sharded import DTensor, is_sharded, local_part

__all__ = [
    "Mask",
    "attach_mask",
    "effective_weight",
    "export",
    "get_mask",
    "get_parametrization",
    "harden_state_dict",
    "has_mask",
    "masked_modules",
    "remove_mask",
    "set_beta",
    "set_mask",
]


_ORIGINAL_KEY = re.compile(r"^(.*\.)?parametrizations\.([^.]+)\.original$")


class Mask(nn.Module):
    """The parametrization: ``forward(W) = W ⊙ (E + β(1−E))`` with buffers ``mask`` and ``beta``.

    Use :func:`attach_mask`, :func:`set_mask` and :func:`set_beta` rather than editing the
    buffers, so that :attr:`mode` and the density reported for FLOP counting stay right.

    The straight-through weight is ``W + stop_grad(W) ⊙ (E − 1)``: one fused multiply-add whose
    value is exactly ``W ⊙ E`` and whose gradient reaches ``W`` unchanged (no work in backward).
    """

    def __init__(self, mask: torch.Tensor, beta: float = 0.0, ste: bool = True) -> None:
        super().__init__()
        self.register_buffer("mask", mask)
        self.register_buffer("beta", torch.tensor(float(beta), device=mask.device))
        # E − 1 (0 kept, −1 pruned) in the weight's dtype: masking is one fused multiply-add,
        # x + x(E − 1) = x ⊙ E (forward, gradients, optimizer state), and so is the SR-STE term
        self.register_buffer("kept_minus_one", mask.float() - 1, persistent=False)
        self.ste = ste
        self._beta = float(beta)  # host copies: reporting a density or choosing a mode needs no sync
        self._density = _mask_density(mask)
        self._order: list[str] = []
        self.mode = "identity"
        self._settle()

    def _settle(self) -> None:
        """Choose what forward computes from the host copies (the only Python state it reads)."""
        self.mode = "identity" if self._density == 1.0 else "scaled" if self._beta > 0 else "binary"

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.mode == "identity":  # an all-ones mask
            return weight
        if is_sharded(weight):  # `module.weight` read outside FSDP2's forward: mask this rank's shard
            out = self._masked(weight.to_local(), local_part(self.mask, weight), local_part(self.kept_minus_one, weight))
            return DTensor.from_local(out, weight.device_mesh, weight.placements, shape=weight.shape,
                                      stride=weight.stride())
        return self._masked(weight, self.mask, self.kept_minus_one)

    def _masked(self, weight: torch.Tensor, mask: torch.Tensor, kept_minus_one: torch.Tensor) -> torch.Tensor:
        binary = self.mode == "binary"
        if not self.ste:  # W + W(E − 1) = W ⊙ E, and so is the gradient
            return torch.addcmul(weight, weight, kept_minus_one) if binary else \
                torch.where(mask, weight, weight * self.beta)
        dense = weight.detach()
        if binary:  # W + stop_grad(W)(E − 1): exactly W ⊙ E (w − w = 0), gradient straight to W
            return torch.addcmul(weight, dense, kept_minus_one)
        return torch.where(mask, dense, dense * self.beta) + (weight - dense)

    @torch.no_grad()
    def set_values(self) -> None:
        """Refresh the numeric copy of the mask (``kept_minus_one``)."""
        self.kept_minus_one.copy_(self.mask).sub_(1)

    def right_inverse(self, value: torch.Tensor) -> torch.Tensor:
        # `module.weight = value` sets the dense weight
        return value

    def extra_repr(self) -> str:
        return f"shape={tuple(self.mask.shape)}, ste={self.ste}, mode={self.mode}"


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _describe(module: nn.Module) -> str:
    return type(module).__name__.removeprefix("Parametrized")


def get_parametrization(module: nn.Module, name: str = "weight") -> Mask | None:
    """The :class:`Mask` on ``module.<name>``, or ``None``."""
    if not parametrize.is_parametrized(module, name):
        return None
    return next((p for p in module.parametrizations[name] if isinstance(p, Mask)), None)


def _require(module: nn.Module, name: str) -> Mask:
    found = get_parametrization(module, name)
    if found is None:
        raise ValueError(f"{_describe(module)} has no lit_eff mask on `{name}`; call attach_mask first")
    return found


def _as_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    mask = torch.as_tensor(mask)
    if tuple(mask.shape) != tuple(like.shape):
        raise ValueError(f"Expected a mask of shape {tuple(like.shape)}, got shape {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        if ((mask != 0) & (mask != 1)).any():
            raise ValueError("Expected a binary mask (bool, or only 0 and 1), got other values; "
                             "scale pruned weights with `beta` instead")
        mask = mask != 0
    return mask.to(like.device)


def _check_beta(beta: float) -> None:
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"Expected `beta` in [0, 1], got beta={beta}")


def _masks_of(module: nn.Module) -> list[Mask]:
    if not parametrize.is_parametrized(module):
        return []
    return [p for name in module.parametrizations.keys() if (p := get_parametrization(module, name)) is not None]


def _report(module: nn.Module) -> None:
    """Tell the FLOP counter the module's density (size-weighted over its masks)."""
    masks = _masks_of(module)
    if not masks:
        clear_density(module)
        return
    total = sum(p.mask.numel() for p in masks)
    kept = sum((1.0 if p._beta > 0 else p._density) * p.mask.numel() for p in masks)
    set_density(module, kept / total if total else 1.0)


def _refresh_after_load(module: nn.Module, incompatible_keys) -> None:
    """``load_state_dict`` post-hook: loaded masks and β change the density to report (and
    whether forward can skip the mask: a density of 1 means nothing is pruned)."""
    for p in _masks_of(module):
        p._beta = float(p.beta)
        p._density = _mask_density(p.mask)
        p.set_values()
        p._settle()
    _report(module)


def _mask_density(mask: torch.Tensor) -> float:
    return float(mask.count_nonzero()) / mask.numel() if mask.numel() else 1.0


# ---------------------------------------------------------------------------------------------
# public functions
# ---------------------------------------------------------------------------------------------
def attach_mask(module: nn.Module, name: str = "weight", mask: torch.Tensor | None = None, *, beta: float = 0.0,
                ste: bool = True, density: float | None = None) -> Mask:
    """Mask ``module.<name>``: from now on it reads ``W ⊙ (E + β(1−E))``.

    ``mask`` is boolean (or 0/1) with the weight's shape; ``None`` starts dense. ``ste=True``
    passes gradients straight through to all of ``W``. ``density``, if known (N:M gives
    ``n / m``), saves counting the mask; ``density=1`` promises an all-ones mask, and forward
    then returns ``W`` without masking work. Returns the :class:`Mask` parametrization.
    """
    if get_parametrization(module, name) is not None:
        raise ValueError(f"{_describe(module)}.{name} already has a lit_eff mask; a weight takes one "
                         "sparsity technique (remove_mask first)")
    if parametrize.is_parametrized(module, name):
        others = ", ".join(type(p).__name__ for p in module.parametrizations[name])
        raise ValueError(f"{_describe(module)}.{name} is already parametrized by {others}; "
                         "a lit_eff mask must be its only parametrization")
    weight = getattr(module, name, None)
    if not isinstance(weight, nn.Parameter):
        raise ValueError(f"Expected `{name}` to be a parameter of {_describe(module)}, got {type(weight).__name__}")
    _check_beta(beta)
    mask = torch.ones(weight.shape, dtype=torch.bool, device=weight.device) if mask is None else _as_mask(mask, weight)
    param = Mask(mask.clone(), beta, ste)
    param.kept_minus_one = param.kept_minus_one.to(weight.dtype)
    param._order = list(module._parameters)  # export puts the weight back in its place
    parametrize.register_parametrization(module, name, param, unsafe=True)
    if _refresh_after_load not in module._load_state_dict_post_hooks.values():
        module.register_load_state_dict_post_hook(_refresh_after_load)
    param._density = _mask_density(param.mask) if density is None else float(density)
    param._settle()
    _report(module)
    return param


def has_mask(module: nn.Module, name: str = "weight") -> bool:
    """Whether ``module.<name>`` carries a lit_eff mask."""
    return get_parametrization(module, name) is not None


def get_mask(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """The mask buffer itself (bool; change it with :func:`set_mask`)."""
    return _require(module, name).mask


def set_mask(module: nn.Module, mask: torch.Tensor, name: str = "weight", density: float | None = None) -> None:
    """Copy ``mask`` into the existing buffer (same tensor, device and state-dict entry).

    ``density``, if known, saves counting the mask (a device sync on GPU); ``density=1``
    promises an all-ones mask, and forward then returns ``W`` without masking work.
    """
    param = _require(module, name)
    param.mask.copy_(_as_mask(mask, param.mask))
    param.set_values()
    param._density = _mask_density(param.mask) if density is None else float(density)
    param._settle()
    _report(module)


def set_beta(module: nn.Module, beta: float, name: str = "weight") -> None:
    """Set the scale of pruned weights (``0``: plain mask; ``1``: dense forward)."""
    _check_beta(beta)
    param = _require(module, name)
    param.beta.fill_(beta)
    param._beta = float(beta)
    param._settle()
    _report(module)


def remove_mask(module: nn.Module, name: str = "weight", harden: bool = True) -> None:
    """Remove the mask; ``harden=True`` leaves the effective weight, ``False`` the dense one.

    The weight stays the same ``Parameter`` object (so optimizers keep working) and returns to
    its original place among the module's parameters (``state_dict`` order as before masking).
    """
    order = _require(module, name)._order
    parametrize.remove_parametrizations(module, name, leave_parametrized=harden)
    params = module._parameters
    items = sorted(params.items(), key=lambda item: order.index(item[0]) if item[0] in order else len(order))
    params.clear()
    params.update(items)
    if not _masks_of(module):
        hooks = module._load_state_dict_post_hooks
        for key in [k for k, hook in hooks.items() if hook is _refresh_after_load]:
            del hooks[key]
    _report(module)


@torch.no_grad()
def effective_weight(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """The whole effective weight ``W ⊙ (E + β(1−E))`` of a masked module, gathered if FSDP2
    shards it (then every rank must call it)."""
    from lit_eff.sparsity.sharded import full

    return _require(module, name)(full(module.parametrizations[name].original)).detach()


def masked_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The modules of ``model`` that carry a lit_eff mask, by name (without compile wrappers)."""
    from lit_eff.models.naming import named_modules  # (lit_eff.models imports lit_eff.sparsity)

    return {name: module for name, module in named_modules(model) if _masks_of(module)}


def export(model: nn.Module) -> nn.Module:
    """Harden every mask into a plain weight and remove the machinery (in place; returns ``model``).

    Afterwards ``model.state_dict()`` has the keys of the unmasked model, and each weight equals
    the effective weight forward used (``W ⊙ (E + β(1−E))``).
    """
    for module in masked_modules(model).values():
        for name in list(module.parametrizations.keys()):
            if has_mask(module, name):
                remove_mask(module, name, harden=True)
    return model


def harden_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A masked model's state dict as the plain model's: ``<m>.weight = W ⊙ (E + β(1−E))``.

    For loading a checkpoint written with masks into a model without them.
    """
    out = dict(state_dict)
    for key in state_dict:
        found = _ORIGINAL_KEY.match(key)
        if found is None:
            continue
        prefix, tensor_name = found.group(1) or "", found.group(2)
        base = f"{prefix}parametrizations.{tensor_name}"
        if f"{base}.0.mask" not in state_dict:
            continue
        weight, mask = state_dict[key], state_dict[f"{base}.0.mask"].to(state_dict[key].device)
        beta = state_dict.get(f"{base}.0.beta", torch.tensor(0.0)).to(weight.device)
        out[f"{prefix}{tensor_name}"] = torch.where(mask, weight, weight * beta)
        for suffix in (".original", ".0.mask", ".0.beta"):
            out.pop(base + suffix, None)
    return out
