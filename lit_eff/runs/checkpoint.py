"""``last.ckpt`` every N optimizer steps and on SIGINT/SIGTERM, so no run is lost.

Lightning's ``ModelCheckpoint(save_last=True, save_top_k=0)`` writes ``last.ckpt`` only when
training ends, and its SIGTERM handling exits with status 0. :class:`ResumableCheckpoint` writes
it every ``every_n_train_steps`` optimizer steps (a crash loses fewer steps than that) and, when
the process receives SIGINT (Ctrl+C) or SIGTERM, finishes the step in progress, writes it, and
stops: ``KeyboardInterrupt`` (exit status 1) after SIGINT, ``SIGTERMException(143)`` after
SIGTERM. A second signal stops at once. Every checkpoint is written at the end of an optimizer
step, where resuming with ``--ckpt_path`` gives the same weights as never stopping. Under DDP the
ranks agree to stop at the same step (one small all-reduce per step).

    trainer:
      callbacks:
        - class_path: lit_eff.runs.ResumableCheckpoint
          init_args: {every_n_train_steps: 100}
"""

from __future__ import annotations

import os
import signal
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lit_eff.validation import check_int

SIGNALS = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}
EXIT_STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + the signal's number


def stop_exception(signum: int) -> BaseException:
    """What ends a run stopped by ``signum``: a KeyboardInterrupt for SIGINT (Lightning exits with
    status 1), ``SIGTERMException(143)`` for SIGTERM (a SystemExit whose status is not 0)."""
    return KeyboardInterrupt() if signum == signal.SIGINT else SIGTERMException(EXIT_STATUS[signal.SIGTERM])


class ResumableCheckpoint(ModelCheckpoint):
    """A :class:`~lightning.pytorch.callbacks.ModelCheckpoint` that writes ``last.ckpt`` every
    ``every_n_train_steps`` optimizer steps and when the run is interrupted (see the module
    docstring). Every other argument is ModelCheckpoint's."""

    def __init__(self, every_n_train_steps: int | None = 100, save_last: bool | str = True, save_top_k: int = 0,
                 **kwargs: Any) -> None:
        check_int("every_n_train_steps", every_n_train_steps, minimum=1, allow_none=True)
        super().__init__(every_n_train_steps=every_n_train_steps, save_last=save_last, save_top_k=save_top_k,
                         **kwargs)
        if not save_last:
            raise ValueError(f"Expected `save_last` to be true (ResumableCheckpoint writes last.ckpt), "
                             f"got save_last={save_last!r}")
        self.received: int | None = None  # the first signal received during training
        self._previous: dict[int, Any] = {}

    # signals -------------------------------------------------------------------------------
    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:  # the second signal: stop now, mid-step
            self._restore_handlers()
            raise stop_exception(signum)
        self.received = signum
        rank_zero_info(f"\nlit_eff: {SIGNALS[signum]} received: saving last.ckpt after this optimizer step, then "
                       "stopping (send it again to stop at once)")

    def _install_handlers(self) -> None:
        if self._previous:
            return
        for signum in SIGNALS:
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: signals stay with whoever has them
                return

    def _restore_handlers(self) -> None:
        for signum, previous in self._previous.items():
            if signal.getsignal(signum) == self._handle:
                signal.signal(signum, previous)
        self._previous = {}

    def _agreed_signal(self, trainer: Trainer) -> int | None:
        """The signal every rank acts on: the largest received by any rank (one all-reduce)."""
        if trainer.world_size == 1:
            return self.received
        code = torch.tensor(self.received or 0, device=trainer.strategy.root_device)
        code = int(trainer.strategy.reduce(code, reduce_op="max"))
        return code or None

    # hooks ---------------------------------------------------------------------------------
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # after Lightning installed its own SIGTERM handler (which raises exit status 0 mid-loop)
        self.received = None
        self._install_handlers()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        signum = self._agreed_signal(trainer)
        if signum is None:
            return
        path = self.last_checkpoint_path()
        trainer.save_checkpoint(path)
        self.last_model_path = path
        rank_zero_info(f"lit_eff: {SIGNALS[signum]}: saved {path} at step {trainer.global_step}; resume with the "
                       f"same command plus --ckpt_path {path}")
        self._restore_handlers()
        raise stop_exception(signum)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore_handlers()  # a signal that came after the last step: the run is complete
        super().on_train_end(trainer, pl_module)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._restore_handlers()
        if self.received is None:  # a crash: the state may be mid-step, so only the periodic checkpoint counts
            super().on_exception(trainer, pl_module, exception)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._restore_handlers()
        super().teardown(trainer, pl_module, stage)

    def last_checkpoint_path(self) -> str:
        return os.path.join(self.dirpath or ".", self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION)
