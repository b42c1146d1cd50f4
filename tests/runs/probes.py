"""Callbacks that the interrupt tests load into a `lit-eff fit` subprocess through a YAML fragment."""

import os
import time

from lightning.pytorch import Callback


class PauseAt(Callback):
    """At the start of optimizer step ``step``, write ``marker`` and wait (up to 60 s) until the
    process has received a signal, so the test's signal lands mid-step at a known step."""

    def __init__(self, step: int, marker: str) -> None:
        self.step, self.marker = step, marker

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step != self.step:
            return
        checkpoint = next(cb for cb in trainer.callbacks if hasattr(cb, "received"))
        open(self.marker, "w").close()
        deadline = time.monotonic() + 60
        while checkpoint.received is None and time.monotonic() < deadline:
            time.sleep(0.02)


class CrashAt(Callback):
    """Raise in the middle of optimizer step ``step`` (after its forward and backward)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == self.step:
            raise RuntimeError(f"crash at step {self.step} (pid {os.getpid()})")
