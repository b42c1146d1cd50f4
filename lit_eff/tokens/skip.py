"""Token skipping: chosen blocks process a subset of the tokens; the others pass through
unchanged, in place (ALGORITHMS.md §7.2 random-LTD, §7.3 Mixture-of-Depths).

A skipping block gathers its kept tokens in their original order (prefix tokens always kept),
runs on them, and scatters the results back; skipped tokens keep their values and positions
(positions live in the hidden states). In a causal model the block's causal attention over the
gathered sequence is exactly "kept tokens attend to kept earlier tokens".

- ``"ltd"`` (random-LTD): a random subset per block and sample, in training only; the kept
  count follows the callback's schedule. Draws come from :func:`lit_eff.seeding.generator`
  keyed by the step, so every DDP rank makes the same choice.
- ``"mod"`` (Mixture-of-Depths): a router ``Linear(dim, 1)`` per block scores the tokens; the
  top ``capacity`` fraction per sequence is processed and its block update is scaled by
  ``sigmoid(router logit)``, which gives the router its gradient. Top-k over the sequence looks
  at future tokens, so causal models route by ``sigmoid(logit) > 0.5`` at evaluation, a
  per-token decision trained by a binary cross-entropy auxiliary loss (target: was the token in
  the training top-k); evaluation then uses no future tokens (and ``generate()`` stays causal).

:func:`attach_skip` replaces ``forward`` on the block *instances*; ``.remove()`` restores them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lit_eff.seeding import generator
from lit_eff.tokens.adapters import TokenAdapter
from lit_eff.tokens.select import gather_tokens, scatter_tokens, topk_sorted

__all__ = ["ROUTER_NAME", "TokenSkipper", "attach_skip", "add_routers"]

ROUTER_NAME = "token_router"


class _AddAuxLoss(torch.autograd.Function):
    """Identity on ``x``; backward adds ``d(scale * aux)/d(params)`` to the graph of ``aux``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, aux: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        ctx.aux_shape, ctx.aux_dtype = aux.shape, aux.dtype
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, torch.full(ctx.aux_shape, ctx.scale, dtype=ctx.aux_dtype, device=grad.device), None


def add_routers(adapter: TokenAdapter, blocks: Sequence[int]) -> None:
    """Register a ``token_router`` ``Linear(dim, 1)`` on each of ``blocks`` (kept if present)."""
    if adapter.dim is None:
        raise ValueError(f"method='mod' needs the token width of {type(adapter.model).__name__} (adapter.dim)")
    for index in blocks:
        block = adapter.blocks[index]
        if not isinstance(getattr(block, ROUTER_NAME, None), nn.Linear):
            ref = next(block.parameters())
            router = nn.Linear(adapter.dim, 1, device=ref.device, dtype=ref.dtype)
            nn.init.normal_(router.weight, std=0.02)
            nn.init.zeros_(router.bias)
            block.add_module(ROUTER_NAME, router)


class TokenSkipper:
    """The attached skipping machinery of one model; the callback sets ``keep`` and ``keys``.

    Attributes:
        keep: fraction of the (non-prefix) tokens each skipping block processes (``"ltd"``).
        capacity: fraction routed through each block (``"mod"``).
        eval_routing: ``"topk"`` or ``"threshold"`` routing at evaluation (``"mod"``).
        keys: seed keys of the random choice (``(run_seed, step, batch)``).
        aux_scale: weight of the router loss gradient (``"mod"``), set per step.
        processed: tokens processed by each skipping block in the last forward, over its input.
        layer_tokens: tokens that entered a block's computation during training (running total).
        aux_loss: the last router loss (``"mod"``), ``router_fraction``: share of tokens with
            ``sigmoid(logit) > 0.5`` in the last forward (what threshold routing would process).
        last_choice: a fingerprint of the last random choice (equal on every DDP rank).
    """

    def __init__(self, adapter: TokenAdapter, blocks: Sequence[int], method: str = "ltd", keep: float = 0.5,
                 capacity: float = 0.125, eval_routing: str = "auto", multiple_of: int = 1,
                 name: str = "token_skip") -> None:
        self.adapter = adapter
        self.blocks = list(blocks)
        self.method = method
        self.keep = float(keep)
        self.capacity = float(capacity)
        self.eval_routing = ("threshold" if adapter.causal else "topk") if eval_routing == "auto" else eval_routing
        self.multiple_of = int(multiple_of)
        self.name = name
        self.keys: tuple = (0,)
        self.aux_scale = 0.01
        self.processed = [1.0] * len(self.blocks)
        self.layer_tokens = 0
        self.aux_loss = 0.0
        self.router_fraction = 0.0
        self.last_choice = 0
        if method == "mod":
            add_routers(adapter, self.blocks)
        self._skipping = {id(adapter.blocks[i]) for i in self.blocks}
        self.dense_layer_tokens = 0
        self._handles = [block.register_forward_pre_hook(self._count(i)) for i, block in enumerate(adapter.blocks)]
        for position, index in enumerate(self.blocks):
            block = adapter.blocks[index]
            if "forward" in block.__dict__:
                raise ValueError(f"block {index} ({type(block).__name__}) already has its forward replaced by "
                                 "another technique")
            block.forward = self._forward(block, index, position, block.forward)

    def _count(self, index: int):
        def hook(block: nn.Module, args: tuple) -> None:
            if block.training and args:
                tokens = args[0].shape[0] * args[0].shape[1]
                if index == 0:
                    self.dense_layer_tokens += tokens * self.adapter.depth
                if id(block) not in self._skipping:
                    self.layer_tokens += tokens

        return hook

    def kept_count(self, tokens: int, fraction: float) -> int:
        k = math.floor(tokens * fraction + 1e-9)
        if self.multiple_of > 1:
            k = k // self.multiple_of * self.multiple_of
        return min(tokens, max(1, k))

    def _with_prefix(self, index: torch.Tensor, prefix: int) -> torch.Tensor:
        if not prefix:
            return index
        head = torch.arange(prefix, device=index.device).expand(index.shape[0], prefix)
        return torch.cat([head, index + prefix], dim=1)

    def _forward(self, block: nn.Module, index: int, position: int, original):
        def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            if self.method == "ltd":
                out, processed = self._ltd(block, index, x, original, args, kwargs)
            else:
                out, processed = self._mod(block, x, original, args, kwargs)
            self.processed[position] = processed / x.shape[1]
            if block.training:
                self.layer_tokens += x.shape[0] * processed
            return out

        return forward

    def _ltd(self, block, index, x, original, args, kwargs):
        prefix = self.adapter.num_prefix_tokens
        tokens = x.shape[1] - prefix
        k = self.kept_count(tokens, self.keep)
        if not block.training or k >= tokens:
            return original(x, *args, **kwargs), x.shape[1]
        gen = generator(*self.keys, self.name, index)
        chosen = topk_sorted(torch.rand(x.shape[0], tokens, generator=gen), k)  # drawn on the CPU
        self.last_choice = int((chosen.double() * torch.arange(1, k + 1, dtype=torch.float64)).sum().item())
        kept = self._with_prefix(chosen.to(x.device), prefix)
        return scatter_tokens(x, kept, original(gather_tokens(x, kept), *args, **kwargs)), kept.shape[1]

    def _mod(self, block, x, original, args, kwargs):
        prefix = self.adapter.num_prefix_tokens
        router = getattr(block, ROUTER_NAME)
        logits = router(x[:, prefix:]).squeeze(-1).float()  # B, T
        tokens = logits.shape[1]
        self.router_fraction = (logits.detach() > 0).float().mean()  # a tensor: no device sync per block
        if block.training or self.eval_routing == "topk":
            k = self.kept_count(tokens, self.capacity)
            chosen = topk_sorted(logits.detach(), k)
            valid = None
        else:  # causal: each token decides alone; selected first (in order), the rest pad the end
            selected = logits.detach() > 0
            k = int(selected.sum(dim=1).max())
            if k == 0:
                return x, prefix
            position = torch.arange(tokens, device=x.device)
            chosen = torch.where(selected, position, position + tokens).argsort(dim=1)[:, :k]
            valid = selected.gather(1, chosen)
        kept = self._with_prefix(chosen, prefix)
        inputs = gather_tokens(x, kept)
        update = original(inputs, *args, **kwargs) - inputs
        weight = torch.sigmoid(logits.gather(1, chosen))
        if valid is not None:
            weight = weight * valid
        if prefix:
            weight = torch.cat([weight.new_ones(weight.shape[0], prefix), weight], dim=1)
        out = inputs + weight.unsqueeze(-1).to(update.dtype) * update
        if block.training and torch.is_grad_enabled() and self.aux_scale > 0:
            target = torch.zeros_like(logits).scatter_(1, chosen, 1.0)
            aux = F.binary_cross_entropy_with_logits(logits, target)
            self.aux_loss = aux.detach()
            out = _AddAuxLoss.apply(out, aux, self.aux_scale)
        processed = kept.shape[1] if valid is None else prefix + float(valid.sum(dim=1).float().mean())
        return scatter_tokens(x, kept, out), processed

    def remove(self, keep_routers: bool = True) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for index in self.blocks:
            block = self.adapter.blocks[index]
            block.__dict__.pop("forward", None)
            if not keep_routers and ROUTER_NAME in block._modules:
                del block._modules[ROUTER_NAME]


def attach_skip(model: nn.Module | TokenAdapter, blocks: Sequence[int], method: str = "ltd", keep: float = 0.5,
                capacity: float = 0.125, eval_routing: str = "auto") -> TokenSkipper:
    """Skip tokens in ``blocks`` of ``model``; ``.remove()`` detaches it (routers stay)::

        skipper = attach_skip(gpt, blocks=[1, 2], method="ltd", keep=0.5)
    """
    from lit_eff.tokens.adapters import find_adapter

    adapter = model if isinstance(model, TokenAdapter) else find_adapter(model)
    return TokenSkipper(adapter, blocks, method, keep, capacity, eval_routing)
