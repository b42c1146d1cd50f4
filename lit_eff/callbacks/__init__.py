"""The kit's Lightning callbacks."""

from lit_eff.callbacks.dynamic_sparsity import DynamicSparsity
from lit_eff.callbacks.flops_budget import FlopsBudget
from lit_eff.callbacks.flops_monitor import FlopsMonitor
from lit_eff.callbacks.magnitude_pruning import MagnitudePruning
from lit_eff.callbacks.nm_sparsity import NMSparsity
from lit_eff.callbacks.sparsity_monitor import SparsityMonitor
from lit_eff.callbacks.static_sparsity import StaticSparsity

__all__ = ["DynamicSparsity", "FlopsBudget", "FlopsMonitor", "MagnitudePruning", "NMSparsity", "SparsityMonitor",
           "StaticSparsity"]
