"""What every technique callback of the kit shares.

A technique's math lives in its pure package (``lit_eff.sparsity``, ``lit_eff.tokens``, ``lit_eff.gradients``);
its callback, a :class:`Technique`, wires it to Lightning's hooks and gets from the base a name for messages, the
run length, a guard that runs post-step work once per optimizer step (not per accumulated micro-batch), strategy
refusal and a step counter in its checkpoint state; :func:`log_step` logs at the loggers' cadence. Subclasses call
``super().__init__()``, keep extra state in ``technique_state``/``load_technique_state``, and override
``flops_key`` and the ``plan_*`` methods when they change the shapes a step computes on.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Hashable, Iterator, Mapping
from typing import Any, TypeVar

from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override

from lit_eff import validation

__all__ = ["Technique", "log_step", "logs_this_step"]

T = TypeVar("T", bound=Callback)


def logs_this_step(trainer: Trainer) -> bool:
    """Whether step values logged now (in ``on_train_batch_end``) reach the loggers: every ``log_every_n_steps``
    optimizer steps and at the end. Logging on other steps costs time (up to 1 ms a call) and shows nothing."""
    every = trainer.log_every_n_steps
    if every > 0 and trainer.global_step % every == 0:
        return True
    last = trainer.max_steps is not None and 0 < trainer.max_steps <= trainer.global_step
    return last or bool(trainer.should_stop)


def log_step(trainer: Trainer, pl_module: LightningModule,
             values: Mapping[str, float] | Callable[[], Mapping[str, float]]) -> None:
    """``pl_module.log(name, value, on_step=True)`` for each value, on logging steps only
    (``values`` may be a function, called only then)."""
    if not logs_this_step(trainer):
        return
    for name, value in (values() if callable(values) else values).items():
        pl_module.log(name, value, on_step=True, on_epoch=False, batch_size=1)


class Technique(Callback):
    """Base of the kit's technique callbacks (the contract: this module's docstring)."""

    def __init__(self) -> None:
        self._last_step = -1  # the optimizer step whose post-step work is done
        self._origin_pid = os.getpid()

    def in_worker_process(self) -> bool:
        """In a ``ddp_spawn``/``ddp_fork`` worker: only the model's state dict returns (bake added structure in)."""
        return os.getpid() != self._origin_pid

    @property
    def name(self) -> str:
        return type(self).__name__

    def describe(self, trainer: Trainer) -> str:
        """``"NMSparsity (trainer.callbacks[1])"``: the class and its place in the trainer."""
        index = next((i for i, cb in enumerate(trainer.callbacks) if cb is self), None)
        return self.name if index is None else f"{self.name} (trainer.callbacks[{index}])"

    def others(self, trainer: Trainer, kind: type[T]) -> list[T]:
        """The other callbacks of ``trainer`` that are instances of ``kind``."""
        return [cb for cb in trainer.callbacks if cb is not self and isinstance(cb, kind)]

    def refuse_strategies(self, trainer: Trainer, refused: Mapping[str, str]) -> None:
        """Raise if the trainer's strategy class is a key of ``refused`` (its value says why)."""
        strategy = type(trainer.strategy).__name__
        if strategy in refused:
            raise ValueError(f"{self.name} does not support {strategy}: {refused[strategy]}. Use DDP or "
                             f"ModelParallelStrategy (FSDP2)")

    def run_length(self, trainer: Trainer, fix: str = "set trainer.max_steps") -> int:
        """Optimizer steps of this fit (:func:`lit_eff.validation.run_length`)."""
        return validation.run_length(trainer, self.name, fix)

    def optimizer_stepped(self, trainer: Trainer) -> bool:
        """True once per optimizer step (in ``on_train_batch_end``): not on accumulating micro-batches or repeats."""
        if trainer.global_step <= self._last_step:
            return False
        self._last_step = trainer.global_step
        return True

    def mark_step(self, step: int) -> None:
        """Record that the post-step work of ``step`` is done (e.g. at ``on_train_start``)."""
        self._last_step = step

    def flops_key(self, trainer: Trainer) -> Hashable:
        """Changes whenever this technique changes the shapes of the next step (FlopsMonitor counts FLOPs once per
        key). Read maybe before this callback's ``on_train_batch_start``: derive it from ``trainer.global_step`` or
        state settled by the previous step. ``flops_monitor.DYNAMIC``: the FLOPs depend on the data."""
        return None

    #: Whether plan_state/plan_probe describe every change this technique makes to a step's FLOPs: a planned
    #: FlopsBudget refuses a technique that overrides :meth:`flops_key` and leaves this False.
    plans_flops = False

    def plan_state(self, trainer: Trainer, step: int, total: int) -> Hashable:
        """What decides the training-step FLOPs at step ``step`` of a ``total``-step run; ``None``: fixed."""
        return None

    @contextlib.contextmanager
    def plan_probe(self, trainer: Trainer, pl_module: LightningModule, state: Hashable, batch: Any) -> Iterator[None]:
        """Put the model in ``state`` (a :meth:`plan_state` value) while a step on ``batch`` is counted."""
        yield

    def replan(self, trainer: Trainer) -> None:
        """Recompute what ``setup`` derived from the run length, set afterwards by a FLOPs budget."""

    def technique_state(self) -> dict[str, Any]:
        """Extra checkpoint state of a subclass."""
        return {}

    def load_technique_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`technique_state` saved."""

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self._last_step, **self.technique_state()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_step = int(state_dict.get("last_step", -1))
        self.load_technique_state(dict(state_dict))
