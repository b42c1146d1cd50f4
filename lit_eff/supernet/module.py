"""SupernetModule: trains a weight-shared elastic ViT or GPT, several subnets per optimizer step.

Each step the sampler picks subnets (the sandwich rule by default: largest, smallest, ``k``
random). The largest learns from labels; the others distil in place from its detached logits
(KL at ``temperature``, or AlphaNet's adaptive alpha-divergence), mixed with the label loss:
``distill_weight * KD + (1 - distill_weight) * CE``. The weighted losses are summed into one
backward, so DDP makes one gradient all-reduce per step and needs no ``find_unused_parameters``;
every rank trains the same subnets (drawn from the run seed and the step). Validation logs
``supernet/val_acc@<MFLOPs>`` (vision) or ``supernet/val_loss@<MFLOPs>`` for a fixed set of
subnets. Details: docs/techniques/supernet.md.

Example::

    model:
      class_path: lit_eff.supernet.SupernetModule
      init_args:
        arch: vit
        arch_kwargs: {img_size: 8, patch_size: 2, in_chans: 1, num_classes: 10}
        space: {embed_dim: [32, 48, 64], depth: [2, 3, 4], num_heads: [2, 3, 4], mlp_ratio: [1.0, 1.5, 2.0]}
        sampler: {class_path: lit_eff.supernet.Sandwich, init_args: {k: 2}}
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, ModelParallelStrategy, SingleDeviceStrategy
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from lit_eff.callbacks.flops_monitor import Parts
from lit_eff.callbacks.technique import logs_this_step
from lit_eff.models.naming import compile_agnostic_state_dict
from lit_eff.models.optim import adamw_warmup_cosine, check_optim_args
from lit_eff.models.sharding import shard_model
from lit_eff.seeding import generator
from lit_eff.supernet.elastic import ElasticGPT, ElasticViT, _Elastic
from lit_eff.supernet.export import export_subnet
from lit_eff.supernet.flops import SubnetFlops
from lit_eff.supernet.losses import kd_alpha, kd_kl
from lit_eff.supernet.plot import line_figure
from lit_eff.supernet.reorganize import reorganize_middle_weights
from lit_eff.supernet.samplers import Draw, PerformanceAware, Sandwich, SubnetSampler
from lit_eff.supernet.space import SearchSpace, SubnetConfig
from lit_eff.validation import check_choice, check_fraction, check_int, check_number, stepping_batches

DEFAULT_SPACE = {"embed_dim": [32, 48, 64], "depth": [2, 3, 4], "num_heads": [2, 3, 4], "mlp_ratio": [1.0, 1.5, 2.0]}


def fixed_subnets(space: SearchSpace, flops: SubnetFlops, n: int) -> list[SubnetConfig]:
    """``n`` subnets spread over the FLOPs range: min, max and FLOPs quantiles of a fixed pool
    (seeded independently of the run, so every run reports the same subnets), ascending FLOPs."""
    gen = generator("supernet-val-subnets")
    pool = sorted({space.sample(gen) for _ in range(256)} | {space.min(), space.max()}, key=flops)
    chosen = {space.min(): None, space.max(): None}
    for i in range(1, n - 1):
        cfg = pool[round(i * (len(pool) - 1) / (n - 1))]
        if all(flops(cfg) != flops(c) for c in chosen):
            chosen[cfg] = None
    return sorted(chosen, key=flops)[:n] if n >= 2 else [space.max()]


class SupernetModule(LightningModule):
    def __init__(
        self,
        arch: Literal["vit", "gpt"] = "vit",
        space: dict[str, Any] | None = None,
        arch_kwargs: dict[str, Any] | None = None,
        sampler: SubnetSampler | None = None,
        distill: Literal["kl", "alpha", "none"] = "kl",
        temperature: float = 1.0,
        distill_weight: float = 0.5,
        alpha_min: float = -1.0,
        alpha_max: float = 1.0,
        alpha_clip: float = 5.0,
        val_subnets: int = 5,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup: float = 0.05,
        min_lr_factor: float = 0.0,
        label_smoothing: float = 0.0,
        activation_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        check_choice("arch", arch, ("vit", "gpt"))
        check_choice("distill", distill, ("kl", "alpha", "none"))
        check_optim_args(lr, weight_decay, warmup)
        check_number("temperature", temperature, 0.0, low_open=True)
        check_fraction("distill_weight", distill_weight)
        check_number("alpha_min", alpha_min)
        check_number("alpha_max", alpha_max, alpha_min)
        check_number("alpha_clip", alpha_clip, 0.0, low_open=True)
        check_int("val_subnets", val_subnets, 1)
        check_fraction("label_smoothing", label_smoothing, high_open=True)
        if not isinstance(activation_checkpointing, bool):
            raise ValueError(f"Expected `activation_checkpointing` to be true or false, "
                             f"got activation_checkpointing={activation_checkpointing!r}")
        if sampler is not None and not isinstance(sampler, SubnetSampler):
            raise ValueError(f"Expected `sampler` to be a lit_eff.supernet SubnetSampler, got {type(sampler).__name__}")
        self.save_hyperparameters(ignore=["sampler"])
        compile_agnostic_state_dict(self)  # the same checkpoint keys with a compiled `self.model`
        self.space = SearchSpace.from_dict(space or DEFAULT_SPACE)
        cls = ElasticViT if arch == "vit" else ElasticGPT
        self.model = cls(self.space, **(arch_kwargs or {}))
        self.model.set_grad_checkpointing(activation_checkpointing)
        self.vision = arch == "vit"
        self.sampler = sampler if sampler is not None else Sandwich(k=2)
        self.flops = SubnetFlops(self.model)
        self.val_configs = fixed_subnets(self.space, self.flops, val_subnets)
        n = len(self.val_configs)
        self.eval_loss = nn.ModuleDict({s: nn.ModuleList(MeanMetric() for _ in range(n)) for s in ("val", "test")})
        if self.vision:
            classes = self.model.num_classes
            self.eval_acc = nn.ModuleDict({s: nn.ModuleList(MulticlassAccuracy(classes, average="micro")
                                                            for _ in range(n)) for s in ("val", "test")})

    # ------------------------------------------------------------------ model
    @property
    def elastic(self) -> _Elastic:
        """The elastic model, also when ``self.model`` was replaced by ``torch.compile(self.model)``."""
        return getattr(self.model, "_orig_mod", self.model)

    def forward(self, x: torch.Tensor, subnet: SubnetConfig | None = None) -> torch.Tensor:
        return self.model(x, subnet)

    def subnet_flops(self, cfg: SubnetConfig) -> int:
        """Forward FLOPs of one sample through ``cfg``."""
        return self.flops(cfg)

    def export(self, cfg: SubnetConfig) -> nn.Module:
        """``cfg`` as a plain model (PlainViT or the kit's GPT) with sliced weights."""
        return export_subnet(self.elastic, cfg)

    def configure_model(self) -> None:
        shard_model(self, self.model)  # FSDP2 under ModelParallelStrategy: one unit per block

    def _ce(self, logits: torch.Tensor, labels: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                               label_smoothing=smoothing)

    def _student_loss(self, logits: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.hparams
        if h.distill == "alpha":
            kd = kd_alpha(logits, teacher, h.alpha_min, h.alpha_max, h.alpha_clip)
        else:
            kd = kd_kl(logits, teacher, h.temperature)
        if h.distill_weight == 1.0:
            return kd
        return h.distill_weight * kd + (1.0 - h.distill_weight) * self._ce(logits, labels, h.label_smoothing)

    # ------------------------------------------------------------------ training
    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        from lit_eff.callbacks.masking import MaskingTechnique

        masking = [type(cb).__name__ for cb in self.trainer.callbacks if isinstance(cb, MaskingTechnique)]
        if masking:
            raise ValueError(
                f"SupernetModule does not take weight-sparsity callbacks, got {', '.join(masking)}: every subnet "
                f"slices the shared weights, and masks over whole weight matrices are not carried into the subnets' "
                f"FLOPs accounting, `lit-eff search` or export. Remove {', '.join(masking)} from trainer.callbacks")
        strategy = self.trainer.strategy
        supported = isinstance(strategy, SingleDeviceStrategy | DDPStrategy | ModelParallelStrategy)
        if not supported or isinstance(strategy, DeepSpeedStrategy):
            raise ValueError(f"SupernetModule runs on a single device, DDP or FSDP2 (ModelParallelStrategy), got "
                             f"strategy {type(strategy).__name__}")

    def on_train_start(self) -> None:
        self.sampler.bind(self.space, self.flops, stepping_batches(self.trainer))
        self._reorganized_at: int | None = None

    def flops_key(self) -> Hashable:
        """The subnets the next training step runs (for FlopsMonitor, read before the step), as
        parts it counts from the meta-device twin: a new draw of subnets is never traced."""
        if getattr(self.sampler, "space", None) is None:  # not bound: no training step coming
            return None
        return Parts(tuple(draw.config for draw in self.sampler.sample(self.global_step)), self._training_flops)

    def _training_flops(self, cfg: SubnetConfig, batch: Any) -> int:
        return self.flops.training(cfg, batch[0])

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        step = self.sampler.reorganize_step()
        if step == self.global_step and self._reorganized_at != step:  # once, before the step's first micro-batch
            reorganize_middle_weights(self.elastic, self.trainer.optimizers[0] if self.trainer.optimizers else None)
            self._reorganized_at = step

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return self._train_subnets(x, y)

    @torch.compiler.disable(recursive=False)  # Python over the step's subnets; their forwards compile
    def _train_subnets(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        draws, distill = self._plan()
        total, teacher, scores = 0.0, None, []
        for draw in draws:
            logits = self.model(x, draw.config)
            if draw.role == "max":
                loss = self._ce(logits, y, self.hparams.label_smoothing)
                teacher = logits.detach()
            elif teacher is not None and distill:
                loss = self._student_loss(logits, teacher, y)
            else:
                loss = self._ce(logits, y, self.hparams.label_smoothing)
            total = total + draw.weight * loss
            scores.append(loss.detach() if draw.role == "max" else self._ce(logits.detach(), y))
        return self._finish_step(total, draws, scores, teacher is None, len(x))

    @torch.compiler.disable
    def _plan(self) -> tuple[list[Draw], bool]:
        return self.sampler.sample(self.global_step), self.hparams.distill != "none"

    @torch.compiler.disable
    def _finish_step(self, total: torch.Tensor, draws: list[Draw], scores: list[torch.Tensor], no_teacher: bool,
                     batch_size: int) -> torch.Tensor:
        trainer = self._attached_trainer()
        if no_teacher and not self._sharded():
            # DDP: give every parameter a (zero) gradient, as the largest subnet would
            total = total + 0.0 * sum(p.reshape(-1)[0] for p in self.model.parameters())
        if isinstance(self.sampler, PerformanceAware):
            losses = torch.stack(scores).float()
            if trainer is not None:
                losses = trainer.strategy.reduce(losses, reduce_op="mean")
            self.sampler.observe(self.global_step, draws, losses.tolist())
        if trainer is None:  # a bare call (benchmarks, tests)
            return total
        self.log("train/loss", total.detach(), prog_bar=True, batch_size=batch_size)
        if logs_this_step(trainer):
            if draws[0].role == "max":
                self.log("supernet/train_loss_max", scores[0], batch_size=batch_size)
            self.log("supernet/subnets_per_step", float(len(draws)), batch_size=batch_size)
            self.log("supernet/train_flops_per_sample", float(sum(self.flops(d.config) for d in draws)),
                     batch_size=batch_size)
            if hasattr(self.sampler, "bucket"):
                self.log("supernet/bucket", float(self.sampler.bucket), batch_size=batch_size)
        return total

    def _attached_trainer(self):
        try:
            return self.trainer
        except RuntimeError:  # not attached to a Trainer
            return None

    def _sharded(self) -> bool:
        trainer = self._attached_trainer()
        return trainer is not None and isinstance(trainer.strategy, ModelParallelStrategy)

    def on_before_optimizer_step(self, optimizer) -> None:
        if self._sharded():  # FSDP2: the zero gradients DDP gets from the (zero) touch above
            for p in self.model.parameters():
                if p.grad is None and p.requires_grad:
                    p.grad = torch.zeros_like(p)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["supernet_sampler"] = {"class": type(self.sampler).__name__, "state": self.sampler.state_dict()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("supernet_sampler")
        if saved and saved["class"] == type(self.sampler).__name__:
            self.sampler.load_state_dict(saved["state"])

    # ------------------------------------------------------------------ evaluation
    @torch.compiler.disable(recursive=False)  # Python over the fixed subnets; their forwards compile
    def _eval_step(self, x: torch.Tensor, y: torch.Tensor, stage: str) -> None:
        for i, cfg in enumerate(self.val_configs):
            self._update_metrics(stage, i, self.model(x, cfg), y)

    @torch.compiler.disable
    def _update_metrics(self, stage: str, i: int, logits: torch.Tensor, y: torch.Tensor) -> None:
        logits = logits.float()
        self.eval_loss[stage][i].update(self._ce(logits, y), weight=y.numel())
        if self.vision:
            self.eval_acc[stage][i].update(logits, y)

    def _eval_epoch_end(self, stage: str) -> None:
        points = []
        for i, cfg in enumerate(self.val_configs):
            mflops = self.flops(cfg) / 1e6
            loss = self.eval_loss[stage][i].compute()
            self.eval_loss[stage][i].reset()
            self.log(f"supernet/{stage}_loss@{mflops:.3g}", loss)
            value = loss
            if self.vision:
                value = self.eval_acc[stage][i].compute()
                self.eval_acc[stage][i].reset()
                self.log(f"supernet/{stage}_acc@{mflops:.3g}", value)
            points.append((mflops, float(value)))
        metric = "acc" if self.vision else "loss"
        self.log(f"{stage}/{metric}", points[-1][1], prog_bar=True)
        self.log(f"{stage}/{metric}_min", points[0][1])
        if not self.vision:
            self.log(f"{stage}/bpb", points[-1][1] / math.log(2))
            self.log(f"{stage}/bpb_min", points[0][1] / math.log(2))
        experiment = getattr(self.logger, "experiment", None)
        if self.trainer.is_global_zero and hasattr(experiment, "add_figure"):
            fig = line_figure(points, "MFLOPs per sample (forward)", f"{stage} {metric}")
            experiment.add_figure(f"supernet/{stage}_{metric}_vs_flops", fig, self.global_step, close=False)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(*batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(*batch, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def configure_optimizers(self):
        h = self.hparams
        betas = (0.9, 0.999) if self.vision else (0.9, 0.95)
        return adamw_warmup_cosine(self.model, stepping_batches(self.trainer), h.lr, h.weight_decay,
                                   h.warmup, betas=betas, min_lr_factor=h.min_lr_factor)
