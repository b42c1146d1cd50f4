"""What sparsity techniques do to the weights, logged under ``sparsity/``."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from typing_extensions import override

from lit_eff import sparsity


class SparsityMonitor(Callback):
    """Logs the sparsity of every masked layer (any lit_eff sparsity technique) every
    ``log_every_n_steps`` optimizer steps:

    - ``sparsity/global``: fraction of zeros in the weights forward uses, over all masked layers
      (with mask decay, pruned weights are scaled, not zero, until β reaches 0);
    - ``sparsity/mask_global``: fraction of positions the masks prune;
    - ``sparsity/flip_rate``: fraction of mask positions that changed since the last log (high for
      SR-STE early on, zero for static masks);
    - ``sparsity/layers/<layer>``: each layer's fraction of zeros (``per_layer``);
    - an image of the first masked layer's mask (white = kept) every ``image_every_n_steps`` steps,
      with a TensorBoard logger.

    The masks seen at the last log are part of the callback's state, so flip rates continue
    exactly across a resume.

    Runs on: ``on_train_batch_end`` (after an optimizer step).

    Example::

        trainer:
          callbacks+:
            - class_path: lit_eff.callbacks.SparsityMonitor
              init_args: {log_every_n_steps: 50}
    """

    def __init__(self, log_every_n_steps: int = 50, per_layer: bool = True, image_every_n_steps: int = 500) -> None:
        for name, value in (("log_every_n_steps", log_every_n_steps), ("image_every_n_steps", image_every_n_steps)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Expected `{name}` to be an integer >= 1, got {name}={value!r}")
        self.log_every_n_steps = log_every_n_steps
        self.per_layer = per_layer
        self.image_every_n_steps = image_every_n_steps
        self.last: dict[str, float] = {}
        self._previous: dict[str, torch.Tensor] = {}
        self._last_step = -1

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._last_step = trainer.global_step

    def measure(self, pl_module: LightningModule) -> dict[str, float]:
        """The metrics for the model's current masks and weights (also updates the flip baseline)."""
        zeros = masked = total = flips = 0
        metrics: dict[str, float] = {}
        with torch.no_grad():
            for name, module in sparsity.masked_modules(pl_module).items():
                weight = module.weight  # the effective weight forward uses
                mask = sparsity.get_mask(module)
                layer_zeros = int((weight == 0).sum())
                zeros += layer_zeros
                masked += int((~mask).sum())
                total += weight.numel()
                previous = self._previous.get(name)
                if previous is not None and previous.shape == mask.shape:
                    flips += int((previous.to(mask.device) != mask).sum())
                self._previous[name] = mask.detach().to("cpu", copy=True)
                if self.per_layer:
                    metrics[f"sparsity/layers/{name}"] = layer_zeros / weight.numel()
        if total:
            metrics.update({"sparsity/global": zeros / total, "sparsity/mask_global": masked / total,
                            "sparsity/flip_rate": flips / total})
        return metrics

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step <= self._last_step:
            return
        self._last_step = trainer.global_step
        if trainer.global_step % self.log_every_n_steps:
            return
        self.last = self.measure(pl_module)
        for name, value in self.last.items():
            pl_module.log(name, value, on_step=True, on_epoch=False, batch_size=1)
        if trainer.global_step % self.image_every_n_steps == 0:
            self._log_image(trainer, pl_module)

    def _log_image(self, trainer: Trainer, pl_module: LightningModule) -> None:
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        layers = sparsity.masked_modules(pl_module)
        if not loggers or not layers or not trainer.is_global_zero:
            return
        name, module = next(iter(layers.items()))
        mask = sparsity.get_mask(module).detach().float().flatten(1)[:128, :128].cpu()
        for logger in loggers:
            logger.experiment.add_image(f"sparsity/mask/{name}", mask[None], trainer.global_step)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"previous": dict(self._previous), "last": dict(self.last)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._previous = dict(state_dict.get("previous", {}))
        self.last = dict(state_dict.get("last", {}))
