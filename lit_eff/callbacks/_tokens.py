"""What the token callbacks share: block-list checks, claims on blocks, seed keys, counters."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override

from lit_eff.callbacks._checks import is_int, is_number
from lit_eff.callbacks._claims import describe_in
from lit_eff.callbacks._logging import log_step
from lit_eff.schedules import Schedule
from lit_eff.seeding import run_seed
from lit_eff.tokens.adapters import TokenAdapter, find_adapter


def check_blocks(name: str, blocks: Any, allow_none: bool = True) -> None:
    """A strictly increasing list of block indices >= 0 (``None`` allowed: the default)."""
    if blocks is None and allow_none:
        return
    if isinstance(blocks, (str, bytes)) or not isinstance(blocks, (list, tuple)) or not blocks \
            or not all(is_int(b) for b in blocks):
        raise ValueError(f"Expected `{name}` to be a non-empty list of block indices (integers), got {name}={blocks!r}")
    if blocks[0] < 0 or any(b <= a for a, b in zip(blocks, blocks[1:])):
        raise ValueError(f"Expected `{name}` to be strictly increasing block indices >= 0, got {name}={list(blocks)}")


def check_blocks_in_range(name: str, blocks: list[int], adapter: TokenAdapter) -> None:
    if blocks[-1] >= adapter.depth:
        raise ValueError(f"Expected `{name}` < {adapter.depth} (the model has {adapter.depth} blocks, indices "
                         f"0..{adapter.depth - 1}), got {name}={list(blocks)}")


def check_fraction(name: str, value: Any, step: int | None = None) -> None:
    """A number in (0, 1]; a Schedule is checked at its end points (and at ``step`` when given)."""
    if isinstance(value, Schedule):
        probes = [getattr(value, "start", None), getattr(value, "end", None),
                  *getattr(value, "values", [])] if step is None else [value(step)]
        for probe in [p for p in probes if p is not None]:
            if not 0.0 < probe <= 1.0:
                at = f" at step {step}" if step is not None else ""
                raise ValueError(f"Expected `{name}` in (0, 1], got {name}={value!r} (value {probe}{at})")
        return
    if not is_number(value) or not 0.0 < value <= 1.0:
        raise ValueError(f"Expected `{name}` in (0, 1], got {name}={value!r}")


def value_at(value: float | Schedule, step: int, name: str) -> float:
    if isinstance(value, Schedule):
        check_fraction(name, value, step)
        return float(value(step))
    return float(value)


class TokenCallback(Callback):
    """Base of the token callbacks: finds the adapter, checks claims, keeps seed keys and counters."""

    kind = "reduces tokens in"  # how messages describe the claim
    machinery: Any = None

    def __init__(self) -> None:
        self.claimed: list[int] = []
        self.machinery = None
        self._restored: dict[str, int] = {}
        self._logged_tokens = (0, 0)

    def attached_to(self, pl_module: LightningModule) -> bool:
        """Already attached to this module (a second stage of one run); attached elsewhere: detach."""
        if self.machinery is None:
            return False
        if any(m is self.machinery.adapter.model for m in pl_module.modules()):
            return True
        self.detach()
        return False

    def adapter_for(self, pl_module: LightningModule) -> TokenAdapter:
        return find_adapter(pl_module)

    def claim(self, trainer: Trainer, blocks: list[int]) -> None:
        """Refuse blocks another token callback of ``trainer`` already claimed."""
        mine = set(blocks)
        for other in trainer.callbacks:
            if other is self or not isinstance(other, TokenCallback) or not other.claimed:
                continue
            clash = sorted(mine & set(other.claimed))
            conflict = self.conflicts_with(other)
            if clash or conflict:
                why = conflict or (f"{describe_in(trainer, other)} {other.kind} blocks {clash}, which "
                                   f"{describe_in(trainer, self)} {self.kind} too")
                raise ValueError(f"Two token techniques conflict: {why}. Give them disjoint `blocks` or keep one")
        self.claimed = list(blocks)

    def conflicts_with(self, other: TokenCallback) -> str | None:
        return None

    # seeds ------------------------------------------------------------------------------------
    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self.machinery is not None:
            self.machinery.keys = (run_seed(), trainer.global_step, batch_idx)
            self.update(trainer, trainer.global_step)

    def _eval_keys(self, trainer: Trainer, stage: str, batch_idx: int) -> None:
        if self.machinery is not None:
            self.machinery.keys = (run_seed(), stage, trainer.global_step, batch_idx)
            self.update(trainer, trainer.global_step)

    @override
    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._eval_keys(trainer, "val", batch_idx)

    @override
    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._eval_keys(trainer, "test", batch_idx)

    @override
    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._eval_keys(trainer, "predict", batch_idx)

    def update(self, trainer: Trainer, step: int) -> None:
        """Set the scheduled values for ``step`` on the machinery."""

    # counters ---------------------------------------------------------------------------------
    def token_counts(self) -> dict[str, float]:
        """``tokens/layer_tokens`` (running total) and ``tokens/layer_token_fraction`` (since the
        last call, over what the dense model would have processed)."""
        m = self.machinery
        done, dense = m.layer_tokens - self._logged_tokens[0], m.dense_layer_tokens - self._logged_tokens[1]
        self._logged_tokens = (m.layer_tokens, m.dense_layer_tokens)
        values = {"tokens/layer_tokens": float(m.layer_tokens)}
        if dense:
            values["tokens/layer_token_fraction"] = done / dense
        return values

    def log_step_values(self, trainer: Trainer, pl_module: LightningModule, values: dict[str, float]) -> None:
        """Log ``values`` and the token counts on the steps Lightning writes to its loggers."""
        log_step(trainer, pl_module, lambda: {**values, **self.token_counts()})

    @override
    def state_dict(self) -> dict[str, Any]:
        m = self.machinery
        if m is None:
            return dict(self._restored)
        return {"layer_tokens": int(m.layer_tokens), "dense_layer_tokens": int(m.dense_layer_tokens),
                "last_choice": int(getattr(m, "last_choice", 0))}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = {k: int(v) for k, v in state_dict.items()}
        self._apply_restored()

    def _apply_restored(self) -> None:
        if self.machinery is not None and self._restored:
            for key, value in self._restored.items():
                if hasattr(self.machinery, key):
                    setattr(self.machinery, key, value)
            self._logged_tokens = (self.machinery.layer_tokens, self.machinery.dense_layer_tokens)

    def detach(self) -> None:
        """Remove the machinery from the model (the callbacks call it at ``teardown``)."""
        if self.machinery is not None:
            self._restored = self.state_dict()
            self.machinery.remove()
            self.machinery = None
        self.claimed = []
