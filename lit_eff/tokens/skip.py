"""Token skipping: chosen blocks process a subset of the tokens (gathered in their original
order, prefix tokens always kept) and scatter the results back; the other tokens pass through
unchanged, keeping their positions. In a causal model, kept tokens attend to kept earlier ones.

- ``"ltd"`` (random-LTD): a random subset per block and sample in training, drawn outside
  ``forward`` by :meth:`TokenSkipper.draw` (rank-consistent, keyed by the step).
- ``"mod"`` (Mixture-of-Depths): a router ``Linear(dim, 1)`` per block picks the top
  ``capacity`` fraction; updates are scaled by ``sigmoid(logit)``. Causal models route by
  ``sigmoid(logit) > 0.5`` at evaluation, trained by a binary cross-entropy auxiliary loss.

:func:`attach_skip` swaps the class of each skipping block (:mod:`lit_eff.tokens.attach`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lit_eff.seeding import generator
from lit_eff.tokens.adapters import TokenAdapter
from lit_eff.tokens.attach import BlockMixin, attach, detach
from lit_eff.tokens.select import gather_tokens, scatter_tokens, selected_first, topk_sorted, with_prefix

__all__ = ["ROUTER_NAME", "TokenSkipper", "add_routers", "attach_skip", "restore_routers"]

ROUTER_NAME = "token_router"
_NAME = "_token_skip"


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


def restore_routers(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """``load_state_dict`` pre-hook: give every block whose router the state dict holds a router
    module first, so the weights load (e.g. into the main process after a ``ddp_spawn`` fit).

    Register it on a model that may receive Mixture-of-Depths weights::

        model.register_load_state_dict_pre_hook(restore_routers)
    """
    from lit_eff.models.naming import clean_name

    marker = f".{ROUTER_NAME}.weight"
    wanted = [key for key in state_dict if key.startswith(prefix) and key.endswith(marker)]
    if not wanted:
        return
    modules: dict[str, tuple[str, nn.Module]] = {}
    for name, sub in module.named_modules():
        modules.setdefault(clean_name(name), (name, sub))
    for key in wanted:
        owner = clean_name(key[len(prefix) : -len(marker)])
        if owner not in modules:
            continue
        name, block = modules[owner]
        if not isinstance(getattr(block, ROUTER_NAME, None), nn.Linear):
            weight, ref = state_dict[key], next(block.parameters(), None)
            block.add_module(ROUTER_NAME, nn.Linear(weight.shape[1], weight.shape[0],
                                                    bias=key[: -len("weight")] + "bias" in state_dict,
                                                    device=None if ref is None else ref.device,
                                                    dtype=weight.dtype if ref is None else ref.dtype))
        if name != owner:  # a compiled submodule: load under the module's own names
            for part in ("weight", "bias"):
                old = key[: -len("weight")] + part
                if old in state_dict:
                    state_dict[f"{prefix}{name}.{ROUTER_NAME}.{part}"] = state_dict.pop(old)


def kept_count(tokens: int, fraction: float, multiple_of: int = 1) -> int:
    k = math.floor(tokens * fraction + 1e-9)
    if multiple_of > 1:
        k = k // multiple_of * multiple_of
    return min(tokens, max(1, k))


class SkipSettings:
    """What a skipping block reads in ``forward`` (copied with the block)."""

    def __init__(self, method: str, prefix: int, keep: float, capacity: float, eval_routing: str,
                 multiple_of: int) -> None:
        self.method, self.prefix, self.keep, self.capacity = method, prefix, keep, capacity
        self.eval_routing, self.multiple_of = eval_routing, multiple_of
        self.aux_scale = 0.01  # weight of the router loss gradient ("mod")
        self.chosen: torch.Tensor | None = None  # random-LTD: kept token indices [B, k], sorted
        self.drawn_from = 0  # tokens the choice was drawn from
        self.aux_loss: torch.Tensor | float = 0.0  # last router loss ("mod")
        self.router_fraction: torch.Tensor | float = 0.0  # share of tokens with sigmoid(logit) > 0.5


class TokenSkipping(BlockMixin):
    """Runs the block on a subset of the tokens (settings in ``self._token_skip``)."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        s: SkipSettings = self._token_skip
        inner = super().forward
        if s.method == "ltd":
            kept = ltd_choice(s, x) if self.training else None
            if kept is None:
                return inner(x, *args, **kwargs)
            return scatter_tokens(x, kept, inner(gather_tokens(x, kept), *args, **kwargs))
        return route(self, s, x, lambda h: inner(h, *args, **kwargs))


def ltd_choice(s: SkipSettings, x: torch.Tensor) -> torch.Tensor | None:
    """The token indices a random-LTD block keeps (``None``: all)."""
    tokens = x.shape[1] - s.prefix
    if s.chosen is not None and s.chosen.shape[0] == x.shape[0] and s.drawn_from == tokens:
        return with_prefix(s.chosen, s.prefix)
    k = kept_count(tokens, s.keep, s.multiple_of)
    if k >= tokens:
        return None
    # nothing drawn for this shape (outside a Trainer): the global generator
    return with_prefix(topk_sorted(torch.rand(x.shape[0], tokens, device=x.device), k), s.prefix)


def route(block: nn.Module, s: SkipSettings, x: torch.Tensor, run) -> torch.Tensor:
    """Mixture-of-Depths routing of ``x`` through ``run`` (the block's own forward)."""
    prefix = s.prefix
    logits = getattr(block, ROUTER_NAME)(x[:, prefix:]).squeeze(-1).float()  # B, T
    tokens = logits.shape[1]
    s.router_fraction = (logits.detach() > 0).float().mean()  # a tensor: no device sync
    if block.training or s.eval_routing == "topk":
        chosen = topk_sorted(logits.detach(), kept_count(tokens, s.capacity, s.multiple_of))
        valid = None
    else:  # causal: each token decides alone; selected first (in order), the rest pad the end
        chosen, valid = selected_first(logits.detach() > 0)
        if chosen.shape[1] == 0:
            return x
    kept = with_prefix(chosen, prefix)
    inputs = gather_tokens(x, kept)
    update = run(inputs) - inputs
    weight = torch.sigmoid(logits.gather(1, chosen))
    if valid is not None:
        weight = weight * valid
    if prefix:
        weight = torch.cat([weight.new_ones(weight.shape[0], prefix), weight], dim=1)
    out = inputs + weight.unsqueeze(-1).to(update.dtype) * update
    if block.training and torch.is_grad_enabled() and s.aux_scale > 0:
        target = torch.zeros_like(logits).scatter_(1, chosen, 1.0)
        aux = F.binary_cross_entropy_with_logits(logits, target)
        s.aux_loss = aux.detach()
        out = _AddAuxLoss.apply(out, aux, s.aux_scale)
    return scatter_tokens(x, kept, out)


class TokenSkipper:
    """Token skipping attached to one model; set ``keep``/``aux_scale``, ``draw`` each training
    batch (random-LTD), ``remove`` to detach.

    Attributes:
        blocks: the skipping block indices; ``settings``: their :class:`SkipSettings`.
        eval_routing: ``"topk"`` or ``"threshold"`` routing at evaluation (``"mod"``).
    """

    def __init__(self, adapter: TokenAdapter, blocks: Sequence[int], method: str = "ltd", keep: float = 0.5,
                 capacity: float = 0.125, eval_routing: str = "auto", multiple_of: int = 1,
                 name: str = "token_skip") -> None:
        self.adapter, self.blocks, self.method, self.name = adapter, list(blocks), method, name
        self.eval_routing = ("threshold" if adapter.causal else "topk") if eval_routing == "auto" else eval_routing
        if method == "mod":
            add_routers(adapter, self.blocks)
        self.settings = [SkipSettings(method, adapter.num_prefix_tokens, float(keep), float(capacity),
                                      self.eval_routing, int(multiple_of)) for _ in self.blocks]
        for index, settings in zip(self.blocks, self.settings):
            attach(adapter.blocks[index], TokenSkipping, _NAME, settings)

    @property
    def keep(self) -> float:
        return self.settings[0].keep

    @keep.setter
    def keep(self, value: float) -> None:
        for settings in self.settings:
            settings.keep = float(value)

    @property
    def aux_scale(self) -> float:
        return self.settings[0].aux_scale

    @aux_scale.setter
    def aux_scale(self, value: float) -> None:
        for settings in self.settings:
            settings.aux_scale = float(value)

    def processed(self, tokens: Sequence[int], keep: float | None = None) -> list[int]:
        """Tokens each skipping block processes in training, for ``tokens[i]`` entering block i
        (at random-LTD's ``keep``, the current one by default)."""
        out = []
        for index, settings in zip(self.blocks, self.settings):
            n = tokens[index] - settings.prefix
            fraction = (settings.keep if keep is None else keep) if self.method == "ltd" else settings.capacity
            out.append(settings.prefix + kept_count(n, fraction, settings.multiple_of))
        return out

    def draw(self, keys: tuple, batch: int, tokens: Sequence[int], device: torch.device | str = "cpu") -> int:
        """Draw the random-LTD choice of every block for ``tokens[i]`` entering block i, from
        generators keyed by ``(*keys, name, block)``; returns a fingerprint of the choice."""
        fingerprint = 0
        for index, settings in zip(self.blocks, self.settings):
            settings.chosen = None
            n = tokens[index] - settings.prefix
            k = kept_count(n, settings.keep, settings.multiple_of)
            if self.method != "ltd" or k >= n:
                continue
            chosen = topk_sorted(torch.rand(batch, n, generator=generator(*keys, self.name, index)), k)
            fingerprint += int((chosen.double() * torch.arange(1, k + 1, dtype=torch.float64)).sum())
            settings.chosen, settings.drawn_from = chosen.to(device, non_blocking=True), n
        return fingerprint

    def remove(self, keep_routers: bool = True) -> None:
        for index in self.blocks:
            block = self.adapter.blocks[index]
            detach(block, TokenSkipping, _NAME)
            if not keep_routers and ROUTER_NAME in block._modules:
                del block._modules[ROUTER_NAME]


def attach_skip(model: nn.Module | TokenAdapter, blocks: Sequence[int], method: str = "ltd", keep: float = 0.5,
                capacity: float = 0.125, eval_routing: str = "auto", multiple_of: int = 1) -> TokenSkipper:
    """Skip tokens in ``blocks`` of ``model``; ``.remove()`` detaches it (routers stay)::

        skipper = attach_skip(gpt, blocks=[1, 2], method="ltd", keep=0.5)
    """
    from lit_eff.tokens.adapters import find_adapter

    adapter = model if isinstance(model, TokenAdapter) else find_adapter(model)
    return TokenSkipper(adapter, blocks, method, keep, capacity, eval_routing, multiple_of)
