"""Gradient-side efficiency: which gradient entries to keep, which blocks to freeze.

- :mod:`~lit_eff.gradients.topk`: the top-``|g|`` gradient mask among allowed entries (SparCL).
- :mod:`~lit_eff.gradients.params`: the tensors an optimizer step updates (dense weights of
  masked layers, local shards under FSDP2).
- :mod:`~lit_eff.gradients.freezing`: progressive freezing schedules (window, Composer's).
- :mod:`~lit_eff.gradients.units`: a model's freezable units and stem.

The callbacks :class:`lit_eff.callbacks.GradientMasking` and :class:`lit_eff.callbacks.LayerFreezing`
wire these functions to Lightning.
"""

from lit_eff.gradients.freezing import composer_count, first_step, window_count
from lit_eff.gradients.params import dense_weight, full_tensor, is_sharded, local, sum_over_shards
from lit_eff.gradients.topk import kept_count, topk_mask
from lit_eff.gradients.units import Units, find_units, stem_modules, stem_parameters

__all__ = ["Units", "composer_count", "dense_weight", "find_units", "first_step", "full_tensor", "is_sharded",
           "kept_count", "local", "stem_modules", "stem_parameters", "sum_over_shards", "topk_mask", "window_count"]
