"""Shared harness of the step-time benchmarks: the reference job, a per-step timer, and the
alternating-rounds comparison printed as ratios to a baseline.

The reference job is configs/vit_digits.yaml (model, data, optimizer). Each variant is a
function returning the callbacks to add; every variant trains the same number of optimizer
steps, variants alternate over rounds in one process, and the first step is excluded.
Imported by the scripts next to it (run them as ``python benchmarks/<name>.py``).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
from collections.abc import Callable

import torch
import yaml
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything

from lit_eff.datamodules import DigitsDataModule
from lit_eff.models import ImageClassifier

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "vit_digits.yaml")

Variants = dict[str, Callable[[LightningModule], list[Callback]]]


class Timer(Callback):
    """Wall time per optimizer step after the first (warm-up excluded)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 1:
            self.start = time.perf_counter()
        self.end, self.steps = time.perf_counter(), trainer.global_step - 1


def build(config: str = CONFIG) -> tuple[ImageClassifier, DigitsDataModule]:
    """The reference job's model and data, seeded."""
    with open(config) as f:
        job = yaml.safe_load(f)
    seed_everything(0, verbose=False)
    return ImageClassifier(**job["model"]["init_args"]), DigitsDataModule(**job["data"]["init_args"])


def time_fit(make_callbacks: Callable[[LightningModule], list[Callback]], steps: int) -> float:
    """Seconds per optimizer step of the reference job with ``make_callbacks(model)`` added."""
    model, data = build()
    timer = Timer()
    trainer = Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      limit_val_batches=0, callbacks=[*make_callbacks(model), timer])
    trainer.fit(model, datamodule=data)
    return (timer.end - timer.start) / timer.steps


def arguments(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--rounds", type=int, default=5)
    return parser.parse_args()


def compare(variants: Variants, steps: int, rounds: int, baseline: str = "dense") -> dict[str, float]:
    """Alternate the variants over ``rounds``; print median ms/step and ratios to ``baseline``.
    Returns the median seconds per step of each variant."""
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, make in variants.items():
            times[name].append(time_fit(make, steps))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {steps} steps x {rounds} rounds")
    median = {name: statistics.median(values) for name, values in times.items()}
    base, best = median[baseline], min(times[baseline])
    for name, seconds in median.items():
        print(f"  {name:40s} {seconds * 1e3:8.2f} ms/step (median)  x{seconds / base:.3f} of {baseline}"
              f"  ({baseline}/this x{base / seconds:.2f})   best x{min(times[name]) / best:.3f}")
    return median
