"""Functional sparsity: masks, the masking mechanism and target selection.

- :mod:`~lit_eff.sparsity.masks`: which weights to keep (N:M, magnitude, random; ERK and
  uniform layer densities).
- :mod:`~lit_eff.sparsity.nm_schedule`, :mod:`~lit_eff.sparsity.pruning`,
  :mod:`~lit_eff.sparsity.rigl`: the schedules and update rules of N:M training, gradual
  magnitude pruning and RigL/SET, as functions of the optimizer step.
- :mod:`~lit_eff.sparsity.parametrize`: ``module.weight`` read as ``W ⊙ (E + β(1−E))`` in
  forward, with straight-through gradients; :func:`export` leaves a plain model.
- :mod:`~lit_eff.sparsity.targets`: which layers, by kind and name globs.
- :mod:`~lit_eff.sparsity.pictures`: what a person can read of the masks (density chart, N:M pattern).

>>> import torch
>>> from lit_eff.models import GPT
>>> from lit_eff import sparsity
>>> model = GPT(n_layer=1)
>>> for name, layer in sparsity.find_targets(model).items():
...     _ = sparsity.attach_mask(layer, mask=sparsity.nm_mask(layer.weight, 2, 4), density=0.5)
>>> loss = model(torch.zeros(1, 8, dtype=torch.long)).sum()   # 2:4-masked weights in forward
>>> _ = sparsity.export(model)                                  # plain GPT with 2:4 zeros
"""

from lit_eff.sparsity.group import MaskGroup
from lit_eff.sparsity.masks import (
    erk_densities,
    global_magnitude_masks,
    keep_largest,
    magnitude_mask,
    nm_mask,
    nm_masks,
    random_mask,
    uniform_densities,
)
from lit_eff.sparsity.nm_schedule import NMSchedule, nm_frames
from lit_eff.sparsity.parametrize import (
    Mask,
    attach_mask,
    effective_weight,
    export,
    get_mask,
    get_parametrization,
    harden_state_dict,
    has_mask,
    masked_modules,
    remove_mask,
    set_beta,
    set_mask,
)
from lit_eff.sparsity.pictures import density_chart, pattern_crop
from lit_eff.sparsity.pruning import PruningSchedule, prune, pruning_scores
from lit_eff.sparsity.rigl import drop_and_grow, drop_fraction
from lit_eff.sparsity.semi_structured import is_2to4, layers_2to4, semi_structured_problems, to_semi_structured
from lit_eff.sparsity.targets import DEFAULT_INCLUDE, LAYER_KINDS, find_targets

__all__ = [
    "DEFAULT_INCLUDE",
    "LAYER_KINDS",
    "Mask",
    "MaskGroup",
    "NMSchedule",
    "PruningSchedule",
    "attach_mask",
    "drop_and_grow",
    "drop_fraction",
    "density_chart",
    "effective_weight",
    "erk_densities",
    "export",
    "find_targets",
    "get_mask",
    "get_parametrization",
    "global_magnitude_masks",
    "harden_state_dict",
    "has_mask",
    "is_2to4",
    "keep_largest",
    "layers_2to4",
    "magnitude_mask",
    "masked_modules",
    "nm_frames",
    "nm_mask",
    "nm_masks",
    "pattern_crop",
    "prune",
    "pruning_scores",
    "random_mask",
    "remove_mask",
    "semi_structured_problems",
    "set_beta",
    "set_mask",
    "to_semi_structured",
    "uniform_densities",
]
