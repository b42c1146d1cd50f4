"""The N:M training schedule as a function of the optimizer step: phase, N:M frame and β.

A run of ``total_steps`` optimizer steps trains dense for ``dense_steps``, then decays for
``P = total_steps − dense_steps − finetune_steps`` steps, then fine-tunes the last
``finetune_steps`` with the final binary ``n:m`` mask. During the decay phase:

- ``structure_decay`` steps the pattern toward ``n:m``: frame ``i`` of ``K`` starts at
  ``dense_steps + ⌊i·P/K⌋``; ``"stepwise"`` uses ``(m−1):m`` then ``(m/2^i):m``
  (``K = log2(m/n) + 1``), ``"geometric"`` uses ``(n·2^(3−i)):(m·2^(3−i))`` (``K = 4``);
- ``method="mask_decay"`` scales pruned weights by ``β = max(0, 1 − α·t)`` (``"linear"``) or
  ``exp(−α·t)`` (``"exp"``), ``t = step − dense_steps``; other methods use β = 0.

>>> s = NMSchedule(1, 8, total_steps=14, method="ste", structure_decay="stepwise", dense_steps=2, finetune_steps=2)
>>> [s.frame(t) for t in (0, 2, 4, 7, 9, 13)]
[(8, 8), (7, 8), (4, 8), (2, 8), (1, 8), (1, 8)]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

__all__ = ["NMSchedule", "nm_frames"]


def nm_frames(n: int, m: int, structure_decay: str = "none") -> list[tuple[int, int]]:
    """The N:M patterns of the decay phase, in order (one frame without structure decay)."""
    if structure_decay == "stepwise":
        k = int(math.log2(m // n)) + 1
        return [(m - 1, m)] + [(m >> i, m) for i in range(1, k)]
    if structure_decay == "geometric":
        return [(n * 2 ** (3 - i), m * 2 ** (3 - i)) for i in range(4)]
    return [(n, m)]


@dataclass(frozen=True)
class NMSchedule:
    """Phase, frame and β of N:M training at each optimizer step (see the module docstring)."""

    n: int
    m: int
    total_steps: int
    method: str = "srste"
    decay: str = "exp"
    decay_rate: float = 2e-4
    structure_decay: str = "none"
    dense_steps: int = 0
    finetune_steps: int = 0

    def __post_init__(self) -> None:
        if self.dense_steps + self.finetune_steps > self.total_steps:
            raise ValueError(f"Expected `dense_steps` + `finetune_steps` <= `total_steps`, got "
                             f"dense_steps={self.dense_steps}, finetune_steps={self.finetune_steps}, "
                             f"total_steps={self.total_steps}")

    def frames(self) -> list[tuple[int, int]]:
        return nm_frames(self.n, self.m, self.structure_decay)

    def phase(self, step: int) -> Literal["dense", "decay", "finetune"]:
        if step < self.dense_steps:
            return "dense"
        if step >= self.total_steps - self.finetune_steps:
            return "finetune"
        return "decay"

    def frame(self, step: int) -> tuple[int, int]:
        """``(n, m)`` at ``step``; ``(m, m)`` (dense) during warm-up."""
        phase = self.phase(step)
        if phase == "dense":
            return self.m, self.m
        if phase == "finetune":
            return self.n, self.m
        frames = self.frames()
        span = self.total_steps - self.finetune_steps - self.dense_steps
        offset = step - self.dense_steps
        return frames[max(i for i in range(len(frames)) if i * span // len(frames) <= offset)]

    def beta(self, step: int) -> float:
        """The scale of pruned weights: 1 in warm-up, 0 for binary masks."""
        phase = self.phase(step)
        if phase == "dense":
            return 1.0
        if phase == "finetune" or self.method != "mask_decay":
            return 0.0
        t = step - self.dense_steps
        if self.decay == "linear":
            return max(0.0, 1.0 - self.decay_rate * t)
        return math.exp(-self.decay_rate * t)

    def density(self, step: int) -> float:
        """The fraction of each layer's weights forward uses: ``n/m`` while β = 0, else 1."""
        n, m = self.frame(step)
        return n / m if self.beta(step) == 0.0 else 1.0
