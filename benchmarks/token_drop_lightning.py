"""TokenDrop's training speedup inside Lightning vs in a plain PyTorch loop, side by side.

The job of timm_steps.py (timm ViT width 192, depth 6, 32x32, patch 4, batch 16, AdamW). TokenDrop
keeps 50% of the patch tokens from block 2 (a third of the depth), attention scores. Four
variants alternate in one process: plain loop dense / TokenDrop (the reducer attached with
:func:`lit_eff.tokens.attach_drop`), Lightning dense / TokenDrop (the callback, and Lightning +
FlopsMonitor). Printed: each speedup over its own dense, and the Lightning speedup over the
plain-loop one (goal >= 0.95).

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/token_drop_lightning.py [--steps 30] [--rounds 4] [--clock wall|cpu]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import timm_steps
from timm_steps import alternate, arguments, data, fit, ratio, vit

from lit_eff.callbacks import FlopsMonitor, TokenDrop
from lit_eff.tokens import attach_drop

BLOCKS, KEEP = [2], [0.5]


def plain(steps: int, drop: bool, warmup: int = 5) -> list[float]:
    torch.manual_seed(0)
    model = vit().train()
    reducer = attach_drop(model, BLOCKS, KEEP, score="attn") if drop else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times, last, done = [], None, 0
    while done < steps + warmup + 1:
        for x, y in data(steps):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            now = timm_steps.now()
            if last is not None:
                times.append(now - last)
            last, done = now, done + 1
            if done == steps + warmup + 1:
                break
    if reducer is not None:
        reducer.remove()
    return times[warmup:]


def main() -> None:
    args = arguments(__doc__.split("\n")[0], steps=30, rounds=4)
    torch.set_num_threads(1)
    variants = {
        "plain dense": lambda: plain(args.steps, False),
        "plain TokenDrop": lambda: plain(args.steps, True),
        "Lightning dense": lambda: fit(lambda model: [], args.steps),
        "Lightning TokenDrop": lambda: fit(lambda model: [TokenDrop(BLOCKS, KEEP, score="attn")], args.steps),
        "Lightning TokenDrop + FlopsMonitor": lambda: fit(
            lambda model: [TokenDrop(BLOCKS, KEEP, score="attn"), FlopsMonitor()], args.steps),
    }
    t = alternate(variants, args.rounds)
    plain_speedup = t.paired("plain dense", "plain TokenDrop")
    for name in ("Lightning TokenDrop", "Lightning TokenDrop + FlopsMonitor"):
        speedup = t.paired("Lightning dense", name)
        print(f"  speedup (median over rounds): plain loop x{plain_speedup:.3f}, {name} x{speedup:.3f}")
        ratio(f"{name} speedup / plain-loop speedup", speedup / plain_speedup, ">= 0.95")
    ratio("Lightning dense / plain dense", t.paired("Lightning dense", "plain dense"), "")


if __name__ == "__main__":
    main()
