"""What sparsity techniques do to the weights, logged under ``sparsity/``."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from typing_extensions import override

from lit_eff import sparsity, validation
from lit_eff.callbacks.nm_sparsity import NMSparsity
from lit_eff.callbacks.technique import Technique


class SparsityMonitor(Technique):
    """Logs the sparsity of every masked layer (any lit_eff sparsity technique) under ``sparsity/``, and with
    a TensorBoard logger a density chart and a mask pattern (docs/techniques/sparsity_monitor.md).

    Args:
        log_every_n_steps: optimizer steps between logs.
        per_layer: also log each layer's sparsity (``sparsity/layers/<layer>``).
        image_every_n_steps: optimizer steps between pictures (TensorBoard only).

    Example::

        trainer:
          callbacks+:
            - class_path: lit_eff.callbacks.SparsityMonitor
              init_args: {log_every_n_steps: 50}
    """

    def __init__(self, log_every_n_steps: int = 50, per_layer: bool = True, image_every_n_steps: int = 500) -> None:
        super().__init__()
        validation.check_int("log_every_n_steps", log_every_n_steps, minimum=1)
        validation.check_int("image_every_n_steps", image_every_n_steps, minimum=1)
        self.log_every_n_steps, self.image_every_n_steps = log_every_n_steps, image_every_n_steps
        self.per_layer = per_layer
        self.last: dict[str, float] = {}
        self.densities: dict[str, float] = {}  # per layer, at the last log: nonzero fraction of what forward uses
        self._previous: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def measure(self, pl_module: LightningModule) -> dict[str, float]:
        """The metrics for the model's current masks and weights (also updates the flip baseline)."""
        layers = sparsity.masked_modules(pl_module)
        if not layers:
            return {}
        counts, sizes = [], []
        for name, module in layers.items():
            weight = sparsity.effective_weight(module)  # what forward uses (gathered under FSDP2)
            mask = sparsity.get_mask(module)
            previous = self._previous.get(name, mask).to(mask.device)  # first measure: no flips
            flips = (previous != mask).sum() if previous.shape == mask.shape else mask.new_zeros((), dtype=torch.long)
            counts.append(torch.stack([(weight == 0).sum(), (~mask).sum(), flips]).cpu())
            sizes.append(weight.numel())
            self._previous[name] = mask.detach().to("cpu", copy=True)
        zeros, pruned, flips = torch.stack(counts).T.tolist()
        total = sum(sizes)
        self.densities = {name: 1.0 - z / size for name, z, size in zip(layers, zeros, sizes)}
        metrics = {"sparsity/global": sum(zeros) / total, "sparsity/mask_global": sum(pruned) / total,
                   "sparsity/flip_rate": sum(flips) / total}
        if self.per_layer:
            metrics.update({f"sparsity/layers/{name}": z / size for name, z, size in zip(layers, zeros, sizes)})
        return metrics

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.mark_step(trainer.global_step)

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self.optimizer_stepped(trainer) or trainer.global_step % self.log_every_n_steps:
            return
        self.last = self.measure(pl_module)
        for name, value in self.last.items():
            pl_module.log(name, value, on_step=True, on_epoch=False, batch_size=1)
        if trainer.global_step % self.image_every_n_steps == 0:
            self._log_images(trainer, pl_module)

    def _log_images(self, trainer: Trainer, pl_module: LightningModule) -> None:
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        layers = sparsity.masked_modules(pl_module)
        if not loggers or not layers or not trainer.is_global_zero:
            return
        name, module = next(iter(layers.items()))
        figures = {"sparsity/density_by_layer": sparsity.density_chart(self.densities),
                   f"sparsity/pattern/{name}": sparsity.pattern_crop(sparsity.get_mask(module), name,
                                                                     self._group_size(trainer, module))}
        for logger in loggers:
            for tag, figure in figures.items():
                logger.experiment.add_figure(tag, figure, trainer.global_step, close=False)

    def _group_size(self, trainer: Trainer, module: torch.nn.Module) -> int | None:
        """``m`` of the N:M frame in force, if an N:M technique masks ``module``."""
        for cb in self.others(trainer, NMSparsity):
            if any(t is module for t in cb.targets.values()):
                return cb.frame(trainer.global_step)[1]
        return None

    @override
    def technique_state(self) -> dict[str, Any]:
        return {"previous": dict(self._previous), "last": dict(self.last)}

    @override
    def load_technique_state(self, state: dict[str, Any]) -> None:
        self._previous = dict(state.get("previous", {}))
        self.last = dict(state.get("last", {}))
