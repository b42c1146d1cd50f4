"""The kit's Lightning callbacks."""

from lit_eff.callbacks.data_removal import DynamicDataRemoval
from lit_eff.callbacks.distillation import KnowledgeDistillation
from lit_eff.callbacks.dynamic_sparsity import DynamicSparsity
from lit_eff.callbacks.flops_budget import FlopsBudget
from lit_eff.callbacks.flops_monitor import FlopsMonitor
from lit_eff.callbacks.gradient_masking import GradientMasking
from lit_eff.callbacks.layer_freezing import LayerFreezing
from lit_eff.callbacks.magnitude_pruning import MagnitudePruning
from lit_eff.callbacks.nm_sparsity import NMSparsity
from lit_eff.callbacks.replay import Replay
from lit_eff.callbacks.sparse_ift import SparseIFT
from lit_eff.callbacks.sparsity_monitor import SparsityMonitor
from lit_eff.callbacks.static_sparsity import StaticSparsity
from lit_eff.callbacks.structured_ffn import StructuredFFN
from lit_eff.callbacks.structured_pruning import StructuredPruning
from lit_eff.callbacks.task_aware_masking import TaskAwareMasking
from lit_eff.callbacks.token_drop import TokenDrop
from lit_eff.callbacks.token_merge import TokenMerge
from lit_eff.callbacks.token_skip import TokenSkip

__all__ = ["DynamicSparsity", "FlopsBudget", "FlopsMonitor", "GradientMasking", "LayerFreezing",
           "MagnitudePruning", "NMSparsity", "SparsityMonitor",
           "StaticSparsity", "StructuredFFN", "StructuredPruning", "TokenDrop", "TokenMerge", "TokenSkip",
           "KnowledgeDistillation", "DynamicDataRemoval", "SparseIFT", "Replay", "TaskAwareMasking"]
