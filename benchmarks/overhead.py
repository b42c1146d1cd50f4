"""Step time of a plain PyTorch loop vs plain Lightning vs Lightning + FlopsMonitor.

The reference job (configs/vit_digits.yaml: model, data, optimizer) runs the same number of
optimizer steps in each variant, alternating variants over several rounds in one process, and
prints the median seconds per step and the ratios.

    python benchmarks/overhead.py [--steps 60] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from lightning_steps import build, time_fit

from lit_eff.callbacks import FlopsMonitor


def plain_pytorch(steps: int) -> float:
    model, data = build()
    data.setup("fit")
    loader = data.train_dataloader()
    from lit_eff.models.optim import adamw_warmup_cosine

    h = model.hparams
    optim = adamw_warmup_cosine(model.model, steps, h.lr, h.weight_decay, h.warmup)
    optimizer, scheduler = optim["optimizer"], optim["lr_scheduler"]["scheduler"]
    model.train()
    step, start = 0, None
    while step < steps:
        for images, labels in loader:
            loss = F.cross_entropy(model(images).float(), labels)
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step == 1:
                start = time.perf_counter()
            if step == steps:
                break
    return (time.perf_counter() - start) / (steps - 1)


def lightning(steps: int, monitor: bool) -> float:
    return time_fit(lambda model: [FlopsMonitor()] if monitor else [], steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    variants = {
        "plain PyTorch": lambda: plain_pytorch(args.steps),
        "Lightning": lambda: lightning(args.steps, monitor=False),
        "Lightning + FlopsMonitor": lambda: lightning(args.steps, monitor=True),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, run in variants.items():
            times[name].append(run())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.steps} steps x {args.rounds} rounds")
    for label, stat in (("median", statistics.median), ("best", min)):
        value = {name: stat(values) for name, values in times.items()}
        print(f"{label} of the rounds, seconds per optimizer step:")
        for name, seconds in value.items():
            print(f"  {name:26s} {seconds * 1e3:8.2f} ms/step   x{seconds / value['plain PyTorch']:.3f} of plain PyTorch")
        print(f"  FlopsMonitor over Lightning: x{value['Lightning + FlopsMonitor'] / value['Lightning']:.3f}")


if __name__ == "__main__":
    main()
