"""Data-efficient training: which training samples to keep (pure functions and state, no Lightning).

- :mod:`~lit_eff.data.forgetting`: per-sample learning statistics (forgetting events, Toneva et
  al. 2019; mean loss) and the order in which samples are removed;
- :mod:`~lit_eff.data.schedule`: at which epochs samples are removed, and how many.
"""

from lit_eff.data.forgetting import SampleStats, removal_order
from lit_eff.data.schedule import RemovalSchedule

__all__ = ["RemovalSchedule", "SampleStats", "removal_order"]
