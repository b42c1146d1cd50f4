"""Step time of the sparsity callbacks vs dense Lightning, and vs the nearest anchors.

The reference job (configs/vit_digits.yaml: model, data, optimizer) trains the same number of
optimizer steps per variant; variants alternate over several rounds in one process. Printed:
median milliseconds per optimizer step and the ratio to dense.

- NMSparsity 2:4 SR-STE (masks recomputed once per optimizer step) vs torch.ao's
  WeightNormSparsifier 2:4 (FakeSparsity parametrizations, ``sparsifier.step()`` every step);
- MagnitudePruning (update every epoch) vs Lightning's ModelPruning (L1, every epoch);
- DynamicSparsity RigL (update every 100 steps, ERK);
- StaticSparsity (SPDF's sparse phase: a fixed random mask, never released here).

    python benchmarks/sparsity.py [--steps 120] [--rounds 5]
"""

from __future__ import annotations

from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelPruning
from lightning_steps import arguments, compare

from lit_eff import sparsity
from lit_eff.callbacks import DynamicSparsity, MagnitudePruning, NMSparsity, StaticSparsity


class TorchAOSparsifier(Callback):
    """torch.ao's 2:4 WeightNormSparsifier on the same layers, masks recomputed every step."""

    def setup(self, trainer, pl_module, stage):
        from torch.ao.pruning import WeightNormSparsifier

        self.sparsifier = WeightNormSparsifier(sparsity_level=1.0, sparse_block_shape=(1, 4), zeros_per_block=2)
        names = sparsity.find_targets(pl_module)
        self.sparsifier.prepare(pl_module, config=[{"tensor_fqn": f"{name}.weight"} for name in names])
        self.sparsifier.step()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.sparsifier.step()


def lightning_pruning(model):
    layers = sparsity.find_targets(model)
    return [ModelPruning("l1_unstructured", amount=0.5, parameters_to_prune=[(m, "weight") for m in layers.values()],
                         use_global_unstructured=False, make_pruning_permanent=False, verbose=0)]


VARIANTS = {
    "dense": lambda model: [],
    "NMSparsity 2:4 SR-STE": lambda model: [NMSparsity(2, 4, method="srste")],
    "torch.ao WeightNormSparsifier 2:4": lambda model: [TorchAOSparsifier()],
    "MagnitudePruning 0.5, every epoch": lambda model: [MagnitudePruning(0.5, start_step=0, end_step=57,
                                                                         update_every=19)],
    "Lightning ModelPruning L1 0.5": lightning_pruning,
    "DynamicSparsity RigL ERK 0.5": lambda model: [DynamicSparsity(0.5, distribution="erk", update_every=100)],
    "StaticSparsity 0.5 (SPDF sparse phase)": lambda model: [StaticSparsity(0.5)],
}


def main() -> None:
    args = arguments(__doc__.split("\n")[0])
    compare(VARIANTS, args.steps, args.rounds)


if __name__ == "__main__":
    main()
