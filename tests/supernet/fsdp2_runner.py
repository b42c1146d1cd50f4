"""Trains tiny supernets in two CPU processes under DDP, then under FSDP2 (ModelParallelStrategy, one
shard per block), for tests/supernet/test_fsdp2.py.

    python -m tests.supernet.fsdp2_runner OUT_DIR

Lightning launches the second process by running this script again; both go through every case.
Rank ``r`` writes ``OUT_DIR/<case>/<strategy>/rank<r>.pt`` (full weights, sampler state, the
subnets of each step) or ``error.txt`` with the message that stopped the run.
"""

from __future__ import annotations

import os
import sys
import traceback

import torch
from lightning.pytorch import Callback
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

from lit_eff.supernet import DelayedShrinking, PerformanceAware, Uniform
from tests.contract.distributed_runner import full_state
from tests.helpers import digits, make_trainer, seeded, text
from tests.supernet.common import tiny_supernet

CASES = {
    # ElasticViT, performance-aware sampling (banks filled from losses averaged over ranks)
    "vit-perf": ("vit", lambda: PerformanceAware(num_buckets=2, k=2, q=0.5, capacity=2), {}),
    # ElasticGPT, activation checkpointing, steps without the largest subnet (unused blocks)
    "gpt-uniform-checkpointed": ("gpt", lambda: Uniform(k=2), {"activation_checkpointing": True}),
    # DεpS: the shrink-start reorganization (step 3) permutes sharded weights and AdamW moments
    "vit-deps": ("vit", lambda: DelayedShrinking(start_fraction=0.5, warmup_fraction=0.25, k=1), {}),
}


class RankRecorder(Callback):
    def __init__(self, folder: str) -> None:
        self.folder, self.subnets = folder, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.subnets.append([str(cfg) for cfg in pl_module.flops_key().keys])

    def on_fit_end(self, trainer, pl_module) -> None:
        weights = full_state(pl_module)  # a collective under FSDP2: every rank takes part
        torch.save({"weights": weights, "sampler": pl_module.sampler.state_dict(), "subnets": self.subnets,
                    "step": trainer.global_step}, os.path.join(self.folder, f"rank{trainer.global_rank}.pt"))


def run(case: str, strategy_name: str, out: str) -> None:
    arch, sampler, kwargs = CASES[case]
    folder = os.path.join(out, case, strategy_name)
    os.makedirs(folder, exist_ok=True)
    strategy = DDPStrategy() if strategy_name == "ddp" else ModelParallelStrategy(data_parallel_size=2,
                                                                                    tensor_parallel_size=1)
    seeded(0)
    module = tiny_supernet(arch, sampler=sampler(), **kwargs)
    trainer = make_trainer(strategy=strategy, devices=2, max_steps=6, callbacks=[RankRecorder(folder)])
    try:
        trainer.fit(module, datamodule=digits() if arch == "vit" else text())
    except Exception as error:  # a refusal (the test checks its message) or a failure
        if int(os.environ.get("LOCAL_RANK", 0)) == 0:
            with open(os.path.join(folder, "error.txt"), "w") as file:
                file.write(f"{type(error).__name__}: {error}\n\n{traceback.format_exc()}")


def main() -> None:
    out = sys.argv[1]
    for case in CASES:
        for strategy_name in ("ddp", "fsdp2"):
            run(case, strategy_name, out)


if __name__ == "__main__":
    main()
