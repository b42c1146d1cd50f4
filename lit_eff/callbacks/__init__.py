"""The kit's Lightning callbacks."""

from lit_eff.callbacks.flops_budget import FlopsBudget
from lit_eff.callbacks.flops_monitor import FlopsMonitor

__all__ = ["FlopsBudget", "FlopsMonitor"]
