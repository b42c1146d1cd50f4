"""What every technique callback of the kit shares.

:class:`Technique` is a Lightning ``Callback`` with the few pieces each technique otherwise
rewrites: its name in messages, the run length, a guard that runs post-step work once per
optimizer step (not per micro-batch under gradient accumulation), logging at the loggers'
cadence, the step counter it keeps in its checkpoint state, and the key that tells
:class:`~lit_eff.callbacks.FlopsMonitor` when the compute of a step changes shape.

A technique's math lives in its pure package (``lit_eff.sparsity``, ``lit_eff.tokens``,
``lit_eff.gradients``); the callback only wires it to Lightning's hooks.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Hashable, Iterator, Mapping
from typing import Any, TypeVar

from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override

from lit_eff import validation

__all__ = ["Technique", "describe_in", "log_step", "logs_this_step"]

T = TypeVar("T", bound=Callback)


def describe_in(trainer: Trainer, callback: Callback) -> str:
    """``"NMSparsity (trainer.callbacks[1])"``: the callback's class and its place in the trainer."""
    index = next((i for i, cb in enumerate(trainer.callbacks) if cb is callback), None)
    where = f" (trainer.callbacks[{index}])" if index is not None else ""
    return f"{type(callback).__name__}{where}"


def logs_this_step(trainer: Trainer) -> bool:
    """Whether step values logged now (in ``on_train_batch_end``, after the optimizer step) reach
    the loggers: every ``trainer.log_every_n_steps`` optimizer steps, and at the end of training.

    ``pl_module.log`` costs up to a millisecond per call on a small CPU model (result collection,
    tensor conversion); Lightning hands step values to its loggers only on these steps, so logging
    on the others would cost time and show nothing.
    """
    every = trainer.log_every_n_steps
    if every > 0 and trainer.global_step % every == 0:
        return True
    last = trainer.max_steps is not None and 0 < trainer.max_steps <= trainer.global_step
    return last or bool(trainer.should_stop)


def log_step(trainer: Trainer, pl_module: LightningModule,
             values: Mapping[str, float] | Callable[[], Mapping[str, float]]) -> None:
    """``pl_module.log(name, value, on_step=True)`` for each value, on logging steps only.

    ``values`` may be a function, so values that cost work to compute are computed only then.
    """
    if not logs_this_step(trainer):
        return
    for name, value in (values() if callable(values) else values).items():
        pl_module.log(name, value, on_step=True, on_epoch=False, batch_size=1)


class Technique(Callback):
    """Base of the kit's technique callbacks.

    Subclasses call ``super().__init__()`` and may override :meth:`technique_state` /
    :meth:`load_technique_state` for state beyond the step counter, and :meth:`flops_key` when
    they change the shapes a training step computes on (dropped tokens, frozen blocks).
    """

    def __init__(self) -> None:
        self._last_step = -1  # the optimizer step whose post-step work is done
        self._origin_pid = os.getpid()  # the process that built the callback

    def in_worker_process(self) -> bool:
        """Running in a process started by ``ddp_spawn``/``ddp_fork`` from the one that built this
        callback. After ``fit`` there, Lightning hands the main process only the model's state
        dict, loaded with ``strict=False`` into the main process's model, which never saw this
        technique's ``setup``: structure the technique added (mask parametrizations, routers) must
        be turned into plain weights, or it is silently dropped."""
        return os.getpid() != self._origin_pid

    # naming and composition -------------------------------------------------------------------
    @property
    def name(self) -> str:
        return type(self).__name__

    def describe(self, trainer: Trainer) -> str:
        return describe_in(trainer, self)

    def others(self, trainer: Trainer, kind: type[T]) -> list[T]:
        """The other callbacks of ``trainer`` that are instances of ``kind``."""
        return [cb for cb in trainer.callbacks if cb is not self and isinstance(cb, kind)]

    # run length -------------------------------------------------------------------------------
    def run_length(self, trainer: Trainer, fix: str = "set trainer.max_steps") -> int:
        """Optimizer steps of this fit (the smaller of what ``max_steps`` and ``max_epochs`` allow)."""
        return validation.run_length(trainer, self.name, fix)

    # once per optimizer step ------------------------------------------------------------------
    def optimizer_stepped(self, trainer: Trainer) -> bool:
        """True the first time it is called after an optimizer step (in ``on_train_batch_end``);
        False on accumulating micro-batches and on repeated calls for the same step."""
        if trainer.global_step <= self._last_step:
            return False
        self._last_step = trainer.global_step
        return True

    def mark_step(self, step: int) -> None:
        """Record that the post-step work of ``step`` is done (e.g. at ``on_train_start``)."""
        self._last_step = step

    # FLOPs accounting -------------------------------------------------------------------------
    def flops_key(self, trainer: Trainer) -> Hashable:
        """A value that changes whenever this technique changes the shapes of the next training
        step (tokens kept, blocks frozen...). :class:`~lit_eff.callbacks.FlopsMonitor` counts a
        step's FLOPs once per distinct key and reuses the count. Techniques that change no shape
        (masks change values, not shapes) keep the default.

        It is read in ``FlopsMonitor.on_train_batch_start``, which may run before this callback's
        own ``on_train_batch_start``: compute it from ``trainer.global_step`` (a schedule), or from
        state settled by the end of the previous step, not from work done at batch start. Return
        :data:`lit_eff.callbacks.flops_monitor.DYNAMIC` when the FLOPs depend on the data."""
        return None

    # planning a run at a FLOPs budget (lit_eff.callbacks.FlopsBudget) ---------------------------
    #: Whether :meth:`plan_state` and :meth:`plan_probe` describe every change this technique
    #: makes to a step's FLOPs. A technique that overrides :meth:`flops_key` sets it True once it
    #: implements them; until then a planned budget refuses it.
    plans_flops = False

    def plan_state(self, trainer: Trainer, step: int, total: int) -> Hashable:
        """What decides this technique's training-step FLOPs at optimizer step ``step`` of a run of
        ``total`` steps (a pure function of the schedule). ``None``: the FLOPs never change."""
        return None

    @contextlib.contextmanager
    def plan_probe(self, trainer: Trainer, pl_module: LightningModule, state: Hashable, batch: Any) -> Iterator[None]:
        """Put the model in ``state`` (a :meth:`plan_state` value) while one training step on
        ``batch`` is counted, and back afterwards."""
        yield

    def replan(self, trainer: Trainer) -> None:
        """The run length was set after this technique's ``setup`` (a planned FLOPs budget):
        recompute what ``setup`` derived from it."""

    # state ------------------------------------------------------------------------------------
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
