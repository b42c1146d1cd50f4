"""Tiny supernets for the supernet tests."""

from __future__ import annotations

from lit_eff.supernet import SupernetModule

TINY_SPACE = {"embed_dim": [16, 24, 32], "depth": [1, 2], "num_heads": [1, 2], "mlp_ratio": [1.0, 2.0]}
GPT_KWARGS = {"vocab_size": 256, "block_size": 32}


def tiny_supernet(arch: str = "vit", **kwargs) -> SupernetModule:
    arch_kwargs = GPT_KWARGS if arch == "gpt" else {"img_size": 8, "patch_size": 2, "in_chans": 1, "num_classes": 10}
    kwargs.setdefault("val_subnets", 3)
    return SupernetModule(arch, space=TINY_SPACE, arch_kwargs=arch_kwargs, **kwargs)
