"""Gradual magnitude pruning (Zhu & Gupta 2017): the polynomial schedule and the pruning score.

At the update steps ``t ∈ {t0, t0+Δt, ...}`` before ``end_step`` the target sparsity is::

    s_t = s_f + (s_i − s_f) · (1 − (t − t0) / (end_step − t0)) ** power

held until the next update; from ``end_step`` on it is ``s_f``, and before ``t0`` it is 0.

>>> s = PruningSchedule(final_sparsity=0.8, initial_sparsity=0.1, start_step=10, end_step=50, update_every=10)
>>> [s.update_step(t) for t in (5, 10, 19, 20, 49, 50, 70)]
[None, 10, 10, 20, 40, 50, 50]
>>> round(s.target(30), 4)
0.7125
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from lit_eff.schedules import Polynomial
from lit_eff.sparsity.masks import global_magnitude_masks, magnitude_mask, nm_mask

__all__ = ["PruningSchedule", "prune", "pruning_scores"]


@dataclass(frozen=True)
class PruningSchedule:
    final_sparsity: float
    initial_sparsity: float = 0.0
    start_step: int = 0
    end_step: int = 1
    update_every: int = 100
    power: float = 3.0

    def __post_init__(self) -> None:
        if self.start_step >= self.end_step:
            raise ValueError(f"Expected `start_step` < `end_step`, got start_step={self.start_step}, "
                             f"end_step={self.end_step}")

    def update_step(self, step: int) -> int | None:
        """The last update step ``<= step`` (``None`` before ``start_step``)."""
        if step < self.start_step:
            return None
        if step >= self.end_step:
            return self.end_step
        return self.start_step + (step - self.start_step) // self.update_every * self.update_every

    def target(self, step: int) -> float:
        """The scheduled sparsity in force at ``step``."""
        at = self.update_step(step)
        if at is None:
            return 0.0
        if at >= self.end_step:
            return self.final_sparsity
        curve = Polynomial(self.initial_sparsity, self.final_sparsity, self.start_step, self.end_step, self.power)
        return curve(at)

    def last_update(self, total_steps: int) -> int | None:
        """The last update step of a run of ``total_steps`` optimizer steps (``None``: none)."""
        return self.update_step(total_steps)


@torch.no_grad()
def pruning_scores(weight: torch.Tensor, mask: torch.Tensor, nm: tuple[int, int] | None = None) -> torch.Tensor:
    """``|W|`` with pruned positions lowest (a mask only grows sparser), then NaN weights, and, with
    ``nm=(n, m)``, the N:M mask of the effective weight highest (never pruned)."""
    weight = weight.detach()
    tiny = torch.finfo(weight.dtype).tiny
    # kept weights score >= 2·tiny (an exact 0 that is kept ranks above a pruned one), NaN tiny
    magnitude = torch.where(weight.isnan(), tiny, weight.abs().clamp_min(2 * tiny))
    scores = torch.where(mask, magnitude, 0.0)
    if nm is not None:
        scores = torch.where(nm_mask(scores, *nm) & mask, math.inf, scores)
    return scores


def prune(scores: Mapping[str, torch.Tensor], sparsity: float,
          scope: str = "layer") -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Masks pruning the ``sparsity`` fraction of lowest scores in each layer (``"layer"``) or with
    one threshold across layers (``"global"``), and each layer's density."""
    if scope == "global":
        masks = global_magnitude_masks(scores, sparsity)
        densities = {name: float(mask.count_nonzero()) / mask.numel() for name, mask in masks.items()}
    else:
        masks = {name: magnitude_mask(s, sparsity) for name, s in scores.items()}
        densities = {name: 1.0 - round(sparsity * s.numel()) / s.numel() for name, s in scores.items()}
    return masks, densities
