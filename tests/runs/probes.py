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


class SignalAt(Callback):
    """Send ``signal`` (a name, e.g. SIGTERM) to this process at the start of optimizer step
    ``step``, once: not if ``marker`` exists (it is created), and only in the run whose seed is
    ``seed`` when given."""

    def __init__(self, step: int, marker: str, signal: str = "SIGTERM", seed: int | None = None) -> None:
        self.step, self.marker, self.signal, self.seed = step, marker, signal, seed

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        import signal

        if trainer.global_step != self.step or os.path.exists(self.marker):
            return
        if self.seed is not None and os.environ.get("PL_GLOBAL_SEED") != str(self.seed):
            return
        open(self.marker, "w").close()
        os.kill(os.getpid(), getattr(signal, self.signal))
