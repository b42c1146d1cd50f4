"""Tiny models, data and trainers shared by the tests."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Trainer, seed_everything

from lit_eff.datamodules import DigitsDataModule, SeqDigitsDataModule, TextDataModule
from lit_eff.models import CausalLM, ImageClassifier

TINY_VIT = {"img_size": 8, "patch_size": 2, "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0,
            "global_pool": "avg"}


def tiny_vit(**kwargs: Any) -> ImageClassifier:
    return ImageClassifier("vit_tiny_patch16_224", num_classes=10, in_chans=1, model_kwargs=dict(TINY_VIT), **kwargs)


def tiny_cnn(**kwargs: Any) -> ImageClassifier:
    return ImageClassifier("resnet10t", num_classes=10, in_chans=1, **kwargs)


def tiny_gpt(**kwargs: Any) -> CausalLM:
    return CausalLM(block_size=32, n_layer=2, n_head=2, n_embd=32, **kwargs)


def tiny_mor(routing: str = "expert", **kwargs: Any) -> CausalLM:
    """Mixture-of-Recursions at the tiny GPT's width: vanilla depth 4, middle-cycle sharing (a
    unique first and last block around one shared block applied twice), routed per token."""
    from lit_eff.tokens.recursion import Recursion

    recursion = Recursion(recursions=2, routing=routing, capacity=[1.0, 0.5] if routing == "expert" else None)
    return CausalLM(block_size=32, n_layer=4, n_head=2, n_embd=32, recursion=recursion, **kwargs)


def digits(**kwargs: Any) -> DigitsDataModule:
    return DigitsDataModule(batch_size=kwargs.pop("batch_size", 32), **kwargs)


def text(**kwargs: Any) -> TextDataModule:
    return TextDataModule(block_size=32, batch_size=kwargs.pop("batch_size", 8), **kwargs)


def seq_digits(**kwargs: Any) -> SeqDigitsDataModule:
    """Seq-digits: 5 tasks of 2 classes, one epoch each (about 250 training samples per task)."""
    return SeqDigitsDataModule(batch_size=kwargs.pop("batch_size", 32), epochs_per_task=kwargs.pop("epochs_per_task", 1),
                               **kwargs)


MODELS = {"vit": (tiny_vit, digits), "cnn": (tiny_cnn, digits), "gpt": (tiny_gpt, text),
          "vit-seq": (tiny_vit, seq_digits),
          "gpt-mor": (tiny_mor, text), "gpt-mor-token": (lambda **kw: tiny_mor("token", **kw), text)}


def make_trainer(**kwargs: Any) -> Trainer:
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                    enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=2,
                    limit_train_batches=6, enable_checkpointing=False)
    defaults.update(kwargs)
    return Trainer(**defaults)


def fit(callbacks, model: str = "vit", run_seed: int | None = None, monkeypatch=None, **trainer_kwargs: Any):
    """Seed 0, fit the tiny ``model`` family with ``callbacks`` (2 steps unless told), return
    ``(trainer, module)``. ``run_seed`` (with pytest's ``monkeypatch``) keeps the same model init
    but gives the techniques another run seed (``PL_GLOBAL_SEED``)."""
    seeded(0)
    if run_seed is not None:
        monkeypatch.setenv("PL_GLOBAL_SEED", str(run_seed))
    make_model, make_data = MODELS[model]
    module, data = make_model(), make_data()
    trainer_kwargs.setdefault("max_steps", 2)
    trainer = make_trainer(callbacks=callbacks, **trainer_kwargs)
    trainer.fit(module, datamodule=data)
    return trainer, module


def flat_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].numel())


def seeded(seed: int = 0) -> None:
    seed_everything(seed, verbose=False)


@torch.no_grad()
def mean_val_loss(model, datamodule, loss_fn) -> float:
    """Average loss over the validation split, computed outside any Trainer."""
    datamodule.setup("fit")
    was_training = model.training
    model.eval()
    losses = [loss_fn(model, batch).item() for batch in datamodule.val_dataloader()]
    model.train(was_training)
    return sum(losses) / len(losses)


def masked_layer_flops(technique, trainer, module) -> int:
    """Training FLOPs (forward + backward) of the technique's targeted layers on one training
    batch, counted layer by layer, independently of FlopsMonitor."""
    from lit_eff.flops import count_flops

    inputs = {}
    hooks = [layer.register_forward_hook(lambda mod, args, out, name=name: inputs.__setitem__(name, args[0]))
             for name, layer in technique.targets.items()]
    batch = next(iter(trainer.datamodule.train_dataloader()))
    module(batch[0])
    for hook in hooks:
        hook.remove()
    return sum(count_flops(lambda layer=layer, x=inputs[name]: layer(x.detach().requires_grad_())).total
               for name, layer in technique.targets.items())
