"""Training FLOPs of every optimizer step, counted from that step's real shapes."""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lit_eff.flops import FlopTracker, density_version, get_density, signature

#: A ``flops_key`` value meaning "this step's FLOPs depend on the data": the step is counted by
#: tracing every time (eagerly, even under ``torch.compile``).
DYNAMIC = object()


@dataclass(frozen=True)
class Parts:
    """A ``flops_key`` for a step that runs several independent parts (the subnets a supernet
    step trains): ``keys`` name them and ``count(key, batch)`` gives one part's executed FLOPs
    (forward + backward) on ``batch``, without running it. The step is traced once per
    signature of the rest; later steps cost the rest's count plus their parts' counts, so a
    new combination of parts needs no tracing. Parts must run no masked modules."""

    keys: tuple[Hashable, ...]
    count: Callable[[Hashable, Any], float] = field(compare=False, hash=False)

    def total(self, batch: Any) -> float:
        return float(sum(self.count(key, batch) for key in self.keys))


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


@dataclass
class StepCount:
    """The FLOPs of one training micro-batch: executed, forward part, and the executed FLOPs
    inside each module whose weights a technique masks (to weight them by its density)."""

    executed: float
    forward: int
    inside: list[tuple[weakref.ref, int]] = field(default_factory=list)
    _effective: tuple[int, float] = (-1, 0.0)  # (density version, effective FLOPs)

    def effective(self) -> float:
        version = density_version()
        if self._effective[0] != version:
            lost = 0.0
            for ref, flops in self.inside:
                module = ref()
                if module is not None:
                    lost += flops * (1.0 - get_density(module))
            self._effective = (version, self.executed - lost)
        return self._effective[1]


class FlopsMonitor(Callback):
    """Counts the training FLOPs (forward + backward) of every optimizer step.

    The count comes from the shapes each step really ran: the first training batch of every
    distinct *step signature* runs eagerly under :class:`lit_eff.flops.FlopTracker`, which
    counts each matmul, convolution and attention call with its backward; later batches with
    the same signature reuse that count, with no interception at all. So it works unchanged
    with ``torch.compile`` (both ``torch.compile(lightning_module)`` and a compiled inner model:
    the counted batch runs eagerly through ``torch.compiler.set_stance("force_eager")``, every
    other batch runs the compiled code untouched) and with activation checkpointing (the
    recompute in backward is not counted again: the count is the model's, not the hardware's).

    A step signature is: the batch's shapes and dtypes, which parameters require gradients,
    and the ``flops_key`` of every callback (and of the LightningModule) that defines one;
    techniques that change shapes (dropped tokens, frozen blocks, sampled subnets) define it.
    A technique whose FLOPs depend on the data returns :data:`DYNAMIC`, and its steps are all
    counted by tracing; a step made of independent parts drawn anew each step (a supernet's
    subnets) returns :class:`Parts`. Under DDP the counts of all ranks are summed. Logs, per
    optimizer step:

    - ``flops/step``, ``flops/total``: executed FLOPs (what the hardware ran);
    - ``flops/effective_step``, ``flops/effective_total``: sparse-effective FLOPs (a module whose
      weights a technique masks counts at its density; equal to executed without such techniques);
    - ``flops/samples_per_sec``, ``flops/tokens_per_sec`` (token batches only), ``flops/per_sec``;
    - ``flops/mfu``: model FLOPs utilisation, when the peak is known (``peak_flops`` per device,
      or Lightning's table of CUDA devices).

    Logged every ``trainer.log_every_n_steps`` optimizer steps, at every validation (the totals,
    so validation metrics line up with exact FLOPs) and at the end of training, straight to
    ``trainer.loggers``. ``monitor.total_executed`` and ``monitor.total_effective`` hold the
    running totals; they are part of the checkpoint.

    What is counted: every FLOP-bearing call the training step makes from its start to its
    optimizer step (forward passes and their backward), not the optimizer step itself nor
    validation.

    Args:
        peak_flops: peak FLOP/s of one device, for MFU; ``None`` looks the device up.

    Example::

        trainer:
          callbacks:
            - class_path: lit_eff.callbacks.FlopsMonitor
    """

    def __init__(self, peak_flops: float | None = None) -> None:
        if peak_flops is not None and not (isinstance(peak_flops, (int, float)) and peak_flops > 0):
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
        self.counted_batches = 0  # batches counted by tracing (the others reused a count)
        self._cache: dict[Hashable, StepCount] = {}
        self._keyed: list[Any] = []
        self._params: list[torch.nn.Parameter] = []
        self._last_step = -1
        self._micro: list[tuple[float, float]] = []  # (executed, effective) of this step's batches
        self._step_samples = 0
        self._step_tokens = 0
        self._window: list[float] = [0.0, 0.0, 0.0]  # executed FLOPs, samples, tokens since the last log
        self._last_time: float | None = None
        self._peak: float | None = None
        self._tracing = False  # a batch is being counted by tracing
        self._counting: Hashable | None = None  # its signature (None: not to be cached)
        self._parts: float | None = None  # FLOPs of its Parts, if its flops_key has them
        self._stance: Any = None
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
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._last_step = trainer.global_step
        self._last_time = time.perf_counter()
        self._micro = []
        self._cache.clear()  # the model may have changed since the last fit
        self._keyed = [cb for cb in trainer.callbacks if cb is not self and callable(getattr(cb, "flops_key", None))]
        self._params = list(pl_module.parameters())  # modules added after this point are not seen

    # the step signature ----------------------------------------------------------------------
    def step_key(self, trainer: Trainer, pl_module: LightningModule, batch: Any) -> Hashable:
        """The signature of the training batch about to run (see the class docstring)."""
        module_key = getattr(pl_module, "flops_key", None)
        return (signature(batch), torch.is_grad_enabled(),
                tuple([p.requires_grad for p in self._params]),
                tuple(cb.flops_key(trainer) for cb in self._keyed),
                module_key() if callable(module_key) else None)

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        first = _first_tensor(batch)
        if first is not None:
            self._step_samples += first.shape[0] if first.dim() else 1
            if not (first.is_floating_point() or first.is_complex()) and first.dim() >= 2:
                self._step_tokens += first.numel()
        key = self.step_key(trainer, pl_module, batch)
        parts = key[4] if isinstance(key[4], Parts) else None
        if parts is not None:  # the rest of the step is keyed without its parts
            key = (*key[:4], Parts)
        dynamic = any(part is DYNAMIC for part in key[3]) or key[4] is DYNAMIC
        count = None if dynamic else self._cache.get(key)
        if count is not None:
            extra = parts.total(batch) if parts is not None else 0.0
            self._micro.append((float(count.executed) + extra, count.effective() + extra))
            return
        # count this batch by tracing it, eagerly (compiled code would hide its calls)
        self._counting = None if dynamic else key
        self._parts = None if parts is None else parts.total(batch)
        self._stance = torch.compiler.set_stance("force_eager")
        self.tracker.reset()
        self.tracker.__enter__()
        self._tracing = True

    def _finish_count(self) -> None:
        if not self._tracing:
            return
        self._tracing = False
        try:
            self.tracker.__exit__(None, None, None)
        finally:
            self._stance.__exit__(None, None, None)
            self._stance = None
        tracker = self.tracker
        count = StepCount(tracker.executed, tracker.forward_executed,
                          [(ref, flops) for ref, flops in tracker.inside.values()])
        self.counted_batches += 1
        self._micro.append((float(count.executed), float(tracker.effective)))
        if self._counting is not None:
            if self._parts is not None:  # keep the rest: later steps add their own parts
                count.executed -= self._parts
            self._cache[self._counting] = count
        self._counting = None

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        self._finish_count()  # the optimizer step is not training FLOPs of the model

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._finish_count()
        self.end_batch(trainer, pl_module)

    def end_batch(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Book the FLOPs of an optimizer step that just finished. Idempotent, so a callback that
        needs the up-to-date total (:class:`FlopsBudget`) may call it first."""
        self._finish_count()
        if trainer.global_step <= self._last_step:
            return  # accumulating micro-batches, or already booked
        self._last_step = trainer.global_step
        counts = [sum(e for e, _ in self._micro), sum(f for _, f in self._micro), float(self._step_samples),
                  float(self._step_tokens)]
        self._micro = []
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
        self._finish_count()
        if self._logged_step != trainer.global_step - 1 and self.steps:
            self._log(trainer, self.last_step_executed, self.last_step_effective)
        for logger in trainer.loggers:
            logger.save()

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._finish_count()

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        rank_zero_info(
            f"lit_eff: {self.steps} optimizer steps spent {self.total_executed:.4g} training FLOPs"
            f" (sparse-effective {self.total_effective:.4g})"
        )

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._finish_count()
        self._cache.clear()

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
