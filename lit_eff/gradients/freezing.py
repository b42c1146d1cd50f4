"""Progressive freezing schedules: how many of a model's first units are frozen at an optimizer step.

Both are functions of the optimizer step and the run length ``total_steps``, so a resumed run
freezes exactly the same units.

- :func:`window_count`: ``k = floor(final_fraction · n)`` units freeze one by one at evenly
  spaced steps from ``int(freeze_start · T)`` (the first) to ``int(freeze_end · T)`` (the last).
- :func:`composer_count`: Composer's LayerFreezing schedule: with ``d = step / T``, the frozen
  fraction is ``freeze_level · (d − freeze_start) / (1 − freeze_start)`` once ``d > freeze_start``
  and ``int(fraction · n)`` units are frozen; unit ``i`` (1-based) freezes at
  ``d = freeze_start + (1 − freeze_start) · i / (freeze_level · n)``.

>>> [window_count(s, 100, 4, 0.5, 0.25, 0.75) for s in (0, 24, 25, 74, 75, 99)]
[0, 0, 1, 1, 2, 2]
>>> [composer_count(s, 100, 4, 1.0, 0.5) for s in (50, 62, 63, 75, 99)]
[0, 0, 1, 2, 3]
"""

from __future__ import annotations

import math
from collections.abc import Callable


def window_count(step: int, total_steps: int, n_units: int, final_fraction: float, freeze_start: float,
                 freeze_end: float) -> int:
    """Units frozen at ``step`` under the window schedule (monotone in ``step``)."""
    k = math.floor(final_fraction * n_units + 1e-9)
    start, end = int(freeze_start * total_steps), int(freeze_end * total_steps)
    if k == 0 or step < start:
        return 0
    if k == 1 or end <= start:
        return k
    return min(k, 1 + (step - start) * (k - 1) // (end - start))


def composer_count(step: int, total_steps: int, n_units: int, freeze_level: float, freeze_start: float) -> int:
    """Units frozen at ``step`` under Composer's schedule (its float arithmetic, in its order)."""
    duration = step / total_steps
    if duration <= freeze_start:
        return 0
    fraction = freeze_level * ((duration - freeze_start) / (1.0 - freeze_start))
    return int(fraction * n_units)


def first_step(count: Callable[[int], int], units: int, total_steps: int) -> int | None:
    """The first step in ``[0, total_steps]`` at which the monotone ``count`` reaches ``units``."""
    low, high = 0, total_steps
    if count(high) < units:
        return None
    while low < high:
        middle = (low + high) // 2
        low, high = (middle + 1, high) if count(middle) < units else (low, middle)
    return low
