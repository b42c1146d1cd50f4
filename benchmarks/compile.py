"""Eager vs torch.compile step time, for dense and each technique, on the reference job.

The reference job (configs/vit_digits.yaml: model, data, optimizer) trains the same number of
optimizer steps per variant, eagerly and with ``torch.compile(lightning_module)`` (inductor by
default); variants alternate over rounds in one process. Steps before ``--warmup`` (compilation,
FlopsMonitor's counted batch) are excluded. Printed twice, from the median and from the 10th
percentile of the timed steps (a step that recompiles at a schedule's phase change is an outlier
both leave out): milliseconds per optimizer step, compiled/eager per variant, and each variant's
ratio to dense in the same mode.

    python benchmarks/compile.py [--steps 120] [--warmup 20] [--rounds 3] [--backend inductor]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch
from lightning.pytorch import Callback, Trainer
from lightning_steps import build

from lit_eff.callbacks import (DynamicSparsity, FlopsMonitor, GradientMasking, LayerFreezing, MagnitudePruning,
                               NMSparsity, StaticSparsity, TokenDrop, TokenMerge)

VARIANTS = {
    "dense": lambda: [],
    "dense + FlopsMonitor": lambda: [FlopsMonitor()],
    "NMSparsity 2:4 SR-STE": lambda: [NMSparsity(2, 4, method="srste")],
    "MagnitudePruning 0.5": lambda: [MagnitudePruning(0.5, start_step=0, end_step=60, update_every=20)],
    "DynamicSparsity RigL 0.5": lambda: [DynamicSparsity(0.5, update_every=100)],
    "StaticSparsity 0.5": lambda: [StaticSparsity(0.5)],
    "GradientMasking 0.2": lambda: [GradientMasking(density=0.2, refresh_every=30)],
    "LayerFreezing 0.5": lambda: [LayerFreezing(final_fraction=0.5, freeze_start=0.0, freeze_end=0.0)],
    "TokenDrop 0.5 at block 1": lambda: [TokenDrop(blocks=[1], keep_ratios=[0.5], score="cosine")],
    "TokenMerge r=2": lambda: [TokenMerge(r=2, apply_in="both")],
}


class StepTimes(Callback):
    """Wall time of every optimizer step after ``warmup`` steps."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.times, self.last = warmup, [], None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now = time.perf_counter()
        if trainer.global_step > self.warmup and self.last is not None:
            self.times.append(now - self.last)
        self.last = now


def time_fit(make, steps: int, warmup: int, backend: str | None) -> list[float]:
    model, data = build()
    timer = StepTimes(warmup)
    trainer = Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      limit_val_batches=0, callbacks=[*make(), timer])
    if backend:
        torch._dynamo.reset()  # each fit compiles afresh: guards on earlier fits' objects would fill the cache
    trainer.fit(torch.compile(model, backend=backend) if backend else model, datamodule=data)
    return timer.times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    variants = {k: v for k, v in VARIANTS.items() if not args.only or k in args.only or k == "dense"}
    times = {(name, mode): [] for name in variants for mode in ("eager", "compiled")}
    for _ in range(args.rounds):
        for name, make in variants.items():
            times[(name, "eager")] += time_fit(make, args.steps, args.warmup, None)
            times[(name, "compiled")] += time_fit(make, args.steps, args.warmup, args.backend)
    # a step that recompiles (a schedule's phase change) is an outlier: medians and 10th
    # percentiles of the steps leave it out; interference from other work only adds time
    for label, stat in (("medians", statistics.median), ("10th percentiles",
                                                          lambda v: statistics.quantiles(v, n=10)[0])):
        value = {key: stat(v) for key, v in times.items()}
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, backend {args.backend}, "
              f"{args.steps} steps ({args.warmup} warm-up) x {args.rounds} rounds; {label} of the steps")
        print(f"  {'variant':32s} {'eager ms':>9s} {'compiled ms':>12s} {'compiled/eager':>15s} "
              f"{'eager/dense':>12s} {'compiled/dense':>15s}")
        for name in variants:
            eager, compiled = value[(name, "eager")], value[(name, "compiled")]
            print(f"  {name:32s} {eager * 1e3:9.2f} {compiled * 1e3:12.2f} {compiled / eager:15.3f} "
                  f"{eager / value[('dense', 'eager')]:12.3f} {compiled / value[('dense', 'compiled')]:15.3f}")

if __name__ == "__main__":
    main()
