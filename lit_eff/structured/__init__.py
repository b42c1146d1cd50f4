"""Structured techniques that shrink the executed FLOPs: structured feed-forward layers
(low-rank and block-diagonal, with self-guided training) and structured pruning (LAPP and a
magnitude baseline) that physically removes heads, MLP units and channels."""

from lit_eff.structured.cost import CostModel, probe, uniform_ratio
from lit_eff.structured.ffn import (DEFAULT_FFN, STRUCTURES, find_linears, guide_alpha, structure_linears,
                                    structured_layers, to_plain_linears)
from lit_eff.structured.gates import PruningGate, attach_gates, detach_gates, soft_mask
from lit_eff.structured.groups import KINDS, AttentionHeads, ConvChannels, Group, MlpUnits, find_groups
from lit_eff.structured.linear import (BlockDenseLinear, BlockShuffleLinear, LowRankLinear, StructuredLinear,
                                       to_linear)

__all__ = [
    "DEFAULT_FFN", "KINDS", "STRUCTURES", "AttentionHeads", "BlockDenseLinear", "BlockShuffleLinear", "ConvChannels",
    "CostModel", "Group", "LowRankLinear", "MlpUnits", "PruningGate", "StructuredLinear", "attach_gates",
    "detach_gates", "find_groups", "find_linears", "guide_alpha", "probe", "soft_mask", "structure_linears",
    "structured_layers", "to_linear", "to_plain_linears", "uniform_ratio",
]
