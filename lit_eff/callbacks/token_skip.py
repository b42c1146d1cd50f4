"""Token skipping for language and vision transformers: random-LTD and Mixture-of-Depths."""

from __future__ import annotations

from typing import Any, Literal

from lightning.pytorch import LightningModule, Trainer
from typing_extensions import override

from lit_eff.callbacks._checks import check_choice, is_int, is_number
from lit_eff.callbacks._tokens import (TokenCallback, check_blocks, check_blocks_in_range, check_fraction,
                                       value_at)
from lit_eff.schedules import Schedule
from lit_eff.tokens.skip import TokenSkipper

_METHODS = ("ltd", "mod")
_ROUTING = ("auto", "topk", "threshold")


class TokenSkip(TokenCallback):
    """Chosen blocks process only a subset of the tokens; the others pass through unchanged, in
    place (:mod:`lit_eff.tokens.skip`; ALGORITHMS.md §7.2, §7.3).

    Kept tokens are gathered in their original order (prefix tokens always kept), run through the
    block and scattered back; positions live in the hidden states, so they are preserved, and in
    a causal model the kept tokens attend only to kept earlier tokens.

    - ``method="ltd"`` (random-LTD): each skipping block keeps a random ``keep`` fraction per
      sample in training (evaluation runs every token). ``keep`` may be a
      :class:`~lit_eff.schedules.Schedule` growing from a minimum to 1.0 (DeepSpeed's
      ``fixed_linear``); draws come from a generator keyed by (run seed, step, batch, block),
      identical on every DDP rank, and a resumed run repeats them. Default blocks: 1..L−2.
    - ``method="mod"`` (Mixture-of-Depths): a router ``Linear(dim, 1)`` per block (registered on
      the block at ``setup``, so the optimizer trains it and checkpoints hold it) picks the top
      ``capacity`` fraction of each sequence; the block update of a routed token is scaled by
      ``sigmoid(logit)``. Top-k looks at the whole sequence, so it is not causal: a causal model
      is routed at evaluation (and in ``generate()``) by ``sigmoid(logit) > 0.5``, each token on
      its own, trained by a binary cross-entropy auxiliary loss (weight ``aux_loss_weight``;
      target: in the training top-k). Default blocks: every other block from 1.

    The MoD routers and routing are part of the trained model, so they stay attached after
    ``teardown`` (call :meth:`detach` to remove the routing); random-LTD is removed at
    ``teardown``. Under 16-bit AMP with a gradient scaler the auxiliary gradient would not be
    scaled, so ``"mod"`` refuses ``precision="16-mixed"`` (``bf16-mixed`` works).

    Logs ``tokens/kept_fraction/block{b}`` (tokens a block processed over its input),
    ``tokens/keep``, ``tokens/layer_tokens``, ``tokens/layer_token_fraction``, and for ``"mod"``
    ``tokens/router_aux_loss`` and ``tokens/router_capacity_use`` (share of tokens with
    ``sigmoid(logit) > 0.5``, over ``capacity``: 1.0 when the causal rule matches capacity).

    Runs on: ``setup`` (blocks, routers, instance ``forward`` wrappers), ``on_train_batch_start``
    (scheduled ``keep``, seed keys), ``on_train_batch_end`` (logging), ``teardown``.

    Args:
        method: ``"ltd"`` or ``"mod"``.
        blocks: indices of the skipping blocks (strictly increasing); ``None``: the default above.
        keep: fraction of the tokens each block processes (``"ltd"``), in (0, 1]; a number or a Schedule.
        capacity: fraction of each sequence routed through each block (``"mod"``), in (0, 1].
        aux_loss_weight: weight of the router loss (``"mod"``); 0 turns it off.
        eval_routing: ``"auto"`` (threshold for causal models, top-k otherwise), ``"topk"`` or
            ``"threshold"`` (``"mod"``).
        multiple_of: round kept counts down to a multiple of this (random-LTD's ``seq_per_step``).

    Example (random-LTD, kept tokens growing from 50% to all over 1000 steps)::

        trainer:
          callbacks+:
            - class_path: lit_eff.callbacks.TokenSkip
              init_args:
                method: ltd
                keep:
                  class_path: lit_eff.schedules.Linear
                  init_args: {start: 0.5, end: 1.0, end_step: 1000}
    """

    kind = "skips tokens in"

    def __init__(
        self,
        method: Literal["ltd", "mod"] = "ltd",
        blocks: list[int] | None = None,
        keep: float | Schedule = 0.5,
        capacity: float = 0.125,
        aux_loss_weight: float = 0.01,
        eval_routing: Literal["auto", "topk", "threshold"] = "auto",
        multiple_of: int = 1,
    ) -> None:
        super().__init__()
        check_choice("method", method, _METHODS)
        check_blocks("blocks", blocks)
        check_fraction("keep", keep)
        check_fraction("capacity", capacity)
        if not is_number(aux_loss_weight) or aux_loss_weight < 0:
            raise ValueError(f"Expected `aux_loss_weight` >= 0, got aux_loss_weight={aux_loss_weight!r}")
        check_choice("eval_routing", eval_routing, _ROUTING)
        if not is_int(multiple_of) or multiple_of < 1:
            raise ValueError(f"Expected `multiple_of` to be an integer >= 1, got multiple_of={multiple_of!r}")
        self.method = method
        self.blocks = None if blocks is None else list(blocks)
        self.keep = keep
        self.capacity = float(capacity)
        self.aux_loss_weight = float(aux_loss_weight)
        self.eval_routing = eval_routing
        self.multiple_of = multiple_of

    def default_blocks(self, depth: int) -> list[int]:
        if self.method == "ltd":
            return list(range(1, depth - 1)) or list(range(depth))
        return list(range(1, depth, 2)) or [0]

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.attached_to(pl_module):
            return
        adapter = self.adapter_for(pl_module)
        blocks = self.blocks if self.blocks is not None else self.default_blocks(adapter.depth)
        check_blocks_in_range("blocks", blocks, adapter)
        if self.method == "mod" and str(trainer.precision) == "16-mixed":
            raise ValueError("TokenSkip(method='mod') cannot run under precision='16-mixed': the gradient scaler "
                             "would not scale the router loss; use 'bf16-mixed' or 32-bit")
        self.claim(trainer, blocks)
        self.machinery = TokenSkipper(adapter, blocks, self.method, value_at(self.keep, trainer.global_step, "keep"),
                                      self.capacity, self.eval_routing, self.multiple_of)
        self.machinery.aux_scale = self.aux_loss_weight / max(1, trainer.accumulate_grad_batches)
        self._apply_restored()

    @override
    def update(self, trainer: Trainer, step: int) -> None:
        self.machinery.keep = value_at(self.keep, step, "keep")
        self.machinery.aux_scale = self.aux_loss_weight / max(1, trainer.accumulate_grad_batches)

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        m = self.machinery
        if m is None:
            return
        values = {f"tokens/kept_fraction/block{block}": fraction for block, fraction in zip(m.blocks, m.processed)}
        if self.method == "ltd":
            values["tokens/keep"] = m.keep
        else:
            values["tokens/router_aux_loss"] = m.aux_loss
            values["tokens/router_capacity_use"] = m.router_fraction / m.capacity
        self.log_step_values(trainer, pl_module, values)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.method == "ltd":
            self.detach()

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(method=self.method, blocks=self.blocks)
