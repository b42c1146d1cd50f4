"""Step time of NMSparsity 2:4 SR-STE vs dense, on a user's own timm ViT in Lightning.

One thread, variants alternating in one process, median of steady-state steps (see
timm_steps.py for the job). Prints one ``RATIO`` line per variant: its step time over dense.
The option ``update_every=4`` (masks recomputed every 4th step) is timed too, and its effect on
the masks measured: after each step, the share of 4-weight groups whose mask differs from the
exact N:M mask of the current weights (``update_every=1``, the default, is exact: 0).

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/nm_step.py [--steps 30] [--rounds 5] [--clock wall|cpu]
    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/nm_step.py --profile
    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/nm_step.py --parts [--steps 40]

``--parts`` times what N:M adds to a step piece by piece, in a plain loop on the same ViT, the
pieces alternating step by step (so slow spells of the machine hit every piece alike): the mask
refresh with the C kernel and with torch ops (2:4, and 1:8 and 1:16 on copies of the model), the
SR-STE term, the NaN check, and forward + backward with masks against dense; then the whole step
against dense.
"""

from __future__ import annotations

import statistics
import time

import torch
from lightning.pytorch import Callback
from timm_steps import ViTModule, alternate, arguments, fit, ratio

from lit_eff import sparsity
from lit_eff.callbacks import NMSparsity
from lit_eff.kernels.nm_cpu import native_available

VARIANTS = {
    "dense": lambda model: [],
    "NMSparsity 2:4 SR-STE": lambda model: [NMSparsity(2, 4, method="srste", include=["*blocks.*"])],
    "NMSparsity 2:4 SR-STE update_every=4": lambda model: [NMSparsity(2, 4, method="srste", update_every=4)],
}


class Drift(Callback):
    """After each step: the share of N:M groups whose mask differs from the exact one."""

    def __init__(self, technique: NMSparsity) -> None:
        self.technique, self.shares = technique, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        targets = list(self.technique.targets.values())
        exact = sparsity.nm_masks([t.parametrizations.weight.original for t in targets], 2, 4)
        differ = sum(int((sparsity.get_mask(t) != e).reshape(-1, 4).any(1).sum()) for t, e in zip(targets, exact))
        self.shares.append(differ / sum(e.numel() // 4 for e in exact))


def drift(every: int, steps: int, lr: float) -> tuple[float, float]:
    """Mean and largest share of groups off the exact mask over ``steps`` steps at ``lr``."""
    technique = NMSparsity(2, 4, method="srste", update_every=every)
    probe = Drift(technique)
    module = type("Module", (ViTModule,), {"configure_optimizers": lambda self: torch.optim.AdamW(
        self.parameters(), lr=lr)})
    fit(lambda model: [technique, probe], steps, warmup=0, module=module)
    return statistics.mean(probe.shares), max(probe.shares)


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


def parts(steps: int) -> None:
    from timm_steps import BATCH, vit

    torch.set_num_threads(1)
    torch.manual_seed(0)
    dense, masked = vit(), vit()
    masked.load_state_dict(dense.state_dict())

    def masked_group(model):
        found = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "blocks." in n}
        for layer in found.values():
            sparsity.attach_mask(layer)
        return sparsity.MaskGroup(found)

    group = masked_group(masked)
    group8, group16 = masked_group(vit()), masked_group(vit())  # 1:8 and 1:16 masks on copies of their own
    x, y = torch.randn(BATCH, 3, 32, 32), torch.randint(0, 10, (BATCH,))
    optimizers = {dense: torch.optim.AdamW(dense.parameters()), masked: torch.optim.AdamW(masked.parameters())}

    def forward_backward(model):
        torch.nn.functional.cross_entropy(model(x), y).backward()

    def step(model):
        forward_backward(model)
        if model is masked:
            group.add_pruned_weights_to_grad(2e-4)
        optimizers[model].step()
        optimizers[model].zero_grad()
        if model is masked:
            group.set_nm_masks(2, 4)
            group.finite()

    pieces = {
        "step, dense": lambda: step(dense),
        "step, N:M 2:4 SR-STE": lambda: step(masked),
        "forward+backward, dense": lambda: (forward_backward(dense), optimizers[dense].zero_grad()),
        "forward+backward, masked": lambda: forward_backward(masked),
        "SR-STE term": lambda: (group.add_pruned_weights_to_grad(2e-4), optimizers[masked].zero_grad()),
        "mask refresh, C kernel": lambda: group.set_nm_masks(2, 4),
        "mask refresh, torch ops": lambda: group.set_masks(group.nm_masks(2, 4), density=0.5),
        "NaN check": group.finite,
        "mask refresh 1:8, C kernel": lambda: group8.set_nm_masks(1, 8),
        "mask refresh 1:8, torch ops": lambda: group8.set_masks(group8.nm_masks(1, 8), density=1 / 8),
        "mask refresh 1:16, C kernel": lambda: group16.set_nm_masks(1, 16),
        "mask refresh 1:16, torch ops": lambda: group16.set_masks(group16.nm_masks(1, 16), density=1 / 16),
    }
    times: dict[str, list[float]] = {name: [] for name in pieces}
    for i in range(steps + 3):
        for name, piece in pieces.items():
            start = time.perf_counter()
            piece()
            if i >= 3:
                times[name].append(time.perf_counter() - start)
    print(f"{sum(p.numel() for p in group.weights) / 1e6:.2f} M masked weights in {len(group.names)} layers, "
          f"C kernel: {native_available()}; ms, median (10th percentile) over {steps} alternations")
    for name, got in times.items():
        print(f"  {name:28s} {statistics.median(got) * 1e3:8.2f} ({statistics.quantiles(got, n=10)[0] * 1e3:.2f})")
    median = {name: statistics.median(got) for name, got in times.items()}
    print(f"  step N:M / dense: x{median['step, N:M 2:4 SR-STE'] / median['step, dense']:.3f}; "
          f"pieces N:M adds: {(median['SR-STE term'] + median['mask refresh, C kernel'] + median['NaN check']) * 1e3:.2f} ms "
          f"+ forward/backward difference {(median['forward+backward, masked'] - median['forward+backward, dense']) * 1e3:.2f} ms")


def main() -> None:
    import sys

    if "--parts" in sys.argv:
        sys.argv.remove("--parts")
        parts(arguments(__doc__.split("\n")[0], steps=40).steps)
        return
    if "--profile" in sys.argv:
        sys.argv.remove("--profile")
        args = arguments(__doc__.split("\n")[0], steps=20)
        profile(args.steps)
        return
    args = arguments(__doc__.split("\n")[0], steps=30, rounds=5)
    torch.set_num_threads(1)
    median = alternate({name: lambda make=make: fit(make, args.steps) for name, make in VARIANTS.items()}, args.rounds)
    for name in VARIANTS:
        if name != "dense":
            print(f"  {name} / dense: x{median[name] / median['dense']:.3f} (medians over all steps), "
                  f"x{median.fastest(name) / median.fastest('dense'):.3f} (10th percentiles)")
            ratio(f"{name} / dense", median.paired(name, "dense"), "<= 1.05" if "every" not in name else "")
    for every in (1, 4):
        for lr in (1e-4, 1e-3):
            mean, most = drift(every, 16, lr)
            print(f"MASKS update_every={every}, AdamW lr {lr:g}: {mean:.3%} of 4-weight groups off the exact mask "
                  f"after a step on average (at most {most:.3%})")


if __name__ == "__main__":
    main()
