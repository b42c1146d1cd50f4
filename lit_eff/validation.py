"""Argument checks shared by every part of the kit, with one message shape.

Every check raises ``ValueError`` naming the argument, the value and what is allowed, e.g.
``Expected `n` < `m`, got n=4, m=2``, so a wrong config fails before any work starts.

>>> check_fraction("keep", 1.5)
Traceback (most recent call last):
...
ValueError: Expected `keep` in [0, 1], got keep=1.5
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

__all__ = ["check_bool", "check_choice", "check_density", "check_fraction", "check_int", "check_nm", "check_number",
           "check_patterns", "check_schedule_over_run", "check_sparsity", "is_int", "is_number", "run_length",
           "warn_inactive"]


def is_int(value: Any) -> bool:
    """An int that is not a bool (YAML ``true`` must not pass as a step count)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_bool(name: str, value: Any) -> None:
    """``True`` or ``False`` (not 0/1 or a string)."""
    if not isinstance(value, bool):
        raise ValueError(f"Expected `{name}` to be true or false, got {name}={value!r}")


def check_choice(name: str, value: Any, allowed: Sequence[Any]) -> None:
    """``Expected `method` in ['rigl', 'set'], got method='x'``."""
    if value not in tuple(allowed):
        raise ValueError(f"Expected `{name}` in {list(allowed)}, got {name}={value!r}")


def check_int(name: str, value: Any, minimum: int = 0, allow_none: bool = False) -> None:
    """An integer ``>= minimum`` (``None`` too when ``allow_none``)."""
    if value is None and allow_none:
        return
    if not is_int(value) or value < minimum:
        extra = " or None" if allow_none else ""
        raise ValueError(f"Expected `{name}` to be an integer >= {minimum}{extra}, got {name}={value!r}")


def _inside(value: float, low: float | None, high: float | None, low_open: bool, high_open: bool) -> bool:
    above = low is None or (value > low if low_open else value >= low)
    return above and (high is None or (value < high if high_open else value <= high))


def _interval(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    left = "(" if low_open or low is None else "["
    right = ")" if high_open or high is None else "]"
    return f"{left}{'-inf' if low is None else f'{low:g}'}, {'inf' if high is None else f'{high:g}'}{right}"


def check_number(name: str, value: Any, low: float | None = None, high: float | None = None, *,
                 low_open: bool = False, high_open: bool = False) -> float:
    """A finite number in the interval; returns it as a float."""
    if not (is_number(value) and _inside(value, low, high, low_open, high_open)):
        raise ValueError(f"Expected `{name}` in {_interval(low, high, low_open, high_open)}, got {name}={value!r}")
    return float(value)


def check_fraction(name: str, value: Any, *, low_open: bool = False, high_open: bool = False) -> float:
    """A number in [0, 1] (ends open as asked)."""
    return check_number(name, value, 0.0, 1.0, low_open=low_open, high_open=high_open)


def check_density(value: Any, name: str = "density") -> float:
    """A density: a number in (0, 1]."""
    return check_fraction(name, value, low_open=True)


def check_sparsity(value: Any, name: str = "sparsity") -> float:
    """A sparsity: a number in [0, 1)."""
    return check_fraction(name, value, high_open=True)


def check_nm(n: Any, m: Any) -> None:
    """Integers with ``0 < n < m``."""
    for name, value in (("n", n), ("m", m)):
        if not is_int(value):
            raise ValueError(f"Expected `{name}` to be an integer, got {name}={value!r}")
    if n <= 0:
        raise ValueError(f"Expected `n` > 0, got n={n}")
    if n >= m:
        raise ValueError(f"Expected `n` < `m`, got n={n}, m={m}")


def check_patterns(name: str, value: Any) -> list[str] | None:
    """``None`` or a list of name globs (strings); returns a copy."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)) \
            or not all(isinstance(p, str) for p in value):
        raise ValueError(f"Expected `{name}` to be a list of name patterns (strings), got {name}={value!r}")
    return list(value)


def stepping_batches(trainer: Any) -> float:
    """The optimizer steps this fit will take: the datamodule's ``planned_steps(trainer)`` where it
    has one (epochs that shrink during training), else ``trainer.estimated_stepping_batches``."""
    planned = getattr(getattr(trainer, "datamodule", None), "planned_steps", None)
    steps = planned(trainer) if callable(planned) else None
    return trainer.estimated_stepping_batches if steps is None else steps


def run_length(trainer: Any, who: str, fix: str) -> int:
    """:func:`stepping_batches`, or ``"<who> cannot tell the length of training: <fix>"`` when unknown."""
    estimated = stepping_batches(trainer)
    if not math.isfinite(estimated) or estimated <= 0:
        raise ValueError(f"{who} cannot tell the length of training: {fix}")
    return int(estimated)


def check_schedule_over_run(name: str, schedule: Any, total_steps: int, low: float, high: float, *,
                            low_open: bool = False, high_open: bool = False, who: str = "") -> None:
    """Raise if a schedule (a callable of the optimizer step) leaves the interval at some step of the run."""
    for step in _probe_steps(schedule, total_steps):
        value = float(schedule(step))
        if math.isnan(value) or not _inside(value, low, high, low_open, high_open):
            where = f"{who}: " if who else ""
            raise ValueError(f"{where}Expected `{name}` in {_interval(low, high, low_open, high_open)} at every step "
                             f"of the run (0..{total_steps - 1}), got {schedule!r} = {value:g} at step {step}")


def _probe_steps(schedule: Any, total_steps: int) -> list[int]:
    """Every step for short runs; otherwise the ends, the schedule's own break points and a grid."""
    if total_steps <= 4096:
        return list(range(total_steps))
    points = {0, total_steps - 1}
    for attr in ("start_step", "end_step"):
        value = getattr(schedule, attr, None)
        if is_int(value):
            points.update(s for s in (value - 1, value, value + 1) if 0 <= s < total_steps)
    for value in getattr(schedule, "milestones", []) or []:
        points.update(s for s in (value - 1, value) if 0 <= s < total_steps)
    points.update(range(0, total_steps, max(1, total_steps // 1024)))
    return sorted(points)


def warn_inactive(who: str, name: str, value: Any, total_steps: int, why: str) -> None:
    """Warn that an argument can never act in this run (e.g. a start step after the last step)."""
    warnings.warn(f"{who}: `{name}`={value!r} never acts in this run of {total_steps} optimizer steps: {why}",
                  UserWarning, stacklevel=3)
