"""PyramidDrop-style token dropping for vision transformers."""

from __future__ import annotations

from typing import Any, Literal

from lightning.pytorch import LightningModule, Trainer
from typing_extensions import override

from lit_eff import validation
from lit_eff.callbacks._tokens import TokenCallback, check_blocks, check_blocks_in_range, check_fraction, value_at
from lit_eff.schedules import Schedule
from lit_eff.tokens.drop import MODES, QUERIES, TokenDropper
from lit_eff.tokens.select import SCORES


class TokenDrop(TokenCallback):
    """Keeps a shrinking share of the patch tokens at chosen blocks and removes the rest, so every
    later block, the final norm and the pooling run on fewer tokens (PyramidDrop; vision only;
    :mod:`lit_eff.tokens.drop`; docs/techniques/token_drop.md).

    Args:
        blocks: block indices where a stage starts, strictly increasing; ``None``: the middle block.
        keep_ratios: fraction of the patch tokens kept from each stage on, in (0, 1]; numbers or Schedules.
        score: ``"attn"`` (attention of the query token), ``"cosine"``, ``"norm"`` or ``"random"``.
        apply_in: ``"train"``, ``"eval"`` or ``"both"``.
        query: the token scoring the others: ``"cls"``, ``"mean"`` or ``"auto"`` (mean if pooled or no class token).

    Example (keep 1 -> 0.5 -> 0.25 at a third and two thirds of a 12-block ViT)::

        trainer:
          callbacks+:
            - class_path: lit_eff.callbacks.TokenDrop
              init_args: {blocks: [4, 8], keep_ratios: [0.5, 0.25], score: attn}
    """

    kind = "drops tokens at"
    changes_length = True

    def __init__(self, blocks: list[int] | None = None, keep_ratios: list[float | Schedule] | None = None,
                 score: Literal["attn", "cosine", "norm", "random"] = "attn",
                 apply_in: Literal["train", "eval", "both"] = "both",
                 query: Literal["auto", "cls", "mean"] = "auto") -> None:
        super().__init__()
        self.blocks = check_blocks("blocks", blocks)
        keep_ratios = [0.5] if keep_ratios is None else keep_ratios
        if not isinstance(keep_ratios, (list, tuple)) or not keep_ratios:
            raise ValueError("Expected `keep_ratios` to be a non-empty list of fractions, "
                             f"got keep_ratios={keep_ratios!r}")
        for ratio in keep_ratios:
            check_fraction("keep_ratios", ratio)
        if blocks is not None and len(blocks) != len(keep_ratios):
            raise ValueError(f"Expected one `keep_ratios` value per block, got blocks={list(blocks)} and "
                             f"keep_ratios={list(keep_ratios)}")
        if blocks is None and len(keep_ratios) != 1:
            raise ValueError(f"Expected `blocks` with {len(keep_ratios)} keep ratios (blocks=None means one stage "
                             f"at the middle block), got keep_ratios={list(keep_ratios)}")
        validation.check_choice("score", score, SCORES)
        validation.check_choice("apply_in", apply_in, MODES)
        validation.check_choice("query", query, QUERIES)
        self.keep_ratios = list(keep_ratios)
        self.score, self.apply_in, self.query = score, apply_in, query

    def ratios_at(self, step: int) -> tuple[float, ...]:
        return tuple(value_at(r, step) for r in self.keep_ratios)

    plan_values = ratios_at  # the ratios decide the tokens each block processes

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
        self.check_schedules(trainer, stage, [("keep_ratios", r) for r in self.keep_ratios])
        self.claim(trainer, blocks)
        self.machinery = TokenDropper(adapter, blocks, self.ratios_at(trainer.global_step), self.score,
                                      self.apply_in, query=self.query)

    @override
    def prepare(self, trainer: Trainer, pl_module: LightningModule, step: int, keys: tuple, inputs: Any,
                training: bool) -> None:
        m: TokenDropper = self.machinery
        m.set_ratios(self.ratios_at(step), m.adapter.tokens_in(inputs) - m.adapter.num_prefix_tokens)
        if self.score == "random" and m.active(training):
            choice = m.draw(keys, inputs.shape[0], pl_module.device)
            if training:
                self.last_choice = choice

    @override
    def counts(self, trainer: Trainer, step: int, tokens: int) -> list[int]:
        return self.machinery.lengths(tokens, self.ratios_at(step))

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        m: TokenDropper = self.machinery
        if m is None or not m.active(True):
            return
        kept = zip(m.stages, m.kept(m.ratios, m.patches))
        self.log_step_values(trainer, pl_module, {f"tokens/kept_fraction/block{b}": k / m.patches for b, k in kept})

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(blocks=self.blocks, score=self.score)
