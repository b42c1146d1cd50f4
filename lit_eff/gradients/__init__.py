"""Gradient-side efficiency: which gradient entries to keep, which layers to freeze.

- :mod:`~lit_eff.gradients.topk`: the top-``|g|`` gradient mask among allowed entries
  (SparCL's dynamic gradient masking, ALGORITHMS.md §2) and the "keep the rest still" helper.
- :mod:`~lit_eff.gradients.freezing`: the progressive freezing schedule (how many of the
  earliest blocks are frozen at a step) and how a model's blocks and stem are found.

The callbacks :class:`lit_eff.callbacks.GradientMasking` and :class:`lit_eff.callbacks.LayerFreezing`
are thin wrappers over these functions.
"""

from lit_eff.gradients.freezing import find_units, frozen_count, stem_modules, stem_parameters, validate_fraction
from lit_eff.gradients.topk import kept_count, topk_mask, validate_density

__all__ = ["find_units", "frozen_count", "kept_count", "stem_modules", "stem_parameters", "topk_mask", "validate_density",
           "validate_fraction"]
