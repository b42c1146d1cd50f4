"""SupernetModule: trains a weight-shared elastic ViT or GPT, several subnets per optimizer step.

Each step the sampler picks subnets (the sandwich rule by default: largest, smallest, ``k``
random). The largest learns from labels; the others distil in place from its detached logits
(KL at ``temperature``, or AlphaNet's adaptive alpha-divergence), mixed with the label loss:
``distill_weight * KD + (1 - distill_weight) * CE``. ``distill_weight: 1.0`` is pure in-place
distillation (AttentiveNAS); trained from scratch on digits it stalled the largest subnet near
chance (docs/techniques/supernet.md), so the default keeps half the label loss. Their weighted losses are summed
into ONE backward, so under DDP there is one gradient all-reduce per step and the largest
subnet gives every parameter a gradient (no ``find_unused_parameters``). Every rank trains the
same subnets: the sampler seeds its decisions from (run seed, global step).

Validation evaluates a fixed set of subnets spread over the FLOPs range and logs
``supernet/val_acc@<MFLOPs>`` (vision) / ``supernet/val_loss@<MFLOPs>``, ``val/acc`` and
``val/loss`` of the largest, and an accuracy-vs-FLOPs figure to TensorBoard.

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
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from lit_eff.callbacks._checks import check_choice, is_int
from lit_eff.models.optim import adamw_warmup_cosine, check_optim_args
from lit_eff.seeding import generator
from lit_eff.supernet.elastic import ElasticGPT, ElasticViT
from lit_eff.supernet.export import export_subnet
from lit_eff.supernet.flops import SubnetFlops
from lit_eff.supernet.losses import kd_alpha, kd_kl
from lit_eff.supernet.reorganize import reorganize_middle_weights
from lit_eff.supernet.samplers import PerformanceAware, Sandwich, SubnetSampler
from lit_eff.supernet.space import SearchSpace, SubnetConfig

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
    ) -> None:
        super().__init__()
        check_choice("arch", arch, ("vit", "gpt"))
        check_choice("distill", distill, ("kl", "alpha", "none"))
        check_optim_args(lr, weight_decay, warmup)
        if temperature <= 0:
            raise ValueError(f"Expected `temperature` > 0, got temperature={temperature}")
        if not 0.0 <= distill_weight <= 1.0:
            raise ValueError(f"Expected `distill_weight` in [0, 1], got distill_weight={distill_weight}")
        if not alpha_min <= alpha_max:
            raise ValueError(f"Expected `alpha_min` <= `alpha_max`, got alpha_min={alpha_min}, alpha_max={alpha_max}")
        if not is_int(val_subnets) or val_subnets < 1:
            raise ValueError(f"Expected `val_subnets` to be an int >= 1, got val_subnets={val_subnets!r}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"Expected `label_smoothing` in [0, 1), got label_smoothing={label_smoothing}")
        if sampler is not None and not isinstance(sampler, SubnetSampler):
            raise ValueError(f"Expected `sampler` to be a lit_eff.supernet SubnetSampler, got {type(sampler).__name__}")
        self.save_hyperparameters(ignore=["sampler"])
        self.space = SearchSpace.from_dict(space or DEFAULT_SPACE)
        cls = ElasticViT if arch == "vit" else ElasticGPT
        self.model = cls(self.space, **(arch_kwargs or {}))
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
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def subnet_flops(self, cfg: SubnetConfig) -> int:
        """Forward FLOPs of one sample through ``cfg``."""
        return self.flops(cfg)

    def export(self, cfg: SubnetConfig) -> nn.Module:
        """``cfg`` as a plain model (PlainViT or the kit's GPT) with sliced weights."""
        return export_subnet(self.model, cfg)

    def _ce(self, logits: torch.Tensor, labels: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                               label_smoothing=smoothing)

    def _distill(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        h = self.hparams
        if h.distill == "alpha":
            return kd_alpha(student, teacher, h.alpha_min, h.alpha_max, h.alpha_clip)
        return kd_kl(student, teacher, h.temperature)

    # ------------------------------------------------------------------ training
    def on_train_start(self) -> None:
        self.sampler.bind(self.space, self.flops, self.trainer.estimated_stepping_batches)
        self._reorganized_at: int | None = None

    def setup(self, stage: str) -> None:
        strategy = self.trainer.strategy
        unsharded = isinstance(strategy, SingleDeviceStrategy | DDPStrategy) and not isinstance(
            strategy, DeepSpeedStrategy)
        if stage == "fit" and getattr(self.sampler, "reorganize", False) and not unsharded:
            raise ValueError(f"DelayedShrinking(reorganize=True) permutes whole weight matrices, which needs every "
                             f"parameter unsharded on each rank; got strategy {type(strategy).__name__}. "
                             f"Use a single device or DDP, or set reorganize: false")

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        step = self.sampler.reorganize_step()
        if step == self.global_step and self._reorganized_at != step:  # once, before the step's first micro-batch
            reorganize_middle_weights(self.model, self.trainer.optimizers[0] if self.trainer.optimizers else None)
            self._reorganized_at = step

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        draws = self.sampler.sample(self.global_step)
        total, teacher, ce = 0.0, None, []
        for draw in draws:
            self.model.subnet = draw.config
            logits = self.model(x)
            if draw.role == "max":
                loss = self._ce(logits, y, self.hparams.label_smoothing)
                teacher = logits.detach()
                self.log("supernet/train_loss_max", loss.detach(), batch_size=len(x))
            elif teacher is not None and self.hparams.distill != "none":
                w = self.hparams.distill_weight
                loss = w * self._distill(logits, teacher)
                if w < 1.0:
                    loss = loss + (1.0 - w) * self._ce(logits, y, self.hparams.label_smoothing)
            else:
                loss = self._ce(logits, y, self.hparams.label_smoothing)
            total = total + draw.weight * loss
            ce.append(self._ce(logits.detach(), y) if draw.role != "max" else loss.detach())
        if teacher is None:  # no largest subnet this step: give every parameter a (zero) gradient for DDP
            total = total + 0.0 * sum(p.reshape(-1)[0] for p in self.model.parameters())
        self.model.subnet = self.space.max()
        if isinstance(self.sampler, PerformanceAware):
            losses = self.trainer.strategy.reduce(torch.stack(ce).float(), reduce_op="mean")
            self.sampler.observe(self.global_step, draws, losses.tolist())
        self.log("train/loss", total.detach(), prog_bar=True, batch_size=len(x))
        self.log("supernet/subnets_per_step", float(len(draws)), batch_size=len(x))
        self.log("supernet/train_flops_per_sample", float(sum(self.flops(d.config) for d in draws)), batch_size=len(x))
        if hasattr(self.sampler, "bucket"):
            self.log("supernet/bucket", float(self.sampler.bucket), batch_size=len(x))
        return total

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["supernet_sampler"] = {"class": type(self.sampler).__name__, "state": self.sampler.state_dict()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("supernet_sampler")
        if saved and saved["class"] == type(self.sampler).__name__:
            self.sampler.load_state_dict(saved["state"])

    # ------------------------------------------------------------------ evaluation
    def _eval_step(self, batch, stage: str) -> None:
        x, y = batch
        for i, cfg in enumerate(self.val_configs):
            self.model.subnet = cfg
            logits = self.model(x).float()
            self.eval_loss[stage][i].update(self._ce(logits, y), weight=y.numel())
            if self.vision:
                self.eval_acc[stage][i].update(logits, y)
        self.model.subnet = self.space.max()

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
        self._log_figure(stage, metric, points)

    def _log_figure(self, stage: str, metric: str, points: list[tuple[float, float]]) -> None:
        experiment = getattr(self.logger, "experiment", None)
        if not self.trainer.is_global_zero or not hasattr(experiment, "add_figure"):
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(4, 3))
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-")
        ax.set_xlabel("MFLOPs per sample (forward)")
        ax.set_ylabel(f"{stage} {metric}")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        experiment.add_figure(f"supernet/{stage}_{metric}_vs_flops", fig, self.global_step)
        plt.close(fig)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def configure_optimizers(self):
        h = self.hparams
        betas = (0.9, 0.999) if self.vision else (0.9, 0.95)
        return adamw_warmup_cosine(self.model, self.trainer.estimated_stepping_batches, h.lr, h.weight_decay,
                                   h.warmup, betas=betas, min_lr_factor=h.min_lr_factor)
