"""Token reduction for transformers: dropping (PyramidDrop), merging (ToMe) and skipping
(random-LTD, Mixture-of-Depths), with adapters that find a model's blocks and tokens.

The callbacks (:class:`~lit_eff.callbacks.TokenDrop`, :class:`~lit_eff.callbacks.TokenMerge`,
:class:`~lit_eff.callbacks.TokenSkip`) are thin layers over the ``attach_*`` functions here,
which also work outside a Trainer. Tokens are physically removed (gather/scatter), so the work
really shrinks and :class:`~lit_eff.callbacks.FlopsMonitor` counts the reduced shapes. Each
technique swaps the class of the block instances it changes (:mod:`lit_eff.tokens.attach`), so a
deep copy of the model (EMA, SWA) computes with its own weights.
"""

from lit_eff.tokens.adapters import TokenAdapter, find_adapter, register_adapter
from lit_eff.tokens.drop import TokenDropper, attach_drop
from lit_eff.tokens.merge import TokenMerger, attach_merge, bipartite_merge, ordered_merge, tome_merge
from lit_eff.tokens.select import SCORES, gather_tokens, scatter_tokens, score_tokens, topk_sorted
from lit_eff.tokens.skip import TokenSkipper, attach_skip, restore_routers

__all__ = [
    "SCORES",
    "TokenAdapter",
    "TokenDropper",
    "TokenMerger",
    "TokenSkipper",
    "attach_drop",
    "attach_merge",
    "attach_skip",
    "bipartite_merge",
    "find_adapter",
    "gather_tokens",
    "ordered_merge",
    "register_adapter",
    "restore_routers",
    "scatter_tokens",
    "score_tokens",
    "tome_merge",
    "topk_sorted",
]
