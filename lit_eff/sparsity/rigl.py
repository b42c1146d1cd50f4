"""Dynamic sparse training at constant sparsity: RigL (Evci et al. 2020) and SET (Mocanu et al. 2018).

Masks move after the optimizer step that reaches ``t`` when ``0 < t < T_end`` and
``t % update_every == 0``. Each layer with ``n`` active weights drops the ``k = ⌊α_t·n⌋``
active weights of smallest ``|W|`` and grows ``k`` among all the others (just-dropped ones
included) by the largest grow score: ``|∇W|`` of the dense gradient (RigL) or a random score
(SET). ``α_t = α0 · (0.5 + 0.5·cos(π·t / T_end))``.

>>> mask = torch.tensor([True, True, False, False])
>>> drop_and_grow(torch.tensor([0.1, 2.0, 0.0, 0.0]), mask, 1, grow_scores=torch.tensor([0.0, 0.0, 0.5, 0.9]))
tensor([False,  True, False,  True])
"""

from __future__ import annotations

import math

import torch

from lit_eff.schedules import Cosine
from lit_eff.sparsity.masks import keep_largest

__all__ = ["drop_and_grow", "drop_fraction", "is_update", "last_update"]


def is_update(step: int, update_every: int, end_step: int) -> bool:
    """Whether the masks move after the optimizer step that reaches ``step``."""
    return 0 < step < end_step and step % update_every == 0


def last_update(update_every: int, end_step: int, total_steps: int) -> int | None:
    """The last update step of a run of ``total_steps`` optimizer steps (``None``: none)."""
    last = min(end_step - 1, total_steps) // update_every * update_every
    return last if last > 0 else None


def drop_fraction(step: int, initial: float, end_step: int) -> float:
    """``α_t``, the cosine-decayed drop fraction (0 from ``end_step`` on)."""
    if step >= end_step:
        return 0.0
    return Cosine(initial, 0.0, 0, end_step)(step)


@torch.no_grad()
def drop_and_grow(weight: torch.Tensor, mask: torch.Tensor, k: int, grow_scores: torch.Tensor) -> torch.Tensor:
    """The new mask: drop the ``k`` active weights of smallest ``|weight|``, grow ``k`` positions
    among the rest by the largest ``grow_scores`` (ties: lower index; NaN ranks lowest). The number
    of active weights stays the same."""
    active = int(mask.sum())
    if k <= 0:
        return mask.clone()
    magnitude = torch.nan_to_num(weight.detach().abs().float(), nan=-1.0, posinf=math.inf)
    kept = keep_largest(torch.where(mask, magnitude, -math.inf), active - k)
    grow = torch.nan_to_num(grow_scores.detach().float(), nan=-1.0, posinf=math.inf)
    return kept | keep_largest(torch.where(kept, -math.inf, grow), k)
