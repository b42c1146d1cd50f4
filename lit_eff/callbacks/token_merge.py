"""ToMe token merging for vision transformers, training-free at evaluation or during training."""

from __future__ import annotations

from typing import Any, Literal

from lightning.pytorch import LightningModule, Trainer
from typing_extensions import override

from lit_eff.callbacks._checks import check_choice, is_int
from lit_eff.callbacks._tokens import TokenCallback, check_blocks, check_blocks_in_range
from lit_eff.tokens.drop import MODES
from lit_eff.tokens.merge import TokenMerger, check_merge_fits, merge_schedule


class TokenMerge(TokenCallback):
    """Merges ``r`` tokens in each chosen block by bipartite soft matching (ToMe, ALGORITHMS.md
    §7.4; :mod:`lit_eff.tokens.merge`).

    Between attention and MLP, patch tokens split alternately into A and B; each A token's most
    similar B token (cosine of attention keys averaged over heads) is its partner, and the ``r``
    best-matched A tokens are averaged into their partners, weighted by size (patches per token).
    The class and other prefix tokens are never merged. With ``prop_attn``, attention adds
    ``log(size)`` to the logits through the ``attn_mask`` of timm's own attention, so the fused
    ``scaled_dot_product_attention`` path is kept. Average pooling becomes size-weighted.

    ``apply_in="eval"`` (default) makes it training-free: train dense, evaluate merged.
    ``"train"``/``"both"`` merge during training too (no new parameters).

    Logs ``tokens/kept_fraction`` (tokens leaving the last block over tokens entering the first)
    at each training step or, when merging only at evaluation, once per validation epoch, plus
    ``tokens/layer_tokens`` and ``tokens/layer_token_fraction`` during training.

    Runs on: ``setup`` (checks that ``r`` fits the patch count, replaces ``forward`` on the
    block instances from the first merging block on), ``on_train_batch_end`` /
    ``on_validation_epoch_end`` (logging), ``teardown`` (forwards restored).

    Args:
        r: tokens merged per chosen block (an integer), or one integer per block of the model.
        blocks: the blocks that merge ``r`` tokens (``None``: all); ignored when ``r`` is a list.
        prop_attn: proportional attention (``+log(size)`` on the attention logits).
        apply_in: ``"train"``, ``"eval"`` or ``"both"``.

    Example (merge 4 tokens in every block, at evaluation only)::

        trainer:
          callbacks+:
            - class_path: lit_eff.callbacks.TokenMerge
              init_args: {r: 4, apply_in: eval}
    """

    kind = "merges tokens in"

    def __init__(
        self,
        r: int | list[int] = 4,
        blocks: list[int] | None = None,
        prop_attn: bool = True,
        apply_in: Literal["train", "eval", "both"] = "eval",
    ) -> None:
        super().__init__()
        if is_int(r):
            if r < 0:
                raise ValueError(f"Expected `r` >= 0 (tokens merged per block), got r={r}")
        elif not isinstance(r, (list, tuple)) or not r or not all(is_int(v) and v >= 0 for v in r):
            raise ValueError(f"Expected `r` to be an integer >= 0 or a list of them (one per block), got r={r!r}")
        check_blocks("blocks", blocks)
        check_choice("apply_in", apply_in, MODES)
        if not isinstance(prop_attn, bool):
            raise ValueError(f"Expected `prop_attn` to be true or false, got prop_attn={prop_attn!r}")
        self.r = r if is_int(r) else list(r)
        self.blocks = None if blocks is None else list(blocks)
        self.prop_attn = prop_attn
        self.apply_in = apply_in

    @override
    def conflicts_with(self, other: TokenCallback) -> str | None:
        if isinstance(other, TokenMerge):
            return "two TokenMerge callbacks would each track token sizes; use one with a list `r`"
        from lit_eff.callbacks.token_drop import TokenDrop

        if isinstance(other, TokenDrop):
            return other.conflicts_with(self)
        return None

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.attached_to(pl_module):
            return
        adapter = self.adapter_for(pl_module)
        if adapter.causal:
            raise ValueError(f"TokenMerge averages tokens together, which breaks a causal language model "
                             f"({type(adapter.model).__name__}); use lit_eff.callbacks.TokenSkip")
        if self.blocks is not None:
            check_blocks_in_range("blocks", self.blocks, adapter)
        if isinstance(self.r, list) and len(self.r) != adapter.depth:
            raise ValueError(f"Expected one `r` per block ({adapter.depth} blocks), got r={self.r}")
        schedule = merge_schedule(adapter.depth, self.r, self.blocks)
        if adapter.num_patches is not None:
            check_merge_fits(schedule, adapter.num_patches)
        first = next((i for i, v in enumerate(schedule) if v > 0), adapter.depth)
        self.claim(trainer, list(range(first, adapter.depth)))
        self.machinery = TokenMerger(adapter, schedule, self.prop_attn, self.apply_in)
        self._apply_restored()

    def kept_fraction(self) -> float | None:
        m = self.machinery
        n_in = m.adapter.num_patches
        if n_in is None or not m.tokens_out or not m.tokens_out[-1]:
            return None
        return m.tokens_out[-1] / (n_in + m.adapter.num_prefix_tokens)

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.machinery is None or not self.machinery.active(True):
            return
        fraction = self.kept_fraction()
        self.log_step_values(trainer, pl_module, {} if fraction is None else {"tokens/kept_fraction": fraction})

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.machinery is None or not self.machinery.active(False) or trainer.sanity_checking:
            return
        fraction = self.kept_fraction()
        if fraction is not None:
            pl_module.log("tokens/eval_kept_fraction", fraction, batch_size=1)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.detach()

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(r=self.r, blocks=self.blocks)
