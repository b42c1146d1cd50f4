"""Step time of LayerFreezing and GradientMasking vs dense Lightning on the reference ViT job.

The reference job (configs/vit_digits.yaml: model, data, optimizer; 4 blocks) trains the same
number of optimizer steps per variant; variants alternate over several rounds in one process.
Printed: median milliseconds per optimizer step (first step excluded) and the ratio to dense.

- LayerFreezing, half the blocks frozen from step 0 (blocks 0-1 and the stem; issue target:
  dense / frozen >= 1.2), and the same without the stem (only weight gradients disappear:
  block 0 still back-propagates to the trainable patch embedding);
- GradientMasking at density 0.2, refresh_every=30 (issue target: <= 5% over dense, amortized
  over refreshes), and refresh_every=1 (a refresh every step: the top-k cost alone). The time
  spent inside GradientMasking's own hooks is also summed and printed per step: a direct
  measure of its overhead, unaffected by run-to-run noise.

    python benchmarks/gradients.py [--steps 120] [--rounds 5]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch
import yaml
from lightning.pytorch import Callback, Trainer, seed_everything

from lit_eff.callbacks import GradientMasking, LayerFreezing
from lit_eff.datamodules import DigitsDataModule
from lit_eff.models import ImageClassifier

CONFIG = "configs/vit_digits.yaml"


class Timer(Callback):
    """Wall time per optimizer step after the first (warm-up excluded)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 1:
            self.start = time.perf_counter()
        self.end, self.steps = time.perf_counter(), trainer.global_step - 1


class TimedGradientMasking(GradientMasking):
    """GradientMasking that also sums the wall time spent in its own hooks (refreshes, masking,
    the weight copy and restore, logging): the overhead, measured directly, free of the noise of
    comparing two whole runs."""

    spent = 0.0
    steps = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        start = time.perf_counter()
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        if trainer.global_step >= 1:  # the Timer's window
            TimedGradientMasking.spent += time.perf_counter() - start
            TimedGradientMasking.steps += 1

    def _restore(self, optimizer, args, kwargs):
        start = time.perf_counter()
        super()._restore(optimizer, args, kwargs)
        TimedGradientMasking.spent += time.perf_counter() - start

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        start = time.perf_counter()
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        TimedGradientMasking.spent += time.perf_counter() - start


def build():
    config = yaml.safe_load(open(CONFIG))
    seed_everything(0, verbose=False)
    model = ImageClassifier(**config["model"]["init_args"])
    data = DigitsDataModule(**config["data"]["init_args"])
    return model, data


def run(make_callbacks, steps: int) -> float:
    model, data = build()
    timer = Timer()
    trainer = Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      limit_val_batches=0, callbacks=[*make_callbacks(), timer])
    trainer.fit(model, datamodule=data)
    return (timer.end - timer.start) / timer.steps


VARIANTS = {
    "dense": lambda: [],
    "LayerFreezing 2/4 blocks + stem": lambda: [LayerFreezing(0.5, freeze_start=0.0, freeze_end=0.0)],
    "LayerFreezing 2/4 blocks, stem trains": lambda: [LayerFreezing(0.5, freeze_start=0.0, freeze_end=0.0,
                                                                    freeze_stem=False)],
    "GradientMasking 0.2, refresh 30": lambda: [TimedGradientMasking(0.2, refresh_every=30)],
    "GradientMasking 0.2, refresh 1": lambda: [GradientMasking(0.2, refresh_every=1)],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(args.rounds):
        for name, make in VARIANTS.items():
            times[name].append(run(make, args.steps))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.steps} steps x {args.rounds} rounds")
    median = {name: statistics.median(values) for name, values in times.items()}
    for name, seconds in median.items():
        print(f"  {name:40s} {seconds * 1e3:8.2f} ms/step (median)  x{seconds / median['dense']:.3f} of dense"
              f"  (dense/this x{median['dense'] / seconds:.2f})   best x{min(times[name]) / min(times['dense']):.3f}")
    inside = TimedGradientMasking.spent / max(1, TimedGradientMasking.steps)
    own = median["GradientMasking 0.2, refresh 30"]
    print(f"  time inside GradientMasking's hooks (refresh 30, amortized): {inside * 1e3:.3f} ms/step = "
          f"{inside / (own - inside) * 100:.2f}% over the rest of the same runs' steps "
          f"({inside / median['dense'] * 100:.2f}% of the median dense step)")


if __name__ == "__main__":
    main()
