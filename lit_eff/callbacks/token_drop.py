"""PyramidDrop-style token dropping for vision transformers."""

from __future__ import annotations

from typing import Any, Literal

from lightning.pytorch import LightningModule, Trainer
from typing_extensions import override

from lit_eff.callbacks._checks import check_choice
from lit_eff.callbacks._tokens import (TokenCallback, check_blocks, check_blocks_in_range, check_fraction,
                                       value_at)
from lit_eff.schedules import Schedule
from lit_eff.tokens.drop import MODES, QUERIES, TokenDropper
from lit_eff.tokens.select import SCORES


class TokenDrop(TokenCallback):
    """Keeps a shrinking share of the patch tokens at chosen blocks and physically removes the
    rest, so every later block, the final norm and the pooling run on fewer tokens
    (PyramidDrop, ALGORITHMS.md §7.1; :mod:`lit_eff.tokens.drop`).

    At ``blocks[i]``, the patch tokens entering the block are scored and the top
    ``⌊N₀·keep_ratios[i]⌋`` are kept in their original order (N₀: patch tokens at the first
    block); prefix tokens (class, registers) are always kept. Scores (no gradient):

    - ``"attn"``: attention of the class token over the tokens, from the block's own ``norm1``
      and q/k projections: one query row against all keys (about a third of the block's qkv
      projection, no attention matrix);
    - ``"cosine"``: cosine similarity to the class token; ``"norm"``: feature L2 norm;
    - ``"random"``: uniform, from a generator keyed by (run seed, step, batch, block), the same
      on every DDP rank.

    The query of ``"attn"`` and ``"cosine"`` (``query``) is the class token, or the mean token:
    ``"auto"`` takes the mean token when the model pools by averaging (its class token does not
    feed the head; on the digits ViT, class-token attention picked worse tokens than random) or
    has no class token. A keep
    ratio may be a :class:`~lit_eff.schedules.Schedule` of the optimizer step (for example from
    1.0 down to 0.5). ``apply_in`` chooses training, evaluation or both. Vision only: a causal
    language model cannot lose tokens for good (use :class:`TokenSkip`).

    Logs ``tokens/kept_fraction/block{b}`` (patch tokens kept after the stage at block ``b``, over
    N₀), ``tokens/layer_tokens`` (tokens that entered a block, running total) and
    ``tokens/layer_token_fraction`` (the same per step, over the dense count).
    :class:`FlopsMonitor` sees the reduced shapes directly.

    Runs on: ``setup`` (finds the blocks through :mod:`lit_eff.tokens.adapters`, checks, puts a
    forward pre-hook on the block instances), ``on_train_batch_start`` and the evaluation batch
    starts (scheduled ratios, seed keys), ``on_train_batch_end`` (logging), ``teardown``
    (hooks removed: a plain model again).

    Args:
        blocks: block indices where a stage starts, strictly increasing; ``None``: the middle
            block (``depth // 2``).
        keep_ratios: fraction of the original patch tokens kept from each stage on, in (0, 1];
            numbers or Schedules, one per block.
        score: ``"attn"``, ``"cosine"``, ``"norm"`` or ``"random"``.
        apply_in: ``"train"``, ``"eval"`` or ``"both"``.
        query: ``"auto"``, ``"cls"`` or ``"mean"``: the token whose view scores the others.

    Example (keep 1 -> 0.5 -> 0.25 at a third and two thirds of a 12-block ViT)::

        trainer:
          callbacks+:
            - class_path: lit_eff.callbacks.TokenDrop
              init_args: {blocks: [4, 8], keep_ratios: [0.5, 0.25], score: attn}
    """

    kind = "drops tokens at"

    def __init__(
        self,
        blocks: list[int] | None = None,
        keep_ratios: list[float | Schedule] | None = None,
        score: Literal["attn", "cosine", "norm", "random"] = "attn",
        apply_in: Literal["train", "eval", "both"] = "both",
        query: Literal["auto", "cls", "mean"] = "auto",
    ) -> None:
        super().__init__()
        check_blocks("blocks", blocks)
        keep_ratios = [0.5] if keep_ratios is None else keep_ratios
        if isinstance(keep_ratios, (str, bytes)) or not isinstance(keep_ratios, (list, tuple)) or not keep_ratios:
            raise ValueError(f"Expected `keep_ratios` to be a non-empty list of fractions, got keep_ratios={keep_ratios!r}")
        for ratio in keep_ratios:
            check_fraction("keep_ratios", ratio)
        if blocks is not None and len(blocks) != len(keep_ratios):
            raise ValueError(f"Expected one `keep_ratios` value per block, got blocks={list(blocks)} and "
                             f"keep_ratios={list(keep_ratios)}")
        if blocks is None and len(keep_ratios) != 1:
            raise ValueError(f"Expected `blocks` with {len(keep_ratios)} keep ratios (blocks=None means one stage "
                             f"at the middle block), got keep_ratios={list(keep_ratios)}")
        check_choice("score", score, SCORES)
        check_choice("apply_in", apply_in, MODES)
        check_choice("query", query, QUERIES)
        self.blocks = None if blocks is None else list(blocks)
        self.keep_ratios = list(keep_ratios)
        self.score = score
        self.apply_in = apply_in
        self.query = query

    @override
    def conflicts_with(self, other: TokenCallback) -> str | None:
        from lit_eff.callbacks.token_merge import TokenMerge

        if isinstance(other, (TokenMerge, TokenDrop)):
            return (f"{type(other).__name__} and TokenDrop both change the token count of the whole model "
                    "(merged token sizes and dropped tokens cannot be tracked together)")
        return None

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.attached_to(pl_module):
            return
        adapter = self.adapter_for(pl_module)
        if adapter.causal:
            raise ValueError(f"TokenDrop removes tokens for good, which breaks a causal language model "
                             f"({type(adapter.model).__name__}: every position needs its output); use "
                             "lit_eff.callbacks.TokenSkip, which passes skipped tokens through unchanged")
        blocks = self.blocks if self.blocks is not None else [adapter.depth // 2]
        check_blocks_in_range("blocks", blocks, adapter)
        self.claim(trainer, blocks)
        self.machinery = TokenDropper(adapter, blocks, [value_at(r, trainer.global_step, "keep_ratios")
                                                        for r in self.keep_ratios], self.score, self.apply_in,
                                      query=self.query)
        self._apply_restored()

    @override
    def update(self, trainer: Trainer, step: int) -> None:
        self.machinery.ratios = [value_at(r, step, "keep_ratios") for r in self.keep_ratios]

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        m = self.machinery
        if m is None or not m.active(True):
            return
        self.log_step_values(trainer, pl_module, {f"tokens/kept_fraction/block{block}": fraction
                                                  for block, fraction in zip(m.stages, m.kept_fraction)})

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.detach()

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(blocks=self.blocks, score=self.score)
