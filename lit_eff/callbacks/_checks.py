"""Argument checks the technique callbacks share, with the kit's message shape."""

from __future__ import annotations

import math
from typing import Any


def check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    """``Expected `method` in ['rigl', 'set'], got method='x'``."""
    if value not in allowed:
        raise ValueError(f"Expected `{name}` in {list(allowed)}, got {name}={value!r}")


def is_int(value: Any) -> bool:
    """An int that is not a bool (YAML ``true`` must not pass as a step count)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def training_steps(trainer: Any, who: str, fix: str) -> int:
    """The run's optimizer steps (``trainer.estimated_stepping_batches``), or ``"<who> cannot tell
    the length of training: <fix>"`` when it is unknown (an infinite or empty loader)."""
    estimated = trainer.estimated_stepping_batches
    if not math.isfinite(estimated) or estimated <= 0:
        raise ValueError(f"{who} cannot tell the length of training: {fix}")
    return int(estimated)
