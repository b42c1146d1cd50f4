"""Starting a model from another run's weights (only the weights: no optimizer, step or callbacks).

The models' ``init_weights`` argument uses :func:`load_weights`; it is how a dense fine-tune
starts from a sparse pre-training run (SPDF across runs, docs/techniques/spdf.md)::

    lit-eff fit --config configs/vit_digits.yaml --config configs/techniques/spdf.yaml   # sparse, no release
    lit-eff fit --config configs/vit_digits.yaml \\
        --model.init_args.init_weights lightning_logs/version_0/checkpoints/last.ckpt   # dense fine-tune
"""

from __future__ import annotations

import os

import torch
from torch import nn

from lit_eff.sparsity import harden_state_dict

_SHOWN = 5


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The model weights in ``path``: a Lightning checkpoint (its ``state_dict``) or a saved state dict.

    lit_eff masks in it are hardened (``<layer>.weight = W ⊙ (E + β(1−E))``, see
    :func:`lit_eff.sparsity.harden_state_dict`), so pruned weights load as exact zeros into a
    model without masks.
    """
    if not os.path.isfile(path):
        raise ValueError(f"Expected `init_weights` to be a checkpoint file, got init_weights={str(path)!r} "
                         "(no such file)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001  a Lightning checkpoint may hold objects weights_only refuses
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"Expected `init_weights` to hold a Lightning checkpoint or a state dict, got "
                         f"{type(checkpoint).__name__} in {str(path)!r}")
    return harden_state_dict(state)


def load_weights(module: nn.Module, path: str | os.PathLike) -> None:
    """Load the weights in ``path`` into ``module`` (strictly: every key must match)."""
    state = read_state_dict(path)
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise ValueError(f"The weights in {str(path)!r} do not fit {type(module).__name__}: "
                         f"missing {missing[:_SHOWN]}{' ...' if len(missing) > _SHOWN else ''}, "
                         f"unexpected {unexpected[:_SHOWN]}{' ...' if len(unexpected) > _SHOWN else ''}. "
                         "Was the checkpoint written by the same model with the same arguments?")
    module.load_state_dict(state, strict=True)
