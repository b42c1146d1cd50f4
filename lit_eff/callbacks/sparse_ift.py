"""Sparse Iso-FLOP Transformations (Saxena et al., ICML 2024) as a callback."""

from __future__ import annotations

from typing import Any, Literal

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torch.nn.utils import parametrize
from typing_extensions import override

from lit_eff import validation
from lit_eff.callbacks.masking import MaskingTechnique
from lit_eff.callbacks.technique import Technique
from lit_eff.seeding import generator, run_seed
from lit_eff.sparsity import find_targets
from lit_eff.sparsity.ift import DEFAULT_MLP, check_ift, ift_linears, sparse_ift, transformed

__all__ = ["SparseIFT"]


class SparseIFT(Technique):
    """Replaces the MLP layers by larger ones that, at ``sparsity``, cost the dense FLOPs: ``"wide"``
    (hidden width × 1/(1 − s)) or ``"parallel"`` (1/(1 − s) summed Linear branches). A sparsity
    callback placed *after* it in ``trainer.callbacks`` masks the new layers at the same sparsity
    (the paper trains them with RigL); the fit refuses to start unless one does
    (docs/techniques/sparse_ift.md).

    Example::

        trainer:
          callbacks+:
            - class_path: lit_eff.callbacks.SparseIFT
              init_args: {transform: wide, sparsity: 0.75}
            - class_path: lit_eff.callbacks.DynamicSparsity
              init_args: {sparsity: 0.75, method: rigl, include: ["*blocks.*.mlp.*"]}
    """

    def __init__(self, transform: Literal["wide", "parallel"] = "wide", sparsity: float = 0.5,
                 include: list[str] | None = None, exclude: list[str] | None = None) -> None:
        super().__init__()
        check_ift(transform, sparsity)
        self.transform, self.sparsity = transform, float(sparsity)
        self.include = validation.check_patterns("include", include)
        self.exclude = validation.check_patterns("exclude", exclude)
        self.layers: dict[str, nn.Module] = {}  # the new modules, by name
        self.sparse: dict[str, nn.Linear] = {}  # the Linear layers to mask at `sparsity`

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        found = transformed(pl_module)
        if found is not None:  # by an earlier stage, or a model returned by a ddp_spawn fit: adopt it
            kind, factor, layers = found
            if kind != self.transform or abs(factor * (1.0 - self.sparsity) - 1.0) > 0.02:
                raise ValueError(f"The model is already Sparse-IFT transformed ({kind} x{factor:g}), and "
                                 f"{self.describe(trainer)} asks for transform={self.transform!r} at sparsity "
                                 f"{self.sparsity:g} (x{1 / (1 - self.sparsity):g}): give it the model's settings "
                                 f"or an untransformed model")
            self.layers, self.sparse = layers, ift_linears(layers)
            return
        targets = find_targets(pl_module, include=list(DEFAULT_MLP) if self.include is None else self.include,
                               exclude=self.exclude)
        for name, layer in targets.items():
            if parametrize.is_parametrized(layer):
                owner = next((cb.describe(trainer) for cb in self.others(trainer, MaskingTechnique)
                              if layer in cb.targets.values()), "another callback")
                raise ValueError(f"{owner} already masks `{name}`, which {self.describe(trainer)} replaces: put "
                                 f"{self.name} before it in trainer.callbacks, so that the sparsity callback "
                                 f"masks the transformed layers")
        self.layers = sparse_ift(pl_module, self.transform, self.sparsity, self.include, self.exclude,
                                 generator_for=lambda name: generator(run_seed(), "sparse-ift", name))
        self.sparse = ift_linears(self.layers)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        maskers = self.others(trainer, MaskingTechnique)
        fix = (f"add DynamicSparsity(sparsity={self.sparsity:g}, include=['*blocks.*.mlp.*']) after "
               f"{self.name} in trainer.callbacks (configs/techniques/sparse_ift_{self.transform}.yaml)")
        density = 1.0 - self.sparsity
        for name, layer in self.sparse.items():
            owner = next((cb for cb in maskers if any(m is layer for m in cb.targets.values())), None)
            if owner is None:
                raise ValueError(f"{self.describe(trainer)} made `{name}` {1 / density:g}x larger; it costs the dense "
                                 f"FLOPs only when masked at sparsity {self.sparsity:g}, and no sparsity callback "
                                 f"masks it: {fix}")
            target = next(n for n, m in owner.targets.items() if m is layer)
            got = getattr(owner, "densities", {}).get(target)
            if got is None or abs(got - density) > 1.0 / layer.weight.numel() + 1e-9:
                shown = "a changing density" if got is None else f"density {got:.4g}"
                raise ValueError(f"{owner.describe(trainer)} masks `{name}` at {shown}, and {self.describe(trainer)} "
                                 f"keeps the dense FLOPs only at density {density:g} (sparsity {self.sparsity:g}): "
                                 f"give it sparsity={self.sparsity:g} with distribution='uniform' (DynamicSparsity or "
                                 f"StaticSparsity)")
            if getattr(owner, "release_step", None) is not None or getattr(owner, "release_fraction", None):
                rank_zero_warn(f"{owner.describe(trainer)} releases its masks during the run: from then on the "
                               f"layers {self.name} enlarged cost {1 / density:g}x the dense FLOPs")
        mine = {id(m) for m in self.sparse.values()}
        others = sorted(n for cb in maskers for n, m in cb.targets.items() if id(m) not in mine)
        if others:
            rank_zero_warn(f"{len(others)} masked layers ({', '.join(others[:4])}{', ...' if len(others) > 4 else ''}) "
                           f"are not ones {self.name} enlarged: the model computes fewer FLOPs than the dense one. "
                           f"Restrict the sparsity callback to the transformed layers (include=['*blocks.*.mlp.*'])")

    @override
    def technique_state(self) -> dict[str, Any]:
        return {"transform": self.transform, "sparsity": self.sparsity,
                "layers": {name: list(layer.weight.shape) for name, layer in self.sparse.items()}}

