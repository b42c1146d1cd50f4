"""Image classification with any timm model."""

from __future__ import annotations

import difflib
from typing import Any

import timm
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassStatScores

from lit_eff.continual.tasks import task_split_of
from lit_eff.models.naming import compile_agnostic_state_dict
from lit_eff.models.sharding import shard_model
from lit_eff.models.optim import adamw_warmup_cosine, check_optim_args
from lit_eff.models.weights import load_weights
from lit_eff.tokens.skip import restore_routers
from lit_eff.sparsity.ift import restore_structure
from lit_eff.runs.resume import check_resume_state, load_or_explain
from lit_eff.validation import check_fraction, check_int, stepping_batches


def create_timm_model(model_name: str, **kwargs: Any) -> torch.nn.Module:
    """``timm.create_model`` with a clear error (and close matches) for unknown names."""
    if not timm.is_model(model_name):
        close = difflib.get_close_matches(model_name, timm.list_models(), n=5, cutoff=0.5)
        hint = f" Close matches: {', '.join(close)}." if close else " See `timm.list_models()`."
        raise ValueError(f"Unknown timm model `model_name`={model_name!r}.{hint}")
    return timm.create_model(model_name, **kwargs)


class ImageClassifier(LightningModule):
    """A timm model (``model_name`` plus ``model_kwargs``), trained with cross-entropy.

    ``pretrained`` is off by default (no downloads). Optimizer: AdamW with warm-up and cosine
    decay per step; LightningCLI's ``--optimizer``/``--lr_scheduler`` replace it. Logs
    ``train/loss``, ``val/loss``, ``val/acc``, ``test/loss``, ``test/acc``; with a task-split datamodule
    (continual learning, :mod:`lit_eff.datamodules.continual`) also ``val/acc_task<t>`` per task and
    their mean ``val/acc_avg`` (likewise for ``test``).

    ``init_weights``: weights to start from (fine-tuning): a Lightning ``.ckpt`` of another run, a
    ``torch.save`` state dict (e.g. a timm model's) or a ``.safetensors`` file; key prefixes are
    matched, lit_eff masks hardened (a sparse run's pruned weights start at exactly 0).
    ``init_weights_skip``: globs of keys left at their initial values, e.g. ``["model.head.*"]``
    for a new head; without it every tensor must fit (:mod:`lit_eff.models.weights`).

    ``activation_checkpointing``: recompute each block's activations in backward instead of
    storing them (``set_grad_checkpointing``). Under Lightning's ``ModelParallelStrategy`` the
    model is sharded with FSDP2, one unit per block (:mod:`lit_eff.models.sharding`).

    Example (a ViT for 8x8 digits: 2x2 patches, average pooling)::

        model:
          class_path: lit_eff.models.ImageClassifier
          init_args:
            model_name: vit_tiny_patch16_224
            num_classes: 10
            in_chans: 1
            model_kwargs: {img_size: 8, patch_size: 2, embed_dim: 96, depth: 6, num_heads: 4, global_pool: avg}
    """

    def __init__(
        self,
        model_name: str = "vit_tiny_patch16_224",
        num_classes: int = 10,
        in_chans: int = 3,
        model_kwargs: dict[str, Any] | None = None,
        pretrained: bool = False,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup: float = 0.05,
        min_lr_factor: float = 0.0,
        label_smoothing: float = 0.0,
        init_weights: str | None = None,
        init_weights_skip: list[str] | None = None,
        activation_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        check_optim_args(lr, weight_decay, warmup)
        check_int("num_classes", num_classes, minimum=1)
        check_fraction("label_smoothing", label_smoothing, high_open=True)
        compile_agnostic_state_dict(self)  # the same checkpoint keys with a compiled `self.model`
        self.register_load_state_dict_pre_hook(restore_routers)  # Mixture-of-Depths routers in a state dict
        self.register_load_state_dict_pre_hook(restore_structure)  # Sparse-IFT's wider / parallel layers
        # a loaded checkpoint already holds the weights
        self.save_hyperparameters(ignore=["init_weights", "init_weights_skip"])
        self.model = create_timm_model(model_name, pretrained=pretrained, num_classes=num_classes,
                                       in_chans=in_chans, **(model_kwargs or {}))
        if activation_checkpointing:
            if not hasattr(self.model, "set_grad_checkpointing"):
                raise ValueError(f"Expected a timm model with `set_grad_checkpointing` for activation_checkpointing=True, "
                                 f"got {type(self.model).__name__}")
            self.model.set_grad_checkpointing(True)
        # metric objects: summed over every process's samples (DDP) before they are read
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        # per-class hits and counts, read per task when the datamodule splits classes into tasks
        self.val_class_stats = MulticlassStatScores(num_classes, average=None)
        self.test_class_stats = MulticlassStatScores(num_classes, average=None)
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()
        if init_weights is not None:
            load_weights(self, init_weights, skip=init_weights_skip)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        loss = F.cross_entropy(self(images).float(), labels, label_smoothing=self.hparams.label_smoothing)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=len(batch[0]))
        return loss

    def _eval_step(self, batch, stage: str) -> None:
        images, labels = batch
        logits = self(images).float()
        loss, acc = getattr(self, f"{stage}_loss"), getattr(self, f"{stage}_acc")
        loss.update(F.cross_entropy(logits, labels), weight=len(labels))
        acc.update(logits, labels)
        self.log(f"{stage}/loss", loss, prog_bar=stage == "val")
        self.log(f"{stage}/acc", acc, prog_bar=True)
        if task_split_of(self.trainer) is not None:
            self._update_class_stats(stage, logits, labels)

    @torch.compiler.disable  # eager under torch.compile (a graph break): torchmetrics' update does not trace
    def _update_class_stats(self, stage: str, logits: torch.Tensor, labels: torch.Tensor) -> None:
        getattr(self, f"{stage}_class_stats").update(logits, labels)

    def _log_tasks(self, stage: str) -> None:
        """`<stage>/acc_task<t>` of every task with samples, and `<stage>/acc_avg` their mean
        (the average accuracy of class-incremental learning), with a task-split datamodule."""
        split, stats = task_split_of(self.trainer), getattr(self, f"{stage}_class_stats")
        if split is None or not stats.update_called:
            return
        per_class = stats.compute()[:split.num_classes]  # [class, (tp, fp, tn, fn, support)], over processes
        stats.reset()
        hits = per_class[:, 0].reshape(split.num_tasks, -1).sum(1).float()
        counts = per_class[:, 4].reshape(split.num_tasks, -1).sum(1).float()
        seen = (counts > 0).nonzero().flatten().tolist()
        for task in seen:
            self.log(f"{stage}/acc_task{task}", hits[task] / counts[task], sync_dist=True)
        if seen:
            self.log(f"{stage}/acc_avg", (hits[seen] / counts[seen]).mean(), prog_bar=True, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        self._log_tasks("val")

    def on_test_epoch_end(self) -> None:
        self._log_tasks("test")

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def predict_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self(batch[0]).argmax(-1)

    def setup(self, stage: str) -> None:
        """The data must fit the model's head and input channels (checked before the model summary)."""
        data = self.trainer.datamodule
        for name, wanted in (("num_classes", self.hparams.num_classes), ("in_chans", self.hparams.in_chans)):
            given = getattr(data, name, None)
            if isinstance(given, int) and not isinstance(given, bool) and (
                    given > wanted if name == "num_classes" else given != wanted):
                what = "classes, more than" if name == "num_classes" else "image channels, but"
                raise ValueError(f"{type(data).__name__} has {given} {what} the model's `{name}`={wanted}; "
                                 f"set --model.init_args.{name} {given}")

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        check_resume_state(self, checkpoint)  # another technique stack: say so, not lists of keys

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return load_or_explain(self, super().load_state_dict, state_dict, strict, assign)

    def configure_model(self) -> None:
        shard_model(self, self.model)  # FSDP2 under ModelParallelStrategy; nothing otherwise

    def configure_optimizers(self):
        h = self.hparams
        return adamw_warmup_cosine(self.model, stepping_batches(self.trainer), h.lr, h.weight_decay,
                                   h.warmup, min_lr_factor=h.min_lr_factor)
