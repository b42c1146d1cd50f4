"""Schedules shared by every technique: a value as a function of the optimizer step.

Every technique reads ``trainer.global_step`` and asks its schedule for the value, so a
resumed run continues exactly where it stopped. Schedules are plain classes with YAML-able
arguments::

    keep_ratio:
      class_path: lit_eff.schedules.Linear
      init_args: {start: 1.0, end: 0.5, start_step: 0, end_step: 1000}
"""

from __future__ import annotations

import math


class Schedule:
    """Base class: ``schedule(step) -> float``."""

    def __call__(self, step: int) -> float:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class Constant(Schedule):
    """Always ``value``."""

    def __init__(self, value: float) -> None:
        self.value = float(value)

    def __call__(self, step: int) -> float:
        return self.value


class _Ramp(Schedule):
    """``start`` before ``start_step``, ``end`` from ``end_step`` on, ``shape(progress)`` between."""

    def __init__(self, start: float, end: float, start_step: int = 0, end_step: int = 1000) -> None:
        if start_step < 0:
            raise ValueError(f"Expected `start_step` >= 0, got start_step={start_step}")
        if end_step < start_step:
            raise ValueError(
                f"Expected `start_step` <= `end_step`, got start_step={start_step}, end_step={end_step}"
            )
        self.start, self.end = float(start), float(end)
        self.start_step, self.end_step = int(start_step), int(end_step)

    def progress(self, step: int) -> float:
        if step <= self.start_step:
            return 0.0
        if step >= self.end_step:
            return 1.0
        return (step - self.start_step) / (self.end_step - self.start_step)

    def shape(self, progress: float) -> float:
        raise NotImplementedError

    def __call__(self, step: int) -> float:
        return self.start + (self.end - self.start) * self.shape(self.progress(step))


class Linear(_Ramp):
    """Straight line from ``start`` to ``end``."""

    def shape(self, progress: float) -> float:
        return progress


class Cosine(_Ramp):
    """Half-cosine from ``start`` to ``end``."""

    def shape(self, progress: float) -> float:
        return 0.5 * (1.0 - math.cos(math.pi * progress))


class Polynomial(_Ramp):
    """``end + (start - end) * (1 - progress) ** power``: Zhu & Gupta's gradual pruning curve."""

    def __init__(
        self, start: float, end: float, start_step: int = 0, end_step: int = 1000, power: float = 3.0
    ) -> None:
        super().__init__(start, end, start_step, end_step)
        if power <= 0:
            raise ValueError(f"Expected `power` > 0, got power={power}")
        self.power = float(power)

    def shape(self, progress: float) -> float:
        return 1.0 - (1.0 - progress) ** self.power


class Cubic(Polynomial):
    """:class:`Polynomial` with power 3."""

    def __init__(self, start: float, end: float, start_step: int = 0, end_step: int = 1000) -> None:
        super().__init__(start, end, start_step, end_step, power=3.0)


class Exponential(_Ramp):
    """Geometric interpolation from ``start`` to ``end`` (both must be > 0)."""

    def __init__(self, start: float, end: float, start_step: int = 0, end_step: int = 1000) -> None:
        if start <= 0 or end <= 0:
            raise ValueError(f"Expected `start` > 0 and `end` > 0, got start={start}, end={end}")
        super().__init__(start, end, start_step, end_step)

    def __call__(self, step: int) -> float:
        return self.start * (self.end / self.start) ** self.progress(step)


class Step(Schedule):
    """Piecewise constant: ``values[i]`` from ``milestones[i-1]`` (``values[0]`` before the first)."""

    def __init__(self, values: list[float], milestones: list[int]) -> None:
        if len(values) != len(milestones) + 1:
            raise ValueError(
                f"Expected len(values) == len(milestones) + 1, got {len(values)} values and "
                f"{len(milestones)} milestones"
            )
        if any(b <= a for a, b in zip(milestones, milestones[1:])):
            raise ValueError(f"Expected strictly increasing `milestones`, got milestones={milestones}")
        self.values = [float(v) for v in values]
        self.milestones = [int(m) for m in milestones]

    def __call__(self, step: int) -> float:
        index = sum(step >= m for m in self.milestones)
        return self.values[index]


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_factor: float = 0.0) -> float:
    """LR multiplier: linear warm-up from 0 to 1, then cosine down to ``min_factor``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))
