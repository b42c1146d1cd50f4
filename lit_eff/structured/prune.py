"""Which members to keep, and checkpoints of pruned models in the dense shapes.

- :func:`keep_above_half`: LAPP's decision (mask ≥ 0.5, i.e. importance above the threshold).
- :func:`keep_top`: the magnitude baseline's (the most important ``k``).
- :func:`layouts` / :func:`expand_state_dict`: a pruned model's state dict re-expanded to the
  dense shapes with zeros (and unit variances) where members were removed, from the layouts
  recorded in the callback's checkpoint state: it loads into the plain model the run started
  from and computes the same function.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lit_eff.structured.groups import Group

__all__ = ["expand_state_dict", "keep_above_half", "keep_top", "layouts"]


def keep_above_half(mask: torch.Tensor, min_keep: int = 1) -> torch.Tensor:
    """Sorted positions with ``mask >= 0.5``; the ``min_keep`` largest if fewer."""
    kept = torch.nonzero(mask >= 0.5).flatten()
    if kept.numel() < min_keep:
        kept = torch.topk(mask, min(min_keep, mask.numel())).indices
    return torch.sort(kept.cpu()).values


def keep_top(score: torch.Tensor, count: int) -> torch.Tensor:
    """Sorted positions of the ``count`` highest scores (ties: the lower position)."""
    order = torch.argsort(score.cpu(), descending=True, stable=True)
    return torch.sort(order[:count]).values


def layouts(groups: list[Group], names: dict[nn.Module, str]) -> list[dict[str, Any]]:
    """For each group: its dense count, kept positions and ``[key, dim, per member, blocks,
    fill]`` of every tensor that depends on its count (``names``: module -> state-dict prefix)."""
    return [{"dense": g.dense, "kept": g.kept.tolist(),
             "tensors": [[names[t.module] + t.name, t.dim, t.per_member, t.blocks, t.fill] for t in g.tensors()]}
            for g in groups]


def _spread(value: torch.Tensor, dim: int, kept: torch.Tensor, dense: int, per: int, blocks: int,
            fill: float) -> torch.Tensor:
    shape = list(value.shape)
    runs = value.reshape(*shape[:dim], blocks, kept.numel(), per, *shape[dim + 1:])
    out_shape = [*shape[:dim], blocks, dense, per, *shape[dim + 1:]]
    out = torch.full(out_shape, fill, dtype=value.dtype, device=value.device)
    out.index_copy_(dim + 1, kept.to(value.device), runs)
    return out.reshape(*shape[:dim], blocks * dense * per, *shape[dim + 1:])


def expand_state_dict(state_dict: dict[str, torch.Tensor],
                      group_layouts: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """``state_dict`` with every pruned tensor re-expanded to the dense shapes."""
    out = dict(state_dict)
    for layout in group_layouts:
        kept = torch.tensor(layout["kept"], dtype=torch.long)
        for key, dim, per, blocks, fill in layout["tensors"]:
            if key in out:
                out[key] = _spread(out[key], dim, kept, layout["dense"], per, blocks, fill)
    return out
