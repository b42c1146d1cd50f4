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

    python benchmarks/supernet.py [--steps 30] [--which vit gpt]
"""

from __future__ import annotations

import argparse
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--which", nargs="+", default=["vit", "gpt"], choices=["vit", "gpt"])
    args = parser.parse_args()
    for which in args.which:
        bench(which, args.steps)


if __name__ == "__main__":
    main()
