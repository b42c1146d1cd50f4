"""Tiny teachers saved to files, for the distillation tests."""

from __future__ import annotations

import os
import tempfile
from typing import Any

import torch

from lit_eff.models import CausalLM, ImageClassifier
from tests.helpers import TINY_VIT


def vit(**model_kwargs: Any) -> ImageClassifier:
    """The tests' tiny ViT, with ``model_kwargs`` changed (e.g. ``embed_dim=48``)."""
    return ImageClassifier("vit_tiny_patch16_224", num_classes=10, in_chans=1,
                           model_kwargs={**TINY_VIT, **model_kwargs})


def gpt(**kwargs: Any) -> CausalLM:
    """The tests' tiny GPT, with ``kwargs`` changed (e.g. ``n_layer=3``)."""
    return CausalLM(**{"block_size": 32, "n_layer": 2, "n_head": 2, "n_embd": 32, **kwargs})


def save_kit_teacher(folder, family: str = "vit", seed: int = 1, name: str = "teacher.ckpt", **kwargs: Any) -> str:
    """A kit checkpoint (``state_dict`` and ``hyper_parameters``, as Lightning writes them) of a
    tiny ViT or GPT initialised from ``seed``, with changed arguments ``kwargs``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = vit(**kwargs) if family == "vit" else gpt(**kwargs)
    path = os.path.join(str(folder), name)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return path


def load_kit_network(path: str, family: str = "vit") -> torch.nn.Module:
    """The network saved by :func:`save_kit_teacher`, rebuilt by hand (to compute with)."""
    checkpoint = torch.load(path, weights_only=False)
    cls = ImageClassifier if family == "vit" else CausalLM
    module = cls(**{k: v for k, v in checkpoint["hyper_parameters"].items() if not k.startswith("_")})
    module.load_state_dict(checkpoint["state_dict"])
    return module.model.eval()


def contract_teacher(family: str, **kwargs: Any) -> str:
    """A tiny kit teacher (seed 1) for the contract table, written when the table is imported at a
    fixed path, so every process of a distributed run (each imports the table) names the same
    file with the same content (written to a private name, then renamed into place)."""
    folder = os.path.join(tempfile.gettempdir(), f"lit_eff_contract_teachers_{os.getuid()}")
    os.makedirs(folder, exist_ok=True)
    final = os.path.join(folder, f"{family}_{'_'.join(f'{k}{v}' for k, v in sorted(kwargs.items()))}.ckpt")
    os.replace(save_kit_teacher(folder, family, name=f"{os.path.basename(final)}.{os.getpid()}", **kwargs), final)
    return final


def check_distilled(family: str):
    """The contract's check: after fit the teacher and any projection are gone, the student's
    state dict has the plain model's keys, and the KD and hint losses were logged."""
    from tests.helpers import MODELS

    def check(trainer, technique) -> None:
        assert technique.distiller is None
        assert trainer.lightning_module.state_dict().keys() == MODELS[family][0]().state_dict().keys()
        metrics = trainer.callback_metrics
        assert float(metrics["distill/kd_loss"]) > 0 and float(metrics["distill/feature_loss/blocks.1"]) > 0

    return check
