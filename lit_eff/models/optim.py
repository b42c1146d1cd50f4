"""The kit's default optimizer: AdamW (no decay on norms, biases and embeddings-like 1-D
parameters) with linear warm-up then cosine decay, stepped every optimizer step."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from lit_eff.schedules import warmup_cosine
from lit_eff.validation import check_number


def check_optim_args(lr: float, weight_decay: float, warmup: float) -> None:
    """``lr`` > 0, ``weight_decay`` >= 0, ``warmup`` >= 0 (a step count, or a fraction of training if < 1)."""
    check_number("lr", lr, 0, low_open=True)
    check_number("weight_decay", weight_decay, 0)
    check_number("warmup", warmup, 0)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay, seen = [], [], set()
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        skip = param.ndim < 2 or name.endswith(("pos_embed", "cls_token", "reg_token")) or ".wpe." in f".{name}"
        (no_decay if skip else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw_warmup_cosine(
    model: nn.Module,
    total_steps: int,
    lr: float,
    weight_decay: float,
    warmup: float,
    betas: tuple[float, float] = (0.9, 0.999),
    min_lr_factor: float = 0.0,
):
    """``configure_optimizers`` return value: AdamW plus a per-step warm-up/cosine LambdaLR.
    ``warmup`` below 1 is a fraction of ``total_steps``."""
    warmup_steps = int(warmup * total_steps) if warmup < 1 else int(warmup)
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas)
    schedule = partial(warmup_cosine, warmup_steps=max(1, warmup_steps), total_steps=total_steps,
                       min_factor=min_lr_factor)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
