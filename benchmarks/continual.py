"""Seq-digits class-incremental learning: dense + DER++ replay vs SparCL's task-aware masking +
replay (configs/vit_seq_digits.yaml, configs/techniques/task_aware_masking.yaml), per seed.

Printed per run: the final test accuracy on all 10 classes, the average of the per-task test
accuracies, and the training FLOPs FlopsMonitor counted (executed, and sparse-effective: the
masked layers' FLOPs weighted by their density).

    python benchmarks/continual.py [--seeds 0 1] [--epochs-per-task 20]
"""

from __future__ import annotations

import argparse
import os
import tempfile

from lit_eff.callbacks import FlopsMonitor
from lit_eff.cli import LitEffCLI

ROOT = os.path.join(os.path.dirname(__file__), "..")
BASE = os.path.join(ROOT, "configs", "vit_seq_digits.yaml")
TDM = os.path.join(ROOT, "configs", "techniques", "task_aware_masking.yaml")


def run(configs: list[str], seed: int, epochs_per_task: int, folder: str) -> dict[str, float]:
    args = [a for c in configs for a in ("--config", c)]
    args += ["--seed_everything", str(seed), "--trainer.max_epochs", str(5 * epochs_per_task),
             "--data.init_args.epochs_per_task", str(epochs_per_task), "--trainer.logger", "false",
             "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
             "--trainer.default_root_dir", folder]
    cli = LitEffCLI(args=args, run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    metrics = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    monitor = next(cb for cb in cli.trainer.callbacks if isinstance(cb, FlopsMonitor))
    return {"acc": metrics["test/acc"], "acc_avg": metrics["test/acc_avg"],
            "tasks": [round(metrics[f"test/acc_task{t}"], 3) for t in range(5)],
            "executed": monitor.total_executed, "effective": monitor.total_effective,
            "steps": cli.trainer.global_step}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs-per-task", type=int, default=20)
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="lit_eff_continual_")
    for seed in args.seeds:
        for name, configs in (("dense + replay", [BASE]), ("TDM + replay", [BASE, TDM])):
            r = run(configs, seed, args.epochs_per_task, folder)
            print(f"seed {seed} {name:15s} test acc {r['acc']:.3f}  per-task avg {r['acc_avg']:.3f} {r['tasks']}  "
                  f"steps {r['steps']}  FLOPs executed {r['executed']:.3e} effective {r['effective']:.3e}", flush=True)


if __name__ == "__main__":
    main()
