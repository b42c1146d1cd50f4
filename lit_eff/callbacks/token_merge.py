"""ToMe token merging for vision transformers, training-free at evaluation or during training."""

from __future__ import annotations

from typing import Any, Literal

from lightning.pytorch import LightningModule, Trainer
from typing_extensions import override

from lit_eff import validation
from lit_eff.callbacks._tokens import TokenCallback, check_blocks, check_blocks_in_range
from lit_eff.tokens.drop import MODES
from lit_eff.tokens.merge import VARIANTS, TokenMerger, check_merge_fits, merge_schedule


class TokenMerge(TokenCallback):
    """Merges ``r`` tokens in each chosen block by bipartite soft matching, as the official ToMe
    code does; ``apply_in="eval"`` (default) is training-free: train dense, evaluate merged
    (:mod:`lit_eff.tokens.merge`; docs/techniques/token_merge.md).

    Args:
        r: tokens merged per chosen block (an integer), or one integer per block of the model.
        blocks: the blocks that merge ``r`` tokens (``None``: all); ignored when ``r`` is a list.
        prop_attn: proportional attention (``+log(size)`` on the attention logits).
        apply_in: ``"train"``, ``"eval"`` or ``"both"``.
        variant: ``"official"`` (ToMe's split and order) or ``"ordered"`` (unmerged tokens keep their order).

    Example (merge 4 tokens in every block, at evaluation only)::

        trainer:
          callbacks+:
            - class_path: lit_eff.callbacks.TokenMerge
              init_args: {r: 4, apply_in: eval}
    """

    kind = "merges tokens in"
    changes_length = True

    def __init__(self, r: int | list[int] = 4, blocks: list[int] | None = None, prop_attn: bool = True,
                 apply_in: Literal["train", "eval", "both"] = "eval",
                 variant: Literal["official", "ordered"] = "official") -> None:
        super().__init__()
        if validation.is_int(r):
            validation.check_int("r", r, minimum=0)
        elif not isinstance(r, (list, tuple)) or not r or not all(validation.is_int(v) and v >= 0 for v in r):
            raise ValueError(f"Expected `r` to be an integer >= 0 or a list of them (one per block), got r={r!r}")
        self.blocks = check_blocks("blocks", blocks)
        validation.check_choice("apply_in", apply_in, MODES)
        validation.check_choice("variant", variant, VARIANTS)
        if not isinstance(prop_attn, bool):
            raise ValueError(f"Expected `prop_attn` to be true or false, got prop_attn={prop_attn!r}")
        self.r = r if validation.is_int(r) else list(r)
        self.prop_attn, self.apply_in, self.variant = prop_attn, apply_in, variant

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.attached_to(pl_module):
            return
        adapter = self.adapter_for(pl_module)
        if adapter.causal:
            raise ValueError(f"TokenMerge averages tokens together, which breaks a causal language model "
                             f"({type(adapter.model).__name__}); use lit_eff.callbacks.TokenSkip")
        check_blocks_in_range("blocks", self.blocks, adapter)
        if isinstance(self.r, list) and len(self.r) != adapter.depth:
            raise ValueError(f"Expected one `r` per block ({adapter.depth} blocks), got r={self.r}")
        schedule = merge_schedule(adapter.depth, self.r, self.blocks)
        if adapter.num_patches is not None:
            check_merge_fits(schedule, adapter.num_patches)
        first = next((i for i, v in enumerate(schedule) if v > 0), adapter.depth)
        self.claim(trainer, list(range(first, adapter.depth)))
        self.machinery = TokenMerger(adapter, schedule, self.prop_attn, self.apply_in, self.variant)

    def kept_fraction(self, training: bool) -> float | None:
        m: TokenMerger = self.machinery
        tokens = self._last_tokens or (None if m.adapter.num_patches is None
                                       else m.adapter.num_patches + m.adapter.num_prefix_tokens)
        return None if tokens is None else m.tokens_out(tokens, training) / tokens

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.machinery is None or not self.machinery.active(True):
            return
        self.log_step_values(trainer, pl_module, {"tokens/kept_fraction": self.kept_fraction(True)})

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.machinery is None or not self.machinery.active(False) or trainer.sanity_checking:
            return
        if (fraction := self.kept_fraction(False)) is not None:
            pl_module.log("tokens/eval_kept_fraction", fraction, batch_size=1)

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(r=self.r, blocks=self.blocks)
