"""Token reduction for transformers: dropping (PyramidDrop), merging (ToMe) and skipping
(random-LTD, Mixture-of-Depths), with adapters that find a model's blocks and tokens.

The callbacks (:class:`~lit_eff.callbacks.TokenDrop`, :class:`~lit_eff.callbacks.TokenMerge`,
:class:`~lit_eff.callbacks.TokenSkip`) are thin layers over the ``attach_*`` functions here,
which also work outside a Trainer. Tokens are physically removed (gather/scatter), so the work
really shrinks and :class:`~lit_eff.callbacks.FlopsMonitor` counts the reduced shapes.
"""

from lit_eff.tokens.adapters import TokenAdapter, find_adapter, register_adapter
from lit_eff.tokens.drop import TokenDropper, attach_drop
from lit_eff.tokens.merge import TokenMerger, attach_merge, bipartite_merge
from lit_eff.tokens.select import SCORES, gather_tokens, scatter_tokens, score_tokens, topk_sorted
from lit_eff.tokens.skip import TokenSkipper, attach_skip

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
    "register_adapter",
    "scatter_tokens",
    "score_tokens",
    "topk_sorted",
]
