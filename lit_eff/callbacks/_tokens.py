"""What the token callbacks share: block checks, claims on blocks, per-batch preparation outside
``forward`` and token counts derived from the structure of the step."""

from __future__ import annotations

import contextlib
from collections.abc import Hashable, Iterator
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from typing_extensions import override

from lit_eff import validation
from lit_eff.callbacks.technique import Technique, log_step
from lit_eff.schedules import Schedule
from lit_eff.seeding import run_seed
from lit_eff.tokens.adapters import TokenAdapter, find_adapter

_STATE = ("layer_tokens", "dense_layer_tokens", "last_choice")  # checkpoint state of every token callback


def check_blocks(name: str, blocks: Any) -> list[int] | None:
    """A strictly increasing list of block indices >= 0, or ``None`` (the default); returns a copy."""
    if blocks is None:
        return None
    if not isinstance(blocks, (list, tuple)) or not blocks or not all(validation.is_int(b) for b in blocks):
        raise ValueError(f"Expected `{name}` to be a non-empty list of block indices (integers), got {name}={blocks!r}")
    if blocks[0] < 0 or any(b <= a for a, b in zip(blocks, blocks[1:])):
        raise ValueError(f"Expected `{name}` to be strictly increasing block indices >= 0, got {name}={list(blocks)}")
    return list(blocks)


def check_blocks_in_range(name: str, blocks: list[int] | None, adapter: TokenAdapter) -> None:
    if blocks is not None and blocks[-1] >= adapter.depth:
        raise ValueError(f"Expected `{name}` < {adapter.depth} (the model has {adapter.depth} blocks, indices "
                         f"0..{adapter.depth - 1}), got {name}={list(blocks)}")


def check_fraction(name: str, value: Any) -> None:
    """A number in (0, 1]; a Schedule is checked at its end points (over the run at ``setup``)."""
    if not isinstance(value, Schedule):
        validation.check_fraction(name, value, low_open=True)
        return
    for probe in (getattr(value, "start", None), getattr(value, "end", None), *getattr(value, "values", [])):
        if probe is not None and not (validation.is_number(probe) and 0.0 < probe <= 1.0):
            raise ValueError(f"Expected `{name}` in (0, 1], got {name}={value!r} (value {probe})")


def value_at(value: float | Schedule, step: int) -> float:
    return float(value(step)) if isinstance(value, Schedule) else float(value)


def first_tensor(batch: Any) -> torch.Tensor | None:
    """The model input of a batch: its first tensor."""
    if isinstance(batch, torch.Tensor):
        return batch
    items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else ()
    return next((found for found in map(first_tensor, items) if found is not None), None)


class TokenCallback(Technique):
    """Base of the token callbacks: finds the adapter, checks claims, prepares each batch
    (:meth:`prepare`) and counts the tokens the blocks process (:meth:`counts`)."""

    kind = "reduces tokens in"  # how messages describe the claim
    changes_length = False  # changes the token count of every later block (one such technique per model)

    def __init__(self) -> None:
        super().__init__()
        self.claimed: list[int] = []
        self.machinery: Any = None
        self.layer_tokens = 0  # tokens that entered a block's computation in training (running total)
        self.dense_layer_tokens = 0  # the same without the technique
        self.last_choice = 0  # a fingerprint of the last random choice (equal on every DDP rank)
        self._logged = (0, 0)
        self._lengths: set[int] = set()  # input token counts of this run (for flops_key)
        self._last_tokens: int | None = None
        self._plan_steps: dict[Hashable, int] = {}
        self._scheduled: list[tuple[str, Any]] = []  # (argument, value) checked over the run

    # attaching --------------------------------------------------------------------------------
    def attached_to(self, pl_module: LightningModule) -> bool:
        """Already attached to this module (a second stage of one run); attached elsewhere: detach."""
        if self.machinery is not None and not any(m is self.machinery.adapter.model for m in pl_module.modules()):
            self.detach()
        return self.machinery is not None

    def adapter_for(self, pl_module: LightningModule) -> TokenAdapter:
        adapter = find_adapter(pl_module)
        if not adapter.knows_length:
            raise ValueError(f"{self.name} needs to know how many tokens an input makes; the {adapter.family} adapter "
                             "has neither `num_patches` nor `sequence_length`")
        if adapter.num_patches is not None:
            self._lengths.add(adapter.num_prefix_tokens + adapter.num_patches)
        return adapter

    def check_schedules(self, trainer: Trainer, stage: str, values: list[tuple[str, Any]]) -> None:
        """Refuse a Schedule that leaves (0, 1] at some step of the run, before training."""
        self._scheduled = values if stage == "fit" else []
        for name, value in [(n, v) for n, v in self._scheduled if isinstance(v, Schedule)]:
            validation.check_schedule_over_run(name, value, self.run_length(trainer), 0.0, 1.0, low_open=True,
                                               who=self.name)

    @override
    def replan(self, trainer: Trainer) -> None:
        self.check_schedules(trainer, "fit", self._scheduled)  # over the planned run

    def claim(self, trainer: Trainer, blocks: list[int]) -> None:
        """Refuse blocks another token callback of ``trainer`` already claimed."""
        for other in [cb for cb in self.others(trainer, TokenCallback) if cb.claimed]:
            clash = sorted(set(blocks) & set(other.claimed))
            why = self.conflict(other) or (clash and f"{other.describe(trainer)} {other.kind} blocks {clash}, which "
                                                     f"{self.describe(trainer)} {self.kind} too")
            if why:
                raise ValueError(f"Two token techniques conflict: {why}. Give them disjoint `blocks` or keep one")
        self.claimed = list(blocks)

    def conflict(self, other: TokenCallback) -> str | None:
        if not (self.changes_length and other.changes_length):
            return None
        if type(other) is type(self):
            return f"two {self.name} callbacks would both change the token count of the whole model; use one"
        return (f"{other.name} and {self.name} both change the token count of the whole model "
                "(merged token sizes and dropped tokens cannot be tracked together)")

    def lengths(self, trainer: Trainer, tokens: int) -> list[int]:
        """Tokens entering each block in training when ``tokens`` enter the first one."""
        for cb in [self, *self.others(trainer, TokenCallback)]:
            if cb.changes_length and cb.machinery is not None:
                return cb.machinery.lengths(tokens, training=True)
        return [tokens] * self.machinery.adapter.depth

    # per batch --------------------------------------------------------------------------------
    def prepare(self, trainer: Trainer, pl_module: LightningModule, step: int, keys: tuple, inputs: torch.Tensor,
                training: bool) -> None:
        """Set the scheduled values of optimizer step ``step`` and this batch's random choices on the model."""

    def counts(self, trainer: Trainer, step: int, tokens: int) -> list[int]:
        """Tokens each block processes in a training step at ``step`` when ``tokens`` enter the model."""
        return self.lengths(trainer, tokens)

    def _inputs(self, batch: Any) -> torch.Tensor:
        if (inputs := first_tensor(batch)) is None:
            raise ValueError(f"{self.name} found no tensor in the batch ({type(batch).__name__}) to read its size from")
        return inputs

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self.machinery is None:
            return
        inputs = self._inputs(batch)
        tokens = self.machinery.adapter.tokens_in(inputs)
        self._lengths.add(tokens)
        self._last_tokens = tokens
        step = trainer.global_step
        self.prepare(trainer, pl_module, step, (run_seed(), step, batch_idx), inputs, True)
        self.layer_tokens += inputs.shape[0] * sum(self.counts(trainer, step, tokens))
        self.dense_layer_tokens += inputs.shape[0] * tokens * self.machinery.adapter.depth

    def _eval_batch(self, trainer: Trainer, pl_module: LightningModule, stage: str, batch: Any, batch_idx: int) -> None:
        if self.machinery is not None:
            step = trainer.global_step
            self.prepare(trainer, pl_module, step, (run_seed(), stage, step, batch_idx), self._inputs(batch), False)

    @override
    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._eval_batch(trainer, pl_module, "val", batch, batch_idx)

    @override
    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._eval_batch(trainer, pl_module, "test", batch, batch_idx)

    @override
    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._eval_batch(trainer, pl_module, "predict", batch, batch_idx)

    @override
    def flops_key(self, trainer: Trainer) -> Hashable:
        """The tokens every block processes at this step, for each input length seen in the run."""
        if self.machinery is None:
            return None
        return tuple((n, tuple(self.counts(trainer, trainer.global_step, n))) for n in sorted(self._lengths))

    # planning a FLOPs budget ------------------------------------------------------------------
    plans_flops = True

    def plan_values(self, step: int) -> Hashable:
        """The scheduled values that decide the tokens each block processes at ``step``."""
        return None

    @override
    def plan_state(self, trainer: Trainer, step: int, total: int) -> Hashable:
        if self.machinery is None:
            return None
        values = self.plan_values(step)
        self._plan_steps.setdefault(values, step)  # a step with these values, to prepare the probe at
        return values

    @override
    @contextlib.contextmanager
    def plan_probe(self, trainer: Trainer, pl_module: LightningModule, state: Hashable, batch: Any) -> Iterator[None]:
        if self.machinery is None:
            yield
            return
        saved = self.technique_state()
        step = self._plan_steps.get(state, 0)
        self.prepare(trainer, pl_module, step, (run_seed(), step, 0), self._inputs(batch), True)
        try:
            yield
        finally:
            self.load_technique_state(saved)

    # logging and state ------------------------------------------------------------------------
    def token_counts(self) -> dict[str, float]:
        """``tokens/layer_tokens`` (running total) and ``tokens/layer_token_fraction`` (since the last call)."""
        done, dense = self.layer_tokens - self._logged[0], self.dense_layer_tokens - self._logged[1]
        self._logged = (self.layer_tokens, self.dense_layer_tokens)
        values = {"tokens/layer_tokens": float(self.layer_tokens)}
        if dense:
            values["tokens/layer_token_fraction"] = done / dense
        return values

    def log_step_values(self, trainer: Trainer, pl_module: LightningModule, values: dict[str, Any]) -> None:
        """Log ``values`` and the token counts on the steps Lightning writes to its loggers."""
        log_step(trainer, pl_module, lambda: {**values, **self.token_counts()})

    @override
    def technique_state(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in _STATE}

    @override
    def load_technique_state(self, state: dict[str, Any]) -> None:
        for key in _STATE:
            setattr(self, key, int(state.get(key, 0)))
        self._logged = (self.layer_tokens, self.dense_layer_tokens)

    def detach(self) -> None:
        """Remove the technique from the model (the callbacks call it at ``teardown``)."""
        if self.machinery is not None:
            self.machinery.remove()
            self.machinery = None
        self.claimed = []

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.detach()
