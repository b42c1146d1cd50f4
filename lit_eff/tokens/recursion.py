"""Mixture-of-Recursions routing: a stack of shared blocks applied up to ``R`` times, each token
recursing as deep as its router says (Bae et al., 2025; docs/techniques/mixture_of_recursions.md).

- ``"expert"`` (expert-choice): recursion step ``r`` has a router ``Linear(dim, 1)``; of the
  tokens still active it keeps the top ``int(capacity[r] * T)`` (hierarchical filtering) and
  updates them by ``x + alpha * sigmoid(logit) * stack(x)``; a binary cross-entropy auxiliary
  loss teaches each logit whether its token was kept, so a causal model routes by ``logit > 0``
  at evaluation and in ``generate()`` (``eval_routing="threshold"``).
- ``"token"`` (token-choice): one router ``Linear(dim, R)`` gives each token its depth up front
  (top-1); a token of depth ``d`` ends as ``x + p_d * stack^(d+1)(x)``; balancing and z-losses.
- ``"none"``: every token through every recursion (a plain recursive transformer).

Active tokens are gathered in order (:mod:`lit_eff.tokens.select`), so at each step they attend
to the earlier tokens active at that step; a batch whose sequences keep different counts is
padded at the end with inactive tokens whose outputs are discarded. Router losses reach the
routers through :class:`~lit_eff.tokens.skip._AddAuxLoss` (no change to the training step).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lit_eff import validation
from lit_eff.tokens.select import gather_tokens, scatter_tokens, selected_first, topk_sorted
from lit_eff.tokens.skip import _AddAuxLoss

__all__ = ["Recursion", "RecursionStats", "make_routers", "recurse"]

_SHARING = ("middle_cycle", "cycle")
_ROUTING = ("expert", "token", "none")
_FUNCS = {"expert": ("sigmoid", "tanh"), "token": ("softmax", "sigmoid"), "none": (None,)}
_DEFAULTS = {  # the official configurations: (router_func, alpha, z_loss_weight)
    "expert": ("sigmoid", 0.1, 0.0), "token": ("softmax", 1.0, 1e-5), "none": (None, 1.0, 0.0)}

Stack = Callable[[torch.Tensor, int], torch.Tensor]


@dataclass
class Recursion:
    """Mixture-of-Recursions settings of a :class:`~lit_eff.models.GPT` (``n_layer`` is the depth
    of the equivalent vanilla model). ``None`` fields take the paper's defaults for ``routing``.

    Example::

        model:
          class_path: lit_eff.models.CausalLM
          init_args:
            n_layer: 6
            recursion: {recursions: 2, sharing: middle_cycle, routing: expert}
    """

    recursions: int = 2
    sharing: Literal["middle_cycle", "cycle"] = "middle_cycle"
    routing: Literal["expert", "token", "none"] = "expert"
    capacity: list[float] | None = None
    router_func: Literal["sigmoid", "tanh", "softmax"] | None = None
    alpha: float | None = None
    aux_loss_weight: float = 0.001
    balance_loss_weight: float = 0.1
    z_loss_weight: float | None = None
    eval_routing: Literal["threshold", "topk"] = "threshold"

    def __post_init__(self) -> None:
        validation.check_int("recursions", self.recursions, minimum=2)
        validation.check_choice("sharing", self.sharing, _SHARING)
        validation.check_choice("routing", self.routing, _ROUTING)
        validation.check_choice("eval_routing", self.eval_routing, ("threshold", "topk"))
        func, alpha, z_weight = _DEFAULTS[self.routing]
        self.router_func = func if self.router_func is None else self.router_func
        if self.router_func not in _FUNCS[self.routing]:
            raise ValueError(f"Expected `router_func` in {list(_FUNCS[self.routing])} with routing={self.routing!r}, "
                             f"got router_func={self.router_func!r}")
        self.alpha = validation.check_number("alpha", alpha if self.alpha is None else self.alpha, 0.0, low_open=True)
        self.aux_loss_weight = validation.check_number("aux_loss_weight", self.aux_loss_weight, 0.0)
        self.balance_loss_weight = validation.check_number("balance_loss_weight", self.balance_loss_weight, 0.0)
        self.z_loss_weight = validation.check_number("z_loss_weight", z_weight if self.z_loss_weight is None
                                                     else self.z_loss_weight, 0.0)
        if self.capacity is None:  # the paper's default: (R - r) / R
            self.capacity = [(self.recursions - r) / self.recursions for r in range(self.recursions)]
        if isinstance(self.capacity, (str, bytes)) or not isinstance(self.capacity, (list, tuple)) \
                or len(self.capacity) != self.recursions:
            raise ValueError(f"Expected `capacity` to be a list of {self.recursions} fractions (one per recursion), "
                             f"got capacity={self.capacity!r}")
        self.capacity = [validation.check_fraction("capacity", c, low_open=True) for c in self.capacity]
        if any(b > a for a, b in zip(self.capacity, self.capacity[1:])):
            raise ValueError(f"Expected `capacity` in non-increasing order (a token recurses only while it stays "
                             f"routed), got capacity={self.capacity}")

    def layout(self, n_layer: int) -> tuple[int, int, int]:
        """``(first, shared, last)``: unique blocks before the recursion, shared blocks applied
        ``recursions`` times, unique blocks after it, for a vanilla depth of ``n_layer``."""
        edges = 2 if self.sharing == "middle_cycle" else 0
        middle = n_layer - edges
        if middle < self.recursions or middle % self.recursions:
            what = "n_layer - 2 (the first and last blocks are not shared)" if edges else "n_layer"
            raise ValueError(f"Expected `recursions` to divide {what} with sharing={self.sharing!r}, got "
                             f"n_layer={n_layer}, recursions={self.recursions}")
        return edges // 2, middle // self.recursions, edges // 2

    @property
    def routed(self) -> bool:
        return self.routing != "none"

    @property
    def dynamic(self) -> bool:
        """Training shapes depend on the data (token-choice picks depths freely)."""
        return self.routing == "token"


class RecursionStats:
    """What the last forward measured (tensors: no device sync), and the router-loss scale the
    training loop sets (``1 / accumulate_grad_batches``)."""

    def __init__(self) -> None:
        self.aux_scale = 1.0
        self.aux_loss: torch.Tensor | float = 0.0
        self.processed: torch.Tensor | None = None  # [R]: share of the tokens each step processed


def make_routers(settings: Recursion, dim: int) -> nn.ModuleList:
    """Expert-choice: one ``Linear(dim, 1)`` per recursion; token-choice: one ``Linear(dim, R)``
    (no bias, as the official routers)."""
    if settings.routing == "expert":
        return nn.ModuleList(nn.Linear(dim, 1, bias=False) for _ in range(settings.recursions))
    if settings.routing == "token":
        return nn.ModuleList([nn.Linear(dim, settings.recursions, bias=False)])
    return nn.ModuleList()


def recurse(x: torch.Tensor, stack: Stack, routers: nn.ModuleList, s: Recursion, stats: RecursionStats,
            training: bool, every_step: bool = True) -> torch.Tensor:
    """``x`` after the recursion steps; ``stack(h, r)`` runs the shared blocks on ``h`` at step ``r``.
    ``every_step``: run each step even when no token takes it (on one padding token whose output
    is discarded), so sharded blocks gather on every rank alike; ``False`` when decoding with a
    KV cache, which must hold only the tokens that took a step."""
    aux_on = training and torch.is_grad_enabled() and stats.aux_scale > 0
    if s.routing == "none":
        for r in range(s.recursions):
            x = stack(x, r)
        stats.processed = x.new_ones(s.recursions, dtype=torch.float32)
        return x
    if s.routing == "token":
        x, aux = token_choice(x, stack, routers[0], s, stats, aux_on, every_step)
    elif training or s.eval_routing == "topk":
        x, aux = expert_choice(x, stack, routers, s, stats, aux_on)
    else:
        return expert_choice_causal(x, stack, routers, s, stats, every_step)
    if aux is not None:
        stats.aux_loss = aux.detach()
        x = _AddAuxLoss.apply(x, aux, stats.aux_scale)
    return x


def _gate(logits: torch.Tensor, s: Recursion) -> torch.Tensor:
    return s.alpha * (torch.tanh(logits) if s.router_func == "tanh" else torch.sigmoid(logits))


def expert_choice(x: torch.Tensor, stack: Stack, routers: nn.ModuleList, s: Recursion, stats: RecursionStats,
                  aux_on: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Training-time (and ``"topk"``) expert-choice: step ``r`` keeps the top ``int(capacity[r] *
    T)`` of the tokens the previous step kept, by its router's logit."""
    tokens = x.shape[1]
    active: torch.Tensor | None = None  # positions of the tokens still recursing (None: all)
    aux = x.new_zeros((), dtype=torch.float32) if aux_on else None
    processed = []
    for r, router in enumerate(routers):
        h = x if active is None else gather_tokens(x, active)
        logits = router(h).squeeze(-1).float()  # B, K
        k = min(h.shape[1], max(1, int(s.capacity[r] * tokens)))
        chosen = topk_sorted(logits.detach(), k)
        kept = chosen if active is None else active.gather(1, chosen)
        inputs = gather_tokens(x, kept)
        weight = _gate(logits.gather(1, chosen), s).unsqueeze(-1)
        x = scatter_tokens(x, kept, inputs + weight.to(inputs.dtype) * stack(inputs, r))
        if aux is not None:
            target = torch.zeros_like(logits).scatter_(1, chosen, 1.0)
            aux = aux + s.aux_loss_weight * F.binary_cross_entropy_with_logits(logits, target)
            if s.z_loss_weight:
                aux = aux + s.z_loss_weight * logits.square().mean()
        processed.append(x.new_full((), k / tokens, dtype=torch.float32))
        active = kept
    stats.processed = torch.stack(processed)
    return x, aux


def expert_choice_causal(x: torch.Tensor, stack: Stack, routers: nn.ModuleList, s: Recursion,
                         stats: RecursionStats, every_step: bool = True) -> torch.Tensor:
    """Evaluation routing without future information: a token takes step ``r`` when it took
    step ``r - 1`` and its router logit is > 0 (every active token at a capacity of 1)."""
    batch, tokens = x.shape[:2]
    alive = torch.ones(batch, tokens, dtype=torch.bool, device=x.device)
    processed = []
    for r, router in enumerate(routers):
        logits = router(x).squeeze(-1).float()  # every token: the router is per token
        if s.capacity[r] < 1.0:
            alive = alive & (logits > 0)
        processed.append(alive.float().mean())
        chosen, valid = selected_first(alive, minimum=int(every_step))
        if chosen.shape[1] == 0:  # no token goes deeper
            processed += [processed[-1]] * (s.recursions - r - 1)
            break
        inputs = gather_tokens(x, chosen)
        weight = (_gate(logits.gather(1, chosen), s) * valid).unsqueeze(-1)
        x = scatter_tokens(x, chosen, inputs + weight.to(inputs.dtype) * stack(inputs, r))
    stats.processed = torch.stack(processed)
    return x


def _take(x: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    if index is None:
        return x
    return gather_tokens(x, index) if x.dim() == 3 else x.gather(1, index)


def _put(x: torch.Tensor, index: torch.Tensor | None, values: torch.Tensor) -> torch.Tensor:
    return values.to(x.dtype) if index is None else scatter_tokens(x, index, values)


def token_choice(x: torch.Tensor, stack: Stack, router: nn.Linear, s: Recursion, stats: RecursionStats,
                 aux_on: bool, every_step: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each token picks its depth ``d`` (top-1 of its router); the tokens of depth >= ``r`` run
    step ``r``; a token ends as ``x + p_d * h`` with ``h`` its state after step ``d``."""
    recursions = s.recursions
    logits = router(x).float()  # B, T, R
    probs = s.alpha * (torch.softmax(logits, dim=-1) if s.router_func == "softmax" else torch.sigmoid(logits))
    depth = probs.detach().argmax(dim=-1)  # B, T
    weight = probs.gather(-1, depth.unsqueeze(-1)).squeeze(-1)
    final, h = x, x
    processed = []
    for r in range(recursions):
        selected = depth >= r
        processed.append(selected.float().mean())
        if r == 0:
            chosen, valid = None, None  # every token takes the first step
        else:
            chosen, valid = selected_first(selected, minimum=int(every_step))
            if chosen.shape[1] == 0:
                processed += [processed[-1]] * (recursions - r - 1)
                break
        inputs = _take(h, chosen)
        out = stack(inputs, r)
        d = _take(depth, chosen)
        done, more = d == r, d > r
        if valid is not None:
            done, more = done & valid, more & valid
        ended = _take(x, chosen) + _take(weight, chosen).unsqueeze(-1).to(out.dtype) * out
        final = _put(final, chosen, torch.where(done.unsqueeze(-1), ended, _take(final, chosen)))
        h = _put(h, chosen, torch.where(more.unsqueeze(-1), out, inputs))
    stats.processed = torch.stack(processed)
    if not aux_on:
        return final, None
    share = probs.mean(dim=(0, 1))  # P_i
    picked = recursions * F.one_hot(depth, recursions).float().mean(dim=(0, 1))  # f_i
    aux = s.balance_loss_weight * (share * picked).sum()
    if s.z_loss_weight:
        aux = aux + s.z_loss_weight * torch.logsumexp(logits, dim=-1).square().mean()
    return final, aux
