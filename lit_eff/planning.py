"""Planning a run that spends a FLOPs budget: how many optimizer steps, given that a step's FLOPs
change over the run (frozen layers, token schedules, sparsity phases).

A step's FLOPs are ``samples(step) * per_sample(state(step, total))``: the samples it trains on
(the data loader's batch sizes, gradient accumulation, processes) times the FLOPs of one sample
with the techniques in the state their schedules give at that step of a ``total``-step run.
:func:`steps_for_budget` finds the run length whose FLOPs reach the budget;
:func:`count_training_step` counts one sample's FLOPs in a given state (the model's own
``training_step``, traced once per state, forward and backward).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import CombinedLoader
from lightning_utilities.core.apply_func import apply_to_collection

from lit_eff.flops import FlopTracker

__all__ = ["count_training_step", "run_flops", "sample_batch", "step_samples", "steps_for_budget"]

StepFlops = Callable[[int, int], float]  # (step, total) -> FLOPs of that optimizer step


def run_flops(step_flops: StepFlops, total: int) -> float:
    """The FLOPs of a run of ``total`` optimizer steps."""
    return math.fsum(step_flops(step, total) for step in range(total))


def steps_for_budget(step_flops: StepFlops, budget: float, limit: int = 10**8) -> int:
    """The run length whose FLOPs come closest to ``budget`` (off by less than one step's FLOPs).

    The FLOPs of a run grow with its length (every step costs something), so a doubling search then
    a bisection find it in ``O(N log N)`` evaluations of ``step_flops``.
    """
    high = 1
    while run_flops(step_flops, high) < budget:
        high *= 2
        if high > limit:
            raise ValueError(f"A FLOPs budget of {budget:.4g} needs more than {limit} optimizer steps at "
                             f"{step_flops(0, limit):.4g} FLOPs per step; lower the budget")
    low = high // 2  # spends less than the budget (or is 0)
    while high - low > 1:
        middle = (low + high) // 2
        if run_flops(step_flops, middle) >= budget:
            high = middle
        else:
            low = middle
    if low and budget - run_flops(step_flops, low) < run_flops(step_flops, high) - budget:
        return low
    return high


# --------------------------------------------------------------------------------------------
def _loader(trainer: Trainer) -> Any:
    loader = trainer.train_dataloader
    if isinstance(loader, CombinedLoader):
        loader = loader.iterables
    if isinstance(loader, (list, tuple)) and len(loader) == 1:
        loader = loader[0]
    if isinstance(loader, dict) and len(loader) == 1:
        loader = next(iter(loader.values()))
    return loader


def step_samples(trainer: Trainer) -> list[int]:
    """Samples (on all processes) of each optimizer step of one epoch, from the training data
    loader: its batch size, the last short batch, ``limit_train_batches``, gradient accumulation."""
    if trainer.train_dataloader is None:
        trainer.fit_loop.setup_data()
    loader = _loader(trainer)
    batch_size = getattr(loader, "batch_size", None)
    per_rank = None
    if hasattr(loader, "num_samples") and hasattr(loader, "num_replicas"):  # the kit's ResumableLoader
        per_rank = math.ceil(loader.num_samples / loader.num_replicas)
    elif getattr(loader, "sampler", None) is not None:
        with contextlib.suppress(TypeError):
            per_rank = len(loader.sampler)
    if not batch_size or per_rank is None:
        raise ValueError(f"Cannot plan a FLOPs budget over the training data loader {type(loader).__name__}: it tells "
                         "neither its batch size nor its sample count (use a map-style dataset with a "
                         "`batch_size`, or `plan: false`)")
    sizes = [batch_size] * (per_rank // batch_size)
    if per_rank % batch_size and not getattr(loader, "drop_last", False):
        sizes.append(per_rank % batch_size)
    batches = trainer.num_training_batches
    if math.isfinite(batches):
        sizes = sizes[: int(batches)]
    every = trainer.accumulate_grad_batches
    world = trainer.world_size
    return [world * sum(sizes[i : i + every]) for i in range(0, len(sizes), every)]


def sample_batch(trainer: Trainer, samples: int) -> Any:
    """A training batch of ``samples`` samples, read without advancing the data loader."""
    loader = _loader(trainer)
    tensors = getattr(loader, "tensors", None)
    transform = getattr(loader, "transform", None)  # the kit's loaders: e.g. text bytes to token ids
    if tensors is not None:  # the kit's ResumableLoader over tensors
        batch = tuple(t[:samples] for t in tensors)
        return batch if transform is None else transform(batch, torch.Generator().manual_seed(0))
    dataset, collate = getattr(loader, "dataset", None), getattr(loader, "collate_fn", None)
    if dataset is not None and collate is not None and hasattr(dataset, "__getitem__"):
        batch = collate([dataset[i] for i in range(min(samples, len(dataset)))])
        return batch if transform is None else transform(batch, torch.Generator().manual_seed(0))
    raise ValueError(f"Cannot read a batch from the training data loader {type(loader).__name__} without iterating "
                     "it; plan a FLOPs budget over a map-style dataset, or use `plan: false`")


def batch_size_of(batch: Any) -> int:
    sizes = []
    apply_to_collection(batch, torch.Tensor, lambda t: sizes.append(t.shape[0] if t.dim() else 1))
    return sizes[0] if sizes else 1


@contextlib.contextmanager
def _trial(pl_module: LightningModule) -> Iterator[None]:
    """Run a training step that leaves no trace: parameters, buffers, modes, random state,
    gradients and ``self.log`` calls are as before."""
    modes = [(m, m.training) for m in pl_module.modules()]
    flags = [(p, p.requires_grad) for p in pl_module.parameters()]
    buffers = [(b, b.detach().clone()) for b in pl_module.buffers()]
    pl_module.log = lambda *args, **kwargs: None  # type: ignore[method-assign]
    pl_module.log_dict = lambda *args, **kwargs: None  # type: ignore[method-assign]
    try:
        with torch.random.fork_rng(devices=[]):
            pl_module.train()
            yield
    finally:
        del pl_module.log, pl_module.log_dict
        with torch.no_grad():
            for buffer, value in buffers:
                if buffer.shape == value.shape:
                    buffer.copy_(value)
        for module, mode in modes:
            module.training = mode
        for param, flag in flags:
            param.requires_grad_(flag)
            param.grad = None


def count_training_step(pl_module: LightningModule, batch: Any) -> FlopTracker:
    """Trace ``pl_module.training_step(batch, 0)`` eagerly and return the tracker: its
    ``executed`` FLOPs (forward and backward, counted as the forward runs) and ``inside`` (the
    FLOPs inside each masked module). Nothing changes on the model."""
    tracker = FlopTracker()
    with _trial(pl_module), torch.compiler.set_stance("force_eager"), tracker:
        pl_module.training_step(batch, 0)
    return tracker
