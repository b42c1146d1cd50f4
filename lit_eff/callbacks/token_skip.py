"""Token skipping for language and vision transformers: random-LTD and Mixture-of-Depths."""

from __future__ import annotations

from typing import Any, Literal

from lightning.pytorch import LightningModule, Trainer
from typing_extensions import override

from lit_eff import validation
from lit_eff.callbacks._tokens import TokenCallback, check_blocks, check_blocks_in_range, check_fraction, value_at
from lit_eff.schedules import Schedule
from lit_eff.tokens.skip import TokenSkipper


class TokenSkip(TokenCallback):
    """Chosen blocks process only a subset of the tokens; the others pass through unchanged, in
    place (:mod:`lit_eff.tokens.skip`; docs/techniques/token_skip.md).

    ``method="ltd"`` (random-LTD): each block keeps a random ``keep`` fraction per sample in training.
    ``method="mod"`` (Mixture-of-Depths): a learned router per block (part of the model, kept after
    ``teardown``) routes the top ``capacity`` fraction of each sequence.

    Args:
        method: ``"ltd"`` or ``"mod"``.
        blocks: the skipping blocks (strictly increasing); ``None``: 1..L−2 (ltd), every other block from 1 (mod).
        keep: fraction of the tokens each block processes (``"ltd"``), in (0, 1]; a number or a Schedule.
        capacity: fraction of each sequence routed through each block (``"mod"``), in (0, 1].
        aux_loss_weight: weight of the router loss (``"mod"``); 0 turns it off.
        eval_routing: ``"auto"`` (threshold if causal, else top-k), ``"topk"`` or ``"threshold"`` (``"mod"``).
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

    def __init__(self, method: Literal["ltd", "mod"] = "ltd", blocks: list[int] | None = None,
                 keep: float | Schedule = 0.5, capacity: float = 0.125, aux_loss_weight: float = 0.01,
                 eval_routing: Literal["auto", "topk", "threshold"] = "auto", multiple_of: int = 1) -> None:
        super().__init__()
        validation.check_choice("method", method, ("ltd", "mod"))
        self.blocks = check_blocks("blocks", blocks)
        check_fraction("keep", keep)
        check_fraction("capacity", capacity)
        validation.check_number("aux_loss_weight", aux_loss_weight, low=0.0)
        validation.check_choice("eval_routing", eval_routing, ("auto", "topk", "threshold"))
        validation.check_int("multiple_of", multiple_of, minimum=1)
        self.method, self.keep, self.capacity = method, keep, float(capacity)
        self.aux_loss_weight, self.eval_routing, self.multiple_of = float(aux_loss_weight), eval_routing, multiple_of

    @override
    def plan_values(self, step: int) -> float:
        return value_at(self.keep, step)

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
        self.check_schedules(trainer, stage, [("keep", self.keep)])
        self.claim(trainer, blocks)
        self.machinery = TokenSkipper(adapter, blocks, self.method, value_at(self.keep, trainer.global_step),
                                      self.capacity, self.eval_routing, self.multiple_of)
        self.machinery.aux_scale = self.aux_loss_weight / max(1, trainer.accumulate_grad_batches)

    @override
    def prepare(self, trainer: Trainer, pl_module: LightningModule, step: int, keys: tuple, inputs: Any,
                training: bool) -> None:
        m: TokenSkipper = self.machinery
        m.keep = value_at(self.keep, step)
        m.aux_scale = self.aux_loss_weight / max(1, trainer.accumulate_grad_batches)
        if training and self.method == "ltd":
            tokens = self.lengths(trainer, m.adapter.tokens_in(inputs))
            self.last_choice = m.draw(keys, inputs.shape[0], tokens, pl_module.device)

    @override
    def counts(self, trainer: Trainer, step: int, tokens: int) -> list[int]:
        lengths = self.lengths(trainer, tokens)
        processed = dict(zip(self.machinery.blocks, self.machinery.processed(lengths, value_at(self.keep, step))))
        return [processed.get(i, n) for i, n in enumerate(lengths)]

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        m: TokenSkipper = self.machinery
        if m is None or self._last_tokens is None:
            return
        lengths = self.lengths(trainer, self._last_tokens)
        values: dict[str, Any] = {f"tokens/kept_fraction/block{block}": n / lengths[block]
                                  for block, n in zip(m.blocks, m.processed(lengths))}
        if self.method == "ltd":
            values["tokens/keep"] = m.keep
        else:
            n = len(m.settings)
            values["tokens/router_aux_loss"] = sum(s.aux_loss for s in m.settings) / n
            values["tokens/router_capacity_use"] = sum(s.router_fraction for s in m.settings) / n / self.capacity
        self.log_step_values(trainer, pl_module, values)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.method == "ltd":
            self.detach()

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(method=self.method, blocks=self.blocks)
