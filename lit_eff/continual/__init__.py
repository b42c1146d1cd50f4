"""Continual learning: task splits, a replay buffer, and SparCL's task-aware dynamic masking
(pure functions and state, no Lightning).

- :mod:`~lit_eff.continual.tasks`: which classes and epochs belong to which task;
- :mod:`~lit_eff.continual.buffer`: a reservoir buffer of (input, label, logits) for DER++ replay;
- :mod:`~lit_eff.continual.tdm`: the prune-and-grow mask update and its sparsity bounds.
"""

from lit_eff.continual.buffer import ReservoirBuffer
from lit_eff.continual.tasks import TaskSplit, task_position, task_split_of
from lit_eff.continual.tdm import bounds, percentile, prune_and_grow, prune_mask

__all__ = ["ReservoirBuffer", "TaskSplit", "bounds", "percentile", "prune_and_grow", "prune_mask",
           "task_position", "task_split_of"]
