"""Shared harness: a user's own timm ViT LightningModule, timed per optimizer step.

The job: timm ``VisionTransformer`` width 192, depth 6, 3 heads, 32x32 inputs, patch 4, 10
classes, batch 16, AdamW, synthetic data held in memory. Each variant is a function returning
the callbacks to add; :func:`alternate` runs every variant for ``steps`` optimizer steps, round
after round in one process, and keeps the median of the steady-state step times (the first
``warmup`` steps of each fit excluded). Imported by the scripts next to it.

``--clock cpu`` times steps with the thread's CPU time instead of wall time: on a machine shared
with other work (more runnable threads than cores) wall time mostly measures waiting for a core,
while the CPU time of the one training thread still measures the step's own work.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import Callable

import timm
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from torch.utils.data import DataLoader, TensorDataset

BATCH = 16
CLOCK = {"wall": time.perf_counter, "cpu": time.thread_time}
clock = time.perf_counter  # set by arguments()


def vit(depth: int = 6) -> torch.nn.Module:
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, num_classes=10,
                             embed_dim=192, depth=depth, num_heads=3)


class ViTModule(LightningModule):
    """A plain user module: no lit_eff code."""

    def __init__(self, depth: int = 6) -> None:
        super().__init__()
        self.model = vit(depth)

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-4)


def data(steps: int) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(BATCH * 8, 3, 32, 32, generator=g), torch.randint(0, 10, (BATCH * 8,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=False)


class StepTimer(Callback):
    """The wall time between consecutive ``on_train_batch_end`` calls: one full step each."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.last: float | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now = clock()
        if self.last is not None:
            self.times.append(now - self.last)
        self.last = now


def fit(make_callbacks: Callable[[LightningModule], list[Callback]], steps: int, warmup: int = 5,
        module: Callable[[], LightningModule] = ViTModule) -> list[float]:
    """Steady-state step times (seconds) of one fit with ``make_callbacks(model)`` added."""
    seed_everything(0, verbose=False)
    model = module()
    timer = StepTimer()
    trainer = Trainer(max_steps=steps + warmup + 1, accelerator="cpu", devices=1, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, limit_val_batches=0, callbacks=[*make_callbacks(model), timer])
    trainer.fit(model, data(steps))
    return timer.times[warmup:]


def arguments(description: str, steps: int = 40, rounds: int = 5) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--steps", type=int, default=steps, help="timed steps per fit")
    parser.add_argument("--rounds", type=int, default=rounds, help="fits per variant, alternating")
    parser.add_argument("--clock", choices=list(CLOCK), default="wall",
                        help="wall time, or the training thread's CPU time (for a busy machine)")
    args = parser.parse_args()
    global clock
    clock = CLOCK[args.clock]
    return args


def now() -> float:
    return clock()


class Timings(dict):
    """Median seconds per step of each variant; ``paired(a, b)``: the median over rounds of a's
    step time over b's in the same round (robust to the machine's drift between rounds)."""

    def __init__(self, median: dict[str, float], rounds: dict[str, list[float]], steps: dict[str, list[float]]) -> None:
        super().__init__(median)
        self.rounds, self.steps = rounds, steps

    def paired(self, a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(self.rounds[a], self.rounds[b]))

    def fastest(self, name: str) -> float:
        """The 10th percentile of the variant's step times: interference from other work on the
        machine only adds time, so the fast steps show the variant's own cost."""
        return statistics.quantiles(self.steps[name], n=10)[0]


def alternate(variants: dict[str, Callable[[], list[float]]], rounds: int) -> Timings:
    """Run each variant once per round (the order rotates each round); the median step time over
    all rounds' steps, per variant. Also prints each round's median, so noise shows."""
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    times: dict[str, list[float]] = {name: [] for name in variants}
    rounds_median: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            got = variants[name]()
            times[name] += got
            rounds_median[name].append(statistics.median(got))
    which = "thread CPU time" if clock is time.thread_time else "wall time"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {rounds} rounds, {which}; load average "
          f"{open('/proc/loadavg').read().split()[0]}")
    median = {name: statistics.median(values) for name, values in times.items()}
    for name, seconds in median.items():
        per_round = " ".join(f"{t * 1e3:.1f}" for t in rounds_median[name])
        print(f"  {name:44s} {seconds * 1e3:8.2f} ms/step (median; rounds: {per_round}); "
              f"10th percentile {statistics.quantiles(times[name], n=10)[0] * 1e3:.2f}")
    return Timings(median, rounds_median, times)


def ratio(line: str, value: float, goal: str) -> None:
    print(f"RATIO {line}: x{value:.3f} (goal {goal})")
