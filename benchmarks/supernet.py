"""Supernet step time vs the sum of its sampled subnets' standalone forward+backward times.

For each step, the sandwich sampler of configs/supernet_{vit_digits,gpt_text}.yaml picks its
subnets (largest, smallest, 2 random). Timed side by side, alternating within every step:

- ``supernet``: ``SupernetModule.training_step`` (every subnet's forward on sliced weights, the
  distillation losses, their sum) and ONE backward;
- ``standalone``: each subnet exported as a plain model (PlainViT / the kit's GPT, built before
  timing), its own forward, the same loss, its own backward; times summed.

Printed: median ms per step of each and the ratio (target: supernet within 10% of standalone,
i.e. ratio <= 1.10). No optimizer step in either (it is the same AdamW over the supernet's
parameters in real training and is not part of the claim).

With ``--compile``: the same supernet step eager vs with ``torch.compile`` (inductor) on the
elastic model, after a warm-up that compiles; printed: median ms of each, the speedup, and the
graphs built during the timed steps (every step draws new subnets; 0 means no recompiles).

    python benchmarks/supernet.py [--steps 30] [--which vit gpt] [--compile]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
import yaml
from lightning.pytorch import seed_everything

from lit_eff.datamodules import DigitsDataModule, TextDataModule
from lit_eff.supernet import SupernetModule
from lit_eff.supernet.losses import kd_kl

CONFIGS = {"vit": "configs/supernet_vit_digits.yaml", "gpt": "configs/supernet_gpt_text.yaml"}


def build(which: str):
    config = yaml.safe_load(open(CONFIGS[which]))
    seed_everything(0, verbose=False)
    args = dict(config["model"]["init_args"])
    args.pop("sampler")
    module = SupernetModule(**args)
    data_args = config["data"]["init_args"]
    data = DigitsDataModule(**data_args) if which == "vit" else TextDataModule(**data_args)
    data.setup("fit")
    module.sampler.bind(module.space, module.flops, 10_000)
    return module, data


def standalone(module, draws, exported, x, y) -> float:
    """Each subnet alone: forward, its loss, backward; summed wall time."""
    total, teacher = 0.0, None
    for draw, model in zip(draws, exported):
        start = time.perf_counter()
        logits = model(x)
        if draw.role == "max":
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
            teacher = logits.detach()
        else:
            loss = kd_kl(logits, teacher)
        loss.backward()
        total += time.perf_counter() - start
    return total


def supernet(module, x, y) -> float:
    start = time.perf_counter()
    module.training_step((x, y), 0).backward()
    return time.perf_counter() - start


def bench(which: str, steps: int) -> None:
    module, data = build(which)
    module.log = lambda *a, **k: None  # no trainer here
    batches = iter(data.train_dataloader())
    times = {"supernet": [], "standalone": []}
    for step in range(steps + 2):
        try:
            x, y = next(batches)
        except StopIteration:
            batches = iter(data.train_dataloader())
            x, y = next(batches)
        draws = module.sampler.draw(step)
        module.sampler._cached = (module.global_step, draws)  # training_step (no trainer: step 0) uses these
        exported = [module.export(d.config).train() for d in draws]
        order = ["supernet", "standalone"] if step % 2 else ["standalone", "supernet"]
        for name in order:
            module.zero_grad(set_to_none=True)
            t = supernet(module, x, y) if name == "supernet" else standalone(module, draws, exported, x, y)
            if step >= 2:  # warm-up
                times[name].append(t)
    sup, alone = statistics.median(times["supernet"]), statistics.median(times["standalone"])
    print(f"{which}: supernet step {sup * 1e3:.1f} ms, sum of standalone subnets {alone * 1e3:.1f} ms, "
          f"ratio {sup / alone:.3f} (target <= 1.10), {len(draws)} subnets/step, median of {steps} steps, "
          f"{torch.get_num_threads()} thread(s)")


def bench_compile(which: str, steps: int, warmup: int = 6) -> None:
    eager, data = build(which)
    compiled = copy.deepcopy(eager)
    compiled.model = torch.compile(compiled.model)
    for module in (eager, compiled):
        module.log = lambda *a, **k: None  # no trainer here
    batches = iter(data.train_dataloader())
    times = {"eager": [], "compiled": []}
    start, graphs = time.perf_counter(), 0
    for step in range(warmup + steps):
        try:
            x, y = next(batches)
        except StopIteration:
            batches = iter(data.train_dataloader())
            x, y = next(batches)
        draws = eager.sampler.draw(step + 1000)  # training_step (no trainer: step 0) uses these draws
        for module in (eager, compiled):
            module.sampler._cached = (0, draws)
        if step == warmup:
            print(f"{which}: warm-up of {warmup} steps (compiling) took {time.perf_counter() - start:.1f} s")
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        order = [eager, compiled] if step % 2 else [compiled, eager]
        for module in order:
            module.zero_grad(set_to_none=True)
            t = supernet(module, x, y)
            if step >= warmup:
                times["eager" if module is eager else "compiled"].append(t)
    built = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs
    e, c = statistics.median(times["eager"]), statistics.median(times["compiled"])
    print(f"{which}: eager step {e * 1e3:.1f} ms, compiled step {c * 1e3:.1f} ms, speedup {e / c:.3f}, "
          f"{built} graphs built in the {steps} timed steps, {torch.get_num_threads()} thread(s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--which", nargs="+", default=["vit", "gpt"], choices=["vit", "gpt"])
    parser.add_argument("--compile", action="store_true", help="eager vs torch.compile (inductor) supernet step")
    args = parser.parse_args()
    for which in args.which:
        (bench_compile if args.compile else bench)(which, args.steps)


if __name__ == "__main__":
    main()
