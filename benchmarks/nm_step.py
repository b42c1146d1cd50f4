"""Step time of NMSparsity 2:4 (SR-STE and STE) vs dense, on a user's own timm ViT in Lightning.

One thread, variants alternating in one process, median of steady-state steps (see
timm_steps.py for the job). Prints one ``RATIO`` line per variant: its step time over dense.

    OMP_NUM_THREADS=1 python benchmarks/nm_step.py [--steps 40] [--rounds 6] [--clock wall|cpu] [--profile]
"""

from __future__ import annotations

import torch
from timm_steps import alternate, arguments, fit, ratio

from lit_eff.callbacks import NMSparsity

VARIANTS = {
    "dense": lambda model: [],
    "NMSparsity 2:4 SR-STE": lambda model: [NMSparsity(2, 4, method="srste", include=["*blocks.*"])],
    "NMSparsity 2:4 STE": lambda model: [NMSparsity(2, 4, method="ste", include=["*blocks.*"])],
}


def profile(steps: int) -> None:
    from lightning.pytorch import Callback
    from torch.profiler import ProfilerActivity, profile

    class Prof(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 5:
                self.prof = profile(activities=[ProfilerActivity.CPU]).__enter__()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 5 + steps:
                self.prof.__exit__(None, None, None)
                print(self.prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))

    for name in ("dense", "NMSparsity 2:4 SR-STE"):
        print(name)
        fit(lambda model, name=name: [*VARIANTS[name](model), Prof()], steps + 10)


def main() -> None:
    import sys

    if "--profile" in sys.argv:
        sys.argv.remove("--profile")
        args = arguments(__doc__.split("\n")[0], steps=20)
        profile(args.steps)
        return
    args = arguments(__doc__.split("\n")[0], steps=40, rounds=6)
    torch.set_num_threads(1)
    median = alternate({name: lambda make=make: fit(make, args.steps) for name, make in VARIANTS.items()}, args.rounds)
    for name in VARIANTS:
        if name != "dense":
            ratio(f"{name} / dense", median[name] / median["dense"], "<= 1.05" if "SR-STE" in name else "")


if __name__ == "__main__":
    main()
