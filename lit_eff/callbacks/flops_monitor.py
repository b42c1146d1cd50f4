"""Training FLOPs of every optimizer step, counted from that step's real shapes."""

from __future__ import annotations

import time
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lit_eff.flops import FlopTracker


def _first_tensor(batch: Any) -> torch.Tensor | None:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, dict):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for item in batch:
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


def _compute_dtype(precision: str) -> torch.dtype:
    if "bf16" in precision:
        return torch.bfloat16
    if "16" in precision:
        return torch.float16
    if "64" in precision:
        return torch.float64
    return torch.float32


class FlopsMonitor(Callback):
    """Counts the training FLOPs (forward + backward) of every optimizer step.

    The count comes from the shapes each step really ran (:class:`lit_eff.flops.FlopTracker`),
    so steps with dropped tokens or sampled subnets are counted right, and it costs one
    dictionary lookup per matmul once a shape has been seen. Under DDP the counts of all ranks
    are summed. Logs, per optimizer step:

    - ``flops/step``, ``flops/total``: executed FLOPs (what the hardware ran);
    - ``flops/effective_step``, ``flops/effective_total``: sparse-effective FLOPs (a module whose
      weights a technique masks counts at its density; equal to executed without such techniques);
    - ``flops/samples_per_sec``, ``flops/tokens_per_sec`` (token batches only), ``flops/per_sec``;
    - ``flops/mfu``: model FLOPs utilisation, when the peak is known (``peak_flops`` per device,
      or Lightning's table of CUDA devices).

    Logged every ``trainer.log_every_n_steps`` optimizer steps, at every validation (the totals,
    so validation metrics line up with exact FLOPs) and at the end of training,
    straight to ``trainer.loggers`` (TensorBoard by default). ``monitor.total_executed`` and
    ``monitor.total_effective`` hold the running totals.

    What is counted: the FLOP-bearing calls made inside the LightningModule's forward and inside
    its direct submodules' forward calls during training batches (the model, a teacher, a
    router...), with their backward. A matmul written directly in ``training_step`` on the
    module's own tensors, outside any module call, is not seen.

    Runs on: ``on_fit_start`` (forward hooks on the module and its direct children, on the
    instance), ``on_train_batch_start``/``on_train_batch_end`` (a training batch is being
    counted; books a finished optimizer step), ``on_fit_end`` (summary; hooks removed).

    Args:
        peak_flops: peak FLOP/s of one device, for MFU; ``None`` looks the device up.

    Example::

        trainer:
          callbacks:
            - class_path: lit_eff.callbacks.FlopsMonitor
    """

    def __init__(self, peak_flops: float | None = None) -> None:
        if peak_flops is not None and peak_flops <= 0:
            raise ValueError(f"Expected `peak_flops` > 0 (FLOP/s of one device), got peak_flops={peak_flops}")
        self.peak_flops = peak_flops
        self.tracker = FlopTracker()
        self.total_executed = 0.0
        self.total_effective = 0.0
        self.total_samples = 0
        self.total_tokens = 0
        self.steps = 0
        self.last_step_executed = 0.0
        self.last_step_effective = 0.0
        self._last_step = -1
        self._step_samples = 0
        self._step_tokens = 0
        self._window: list[float] = [0.0, 0.0, 0.0]  # executed FLOPs, samples, tokens since the last log
        self._last_time: float | None = None
        self._peak: float | None = None
        self._handles: list = []
        self._counting = False  # inside a training batch
        self._depth = 0  # nesting of hooked module calls
        self._logged_step = -1

    # -----------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        monitors = [cb for cb in trainer.callbacks if isinstance(cb, FlopsMonitor)]
        if len(monitors) > 1:
            raise ValueError(
                f"Found {len(monitors)} FlopsMonitor callbacks in trainer.callbacks; keep one (each would count "
                "every step, and their checkpoint states would collide)"
            )
        self._peak = self.peak_flops
        if self._peak is None:
            from lightning.fabric.utilities.throughput import get_available_flops

            device = trainer.strategy.root_device
            if device.type == "cuda":
                self._peak = get_available_flops(device, _compute_dtype(str(trainer.precision)))

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Intercept only inside the LightningModule's modules (its submodules' forward calls, and
        # its own forward through ``self(...)``): the model's compute, not Lightning's logging,
        # the loss bookkeeping or the optimizer step. Hooks sit on the instance's direct children.
        self._handles = []
        for module in [pl_module, *pl_module.children()]:
            self._handles.append(module.register_forward_pre_hook(self._enter))
            self._handles.append(module.register_forward_hook(self._exit, always_call=True))

    def _enter(self, module: Any, args: Any) -> None:
        if self._counting:
            if self._depth == 0:
                self.tracker.__enter__()
            self._depth += 1

    def _exit(self, module: Any, args: Any, output: Any) -> None:
        if self._depth:
            self._depth -= 1
            if self._depth == 0:
                self.tracker.__exit__(None, None, None)

    def _unwrap(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._last_step = trainer.global_step
        self._last_time = time.perf_counter()
        self.tracker.reset()

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        first = _first_tensor(batch)
        if first is not None:
            self._step_samples += first.shape[0] if first.dim() else 1
            if not (first.is_floating_point() or first.is_complex()) and first.dim() >= 2:
                self._step_tokens += first.numel()
        self.tracker.sync_density_hooks()
        self._counting = True

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._counting = False
        self.end_batch(trainer, pl_module)

    def end_batch(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Book the FLOPs of an optimizer step that just finished. Idempotent, so a callback that
        needs the up-to-date total (:class:`FlopsBudget`) may call it first."""
        if trainer.global_step <= self._last_step:
            return  # accumulating micro-batches, or already booked
        self._last_step = trainer.global_step
        counts = [float(self.tracker.executed), float(self.tracker.effective), float(self._step_samples),
                  float(self._step_tokens)]
        self.tracker.reset()
        self._step_samples = self._step_tokens = 0
        if trainer.world_size > 1:
            summed = trainer.strategy.reduce(torch.tensor(counts, dtype=torch.float64,
                                                          device=trainer.strategy.root_device), reduce_op="sum")
            counts = summed.tolist()
        executed, effective, samples, tokens = counts
        self.steps += 1
        self.last_step_executed, self.last_step_effective = executed, effective
        self.total_executed += executed
        self.total_effective += effective
        self.total_samples += int(samples)
        self.total_tokens += int(tokens)
        self._window = [self._window[0] + executed, self._window[1] + samples, self._window[2] + tokens]
        if trainer.global_step % max(1, trainer.log_every_n_steps) == 0:
            self._log(trainer, executed, effective)

    def _log(self, trainer: Trainer, executed: float, effective: float) -> None:
        now = time.perf_counter()
        seconds = max(now - (self._last_time or now), 1e-9)
        self._last_time = now
        window_flops, window_samples, window_tokens = self._window
        self._window = [0.0, 0.0, 0.0]
        metrics = {
            "flops/step": executed,
            "flops/effective_step": effective,
            "flops/total": self.total_executed,
            "flops/effective_total": self.total_effective,
            "flops/per_sec": window_flops / seconds,
            "flops/samples_per_sec": window_samples / seconds,
        }
        if window_tokens:
            metrics["flops/tokens_per_sec"] = window_tokens / seconds
        if self._peak:
            metrics["flops/mfu"] = window_flops / seconds / (self._peak * trainer.world_size)
        # straight to the loggers (rank zero), at the trainer's logging cadence: cheaper than
        # `self.log` on every step, and the totals lose nothing by being sampled. The step label
        # is Lightning's own for the metrics of this optimizer step (steps completed before it),
        # so `flops/total` at step s is what was spent when `train/loss` or `val/acc` at s were logged.
        self._logged_step = trainer.global_step - 1
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=self._logged_step)

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # validation metrics get the exact FLOPs spent before them, whatever the logging cadence
        if trainer.state.fn == "fit" and not trainer.sanity_checking and self.steps and \
                self._logged_step != trainer.global_step - 1:
            self._logged_step = trainer.global_step - 1
            totals = {"flops/total": self.total_executed, "flops/effective_total": self.total_effective}
            for logger in trainer.loggers:
                logger.log_metrics(totals, step=trainer.global_step - 1)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._logged_step != trainer.global_step - 1 and self.steps:
            self._log(trainer, self.last_step_executed, self.last_step_effective)
        for logger in trainer.loggers:
            logger.save()

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._unwrap()

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._unwrap()
        rank_zero_info(
            f"lit_eff: {self.steps} optimizer steps spent {self.total_executed:.4g} training FLOPs"
            f" (sparse-effective {self.total_effective:.4g})"
        )

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._unwrap()
        self.tracker.remove_hooks()

    # state -----------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"total_executed": self.total_executed, "total_effective": self.total_effective,
                "total_samples": self.total_samples, "total_tokens": self.total_tokens, "steps": self.steps}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.total_executed = float(state_dict.get("total_executed", 0.0))
        self.total_effective = float(state_dict.get("total_effective", 0.0))
        self.total_samples = int(state_dict.get("total_samples", 0))
        self.total_tokens = int(state_dict.get("total_tokens", 0))
        self.steps = int(state_dict.get("steps", 0))
