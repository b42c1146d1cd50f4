"""LAPP's soft masks: one learnable threshold per group, ``m_j = σ((s_j − τ)/T)``.

``s_j`` is member ``j``'s importance divided by the group's largest (detached: the mask's
gradient reaches the threshold, not the weights), and ``τ = scale · θ`` with ``θ`` a model
parameter (so DDP averages its gradient and the optimizer steps it; ``scale`` sets how fast
an Adam-type optimizer moves the threshold). The mask multiplies the activations at the
group's mask site (the input of ``fc2``/``proj``, the BatchNorm output) through a forward hook.
"""

from __future__ import annotations

import torch
from torch import nn

from lit_eff.structured.groups import Group

__all__ = ["PruningGate", "attach_gates", "detach_gates", "gate_of", "scores", "soft_mask"]

class PruningGate(nn.Module):
    """The threshold ``τ = scale · θ`` of one group (``θ`` starts at 0)."""

    def __init__(self, scale: float, temperature: float) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(()))
        self.scale, self.temperature = float(scale), float(temperature)

    def threshold(self) -> torch.Tensor:
        return self.scale * self.theta

    def extra_repr(self) -> str:
        return f"scale={self.scale}, temperature={self.temperature}"


def gate_of(group: Group) -> PruningGate | None:
    gate = getattr(group.owner, group.gate_name, None)
    return gate if isinstance(gate, PruningGate) else None


def scores(group: Group, importance: str) -> torch.Tensor:
    """Detached importance of the group's present members: ``"l1"``/``"l2"`` group norms, or
    ``"bn"`` (|γ|, channel groups only)."""
    if importance == "bn":
        return group.bn_importance()
    return group.importance(1 if importance == "l1" else 2)


def soft_mask(group: Group, importance: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``σ((s/max s − τ)/T)`` for the group's present members (differentiable in ``θ``). In
    float64 a nearly saturated mask keeps a nonzero gradient (float32 rounds σ(20) to 1)."""
    gate = gate_of(group)
    s = scores(group, importance).to(dtype)
    s = s / s.max().clamp_min(1e-12)
    return torch.sigmoid((s - gate.threshold().to(dtype)) / gate.temperature)


def attach_gates(groups: list[Group], importance: dict[str, str], scale: float, temperature: float) -> list:
    """Add a :class:`PruningGate` to each group's owner (``<owner>.prune_gate``) and the hook
    that multiplies the group's activations by its soft mask; returns the hook handles."""
    handles = []
    for group in groups:
        if gate_of(group) is None:
            ref = next(group.owner.parameters())
            group.owner.add_module(group.gate_name, PruningGate(scale, temperature).to(ref.device))
        handles.append(_hook(group, importance[group.name]))
    return handles


def _hook(group: Group, importance: str):
    module, where = group.mask_site()
    if where == "input":
        def pre_hook(mod, args):
            mask = group.expand_mask(soft_mask(group, importance))
            return (args[0] * mask.to(args[0].dtype), *args[1:])
        return module.register_forward_pre_hook(pre_hook)

    def post_hook(mod, args, output):
        return output * group.expand_mask(soft_mask(group, importance)).to(output.dtype)
    return module.register_forward_hook(post_hook)


def detach_gates(groups: list[Group], handles: list) -> None:
    """Remove the hooks and the gates (their ``θ`` leaves the model)."""
    for handle in handles:
        handle.remove()
    handles.clear()
    for group in groups:
        name = group.gate_name
        if name in group.owner._modules:
            del group.owner._modules[name]
