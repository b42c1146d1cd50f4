"""Step time of LayerFreezing and GradientMasking vs dense Lightning on the reference ViT job.

The reference job (configs/vit_digits.yaml: model, data, optimizer; 4 blocks) trains the same
number of optimizer steps per variant; variants alternate over several rounds in one process.
Printed: median milliseconds per optimizer step (first step excluded) and the ratio to dense.

- LayerFreezing, half the blocks frozen from step 0 (blocks 0-1 and the stem), and the same
  without the stem (only weight gradients disappear: block 0 still back-propagates to the
  trainable patch embedding);
- GradientMasking at density 0.2, refresh_every=30 (SparCL's setting), and refresh_every=1 (a
  refresh every step: the top-k cost alone). The time spent inside GradientMasking's own hooks
  is also summed and printed per step: its overhead, free of run-to-run noise.

    python benchmarks/gradients.py [--steps 120] [--rounds 5]
"""

from __future__ import annotations

import time

from lightning_steps import arguments, compare

from lit_eff.callbacks import GradientMasking, LayerFreezing


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


VARIANTS = {
    "dense": lambda model: [],
    "LayerFreezing 2/4 blocks + stem": lambda model: [LayerFreezing(0.5, freeze_start=0.0, freeze_end=0.0)],
    "LayerFreezing 2/4 blocks, stem trains": lambda model: [LayerFreezing(0.5, freeze_start=0.0, freeze_end=0.0,
                                                                          freeze_stem=False)],
    "GradientMasking 0.2, refresh 30": lambda model: [TimedGradientMasking(0.2, refresh_every=30)],
    "GradientMasking 0.2, refresh 1": lambda model: [GradientMasking(0.2, refresh_every=1)],
}


def main() -> None:
    args = arguments(__doc__.split("\n")[0])
    median = compare(VARIANTS, args.steps, args.rounds)
    inside = TimedGradientMasking.spent / max(1, TimedGradientMasking.steps)
    own = median["GradientMasking 0.2, refresh 30"]
    print(f"  time inside GradientMasking's hooks (refresh 30, amortized): {inside * 1e3:.3f} ms/step = "
          f"{inside / (own - inside) * 100:.2f}% over the rest of the same runs' steps "
          f"({inside / median['dense'] * 100:.2f}% of the median dense step)")


if __name__ == "__main__":
    main()
