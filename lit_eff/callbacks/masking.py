"""The base of the weight-sparsity callbacks (a skeleton: the sparsity callbacks move onto it).

Other techniques talk to sparsity callbacks only through this interface:

- ``targets``: ``{name: module}`` of the layers whose ``weight`` the callback masks (names
  without compile wrappers), filled at ``setup``;
- :meth:`MaskingTechnique.mask_changes_after`: whether the masks (or anything else that shapes
  the effective weights, like β) can still change from a given optimizer step on.
"""

from __future__ import annotations

from torch import nn

from lit_eff import validation
from lit_eff.callbacks.technique import Technique

__all__ = ["MaskingTechnique"]


class MaskingTechnique(Technique):
    """Base of the callbacks that mask weights with :mod:`lit_eff.sparsity`."""

    def __init__(self, include: list[str] | None = None, exclude: list[str] | None = None) -> None:
        super().__init__()
        self.include = validation.check_patterns("include", include)
        self.exclude = validation.check_patterns("exclude", exclude)
        self.targets: dict[str, nn.Module] = {}

    def mask_changes_after(self, step: int, total_steps: int) -> str | None:
        """``None`` if the effective weights of the targets are masked the same way at every step
        from ``step`` to ``total_steps - 1``; otherwise why not (for messages), e.g. ``"it updates
        masks until step 900"``."""
        raise NotImplementedError
