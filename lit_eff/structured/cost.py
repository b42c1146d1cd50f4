"""The FLOPs of a model as a function of how many members each prunable group keeps.

:func:`probe` runs the model once on meta tensors (no compute, no randomness consumed) under
:class:`lit_eff.flops.FlopTracker` and records the forward FLOPs of the whole model and of each
module whose cost scales with a group (an MLP, an attention, a convolution). Then

    FLOPs(f) / FLOPs_dense = (F_rest + Σ_m F_m · Π_{g touching m} f_g) / FLOPs_dense

with ``f_g`` the fraction of group ``g``'s dense members kept (a soft count in LAPP). A
convolution between two pruned groups (a Bottleneck's middle one) scales with both.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lit_eff.flops import FlopTracker
from lit_eff.structured.groups import Group

__all__ = ["CostModel", "probe", "uniform_ratio"]


@dataclass
class CostModel:
    """Forward FLOPs of the dense model and of the modules that scale with the groups."""

    dense: float
    terms: list[tuple[float, list[int]]] = field(default_factory=list)  # (FLOPs, indices of the groups)

    def ratio(self, fractions: list[Any]) -> Any:
        """FLOPs at kept fractions ``fractions[g]`` (floats or tensors) over the dense FLOPs."""
        rest = self.dense - sum(flops for flops, _ in self.terms)
        total = rest
        for flops, groups in self.terms:
            term = flops
            for g in groups:
                term = term * fractions[g]
            total = total + term
        return total / self.dense

    def state(self) -> dict[str, Any]:
        return {"dense": self.dense, "terms": [[flops, list(groups)] for flops, groups in self.terms]}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> CostModel:
        return cls(float(state["dense"]), [(float(f), [int(g) for g in gs]) for f, gs in state["terms"]])


def probe(module: nn.Module, example: Any, groups: list[Group]) -> CostModel:
    """Count ``module(example)``'s forward FLOPs on meta tensors (``example`` gives the shapes),
    in a separate thread so an active FLOP counter or compiler stance of the caller is not
    disturbed, and attribute them to the groups' cost modules."""
    result: list[Any] = []

    def work() -> None:
        try:
            result.append(_probe(module, example, groups))
        except BaseException as error:  # re-raised in the caller
            result.append(error)

    thread = threading.Thread(target=work, name="lit_eff-structured-probe")
    thread.start()
    thread.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


def _meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return torch.empty(value.shape, dtype=value.dtype, device="meta")
    if isinstance(value, (list, tuple)):
        return type(value)(_meta(v) for v in value)
    return value


def _probe(module: nn.Module, example: Any, groups: list[Group]) -> CostModel:
    owners: dict[int, tuple[nn.Module, list[int]]] = {}
    for index, group in enumerate(groups):
        for cost_module in group.cost_modules():
            owners.setdefault(id(cost_module), (cost_module, []))[1].append(index)
    tracker = FlopTracker()
    spent: dict[int, float] = {}
    starts: dict[int, list[int]] = {}

    def before(mod, args):
        starts.setdefault(id(mod), []).append(tracker.forward_executed)

    def after(mod, args, output):
        spent[id(mod)] = spent.get(id(mod), 0) + tracker.forward_executed - starts[id(mod)].pop()

    handles = [h for mod, _ in owners.values()
               for h in (mod.register_forward_pre_hook(before), mod.register_forward_hook(after))]
    state = {name: _meta(t) for name, t in [*module.named_parameters(), *module.named_buffers()]}
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with torch.no_grad(), torch.compiler.set_stance("force_eager"), tracker:
            torch.func.functional_call(module, state, (_meta(example),))
    finally:
        for sub, mode in modes:
            sub.training = mode
        for handle in handles:
            handle.remove()
    terms = [(float(spent.get(key, 0)), indices) for key, (_, indices) in owners.items()]
    return CostModel(float(tracker.forward_executed), terms)


def uniform_ratio(cost: CostModel, target: float, groups: list[Group], min_keep: int = 1) -> float:
    """The pruning ratio ``ρ`` that, removed from every group alike (``round(n·(1 − ρ))`` kept),
    brings the FLOPs ratio closest to ``target`` from above (bisection)."""
    def ratio_at(rho: float) -> float:
        return cost.ratio([max(min_keep, round(g.dense * (1 - rho))) / g.dense for g in groups])

    low, high = 0.0, 1.0
    for _ in range(50):
        mid = (low + high) / 2
        if ratio_at(mid) > target:
            low = mid
        else:
            high = mid
    return high if ratio_at(high) <= target + 1e-12 else low
