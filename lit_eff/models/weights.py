"""Starting a model from saved weights (only the weights: no optimizer, step or callbacks).

The models' ``init_weights`` argument uses :func:`load_weights`. It reads a Lightning checkpoint
of another run (a dense fine-tune from a sparse run: SPDF across runs, docs/techniques/spdf.md;
a technique added to a trained dense model), a plain ``torch.save`` state dict (timm's
``model.state_dict()``, also nested under ``state_dict``/``model``/``module`` as training scripts
save it), or a ``.safetensors`` file (what timm and the Hugging Face hub download). Key prefixes
are matched (``model.``, ``module.`` from DDP, ``_orig_mod.`` from ``torch.compile``); every
tensor must fit, except those named by ``init_weights_skip`` (globs over the model's keys, e.g.
``["model.head.*"]`` for a new classification head), which keep their initial values and are
reported. Files are read with ``torch.load(weights_only=True)``: tensors only, no code.

    lit-eff fit --config configs/vit_digits.yaml --config configs/techniques/token_merge.yaml \\
        --model.init_args.init_weights lightning_logs/version_0/checkpoints/last.ckpt
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Mapping

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lit_eff.runs.resume import read_checkpoint
from lit_eff.sparsity import harden_state_dict

_SHOWN = 5
_NESTED = ("state_dict", "model", "module", "state_dict_ema", "model_ema")
_COMPILED = re.compile(r"(^|\.)_orig_mod\.")  # torch.compile's wrapper, at any depth


def _is_state(value) -> bool:
    return isinstance(value, Mapping) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors in ``path`` (see the module docstring), lit_eff masks hardened
    (``<layer>.weight = W ⊙ (E + β(1−E))``, :func:`lit_eff.sparsity.harden_state_dict`) so pruned
    weights load as exact zeros into a model without masks."""
    path = str(path)
    if path.endswith(".safetensors") and os.path.isfile(path):
        from safetensors.torch import load_file

        try:
            content = load_file(path, device="cpu")
        except Exception as error:  # noqa: BLE001
            raise ValueError(f"cannot read init_weights {path}: {error}") from None
    else:
        content = read_checkpoint(path, "init_weights")
    state = content if _is_state(content) else None
    if state is None and isinstance(content, Mapping):
        state = next((content[k] for k in _NESTED if _is_state(content.get(k))), None)
    if state is None:
        held = f"a dict with {sorted(map(str, content))[:8]}" if isinstance(content, Mapping) else \
            type(content).__name__
        raise ValueError(f"cannot read init_weights {path}: expected a Lightning checkpoint or a state dict of "
                         f"tensors (also under one of {list(_NESTED)}), got {held}")
    state = {_COMPILED.sub(r"\1", key.removeprefix("module.")): value for key, value in state.items()}  # DDP
    return harden_state_dict(state)


def _match_prefix(source: dict[str, torch.Tensor], target: Mapping) -> dict[str, torch.Tensor]:
    """``source`` with keys renamed into ``target``'s key space: as is, with the first component
    dropped (``model.x`` of a checkpoint into a bare timm model) or with ``target``'s first
    component added (a timm state dict into the LightningModule's ``model.``): whichever matches
    the most keys."""
    prefixes = {key.split(".", 1)[0] + "." for key in target if "." in key}
    candidates = [source, {k.split(".", 1)[1]: v for k, v in source.items() if "." in k}]
    candidates += [{p + k: v for k, v in source.items()} for p in sorted(prefixes)]
    return max(candidates, key=lambda c: len(c.keys() & target.keys()))


def _listed(keys: list[str]) -> str:
    return f"{keys[:_SHOWN]}{f' and {len(keys) - _SHOWN} more' if len(keys) > _SHOWN else ''}"


def load_weights(module: nn.Module, path: str | os.PathLike, skip: list[str] | None = None) -> list[str]:
    """Load the weights in ``path`` into ``module``: every tensor must fit except the keys matching
    a ``skip`` glob, which keep their initial values. Returns the skipped keys (also reported)."""
    skip = list(skip or [])
    expected = module.state_dict()
    state = _match_prefix(read_state_dict(path), expected)
    skipped = lambda key: any(fnmatch.fnmatchcase(key, pattern) for pattern in skip)  # noqa: E731
    missing = [k for k in expected if k not in state and not skipped(k)]
    unexpected = [k for k in state if k not in expected and not skipped(k)]
    shapes = [f"{k} {tuple(state[k].shape)} in the file, {tuple(expected[k].shape)} in the model" for k in state
              if k in expected and state[k].shape != expected[k].shape and not skipped(k)]
    if missing or unexpected or shapes:
        wrong = missing + unexpected + [s.split(" ", 1)[0] for s in shapes]
        globs = sorted({k.rsplit(".", 1)[0] + ".*" for k in wrong})
        raise ValueError(
            f"The weights in {str(path)!r} do not fit {type(module).__name__}: "
            + "; ".join(part for part in (f"missing {_listed(missing)}" if missing else "",
                                          f"unexpected {_listed(unexpected)}" if unexpected else "",
                                          f"other shapes: {_listed(shapes)}" if shapes else "") if part)
            + f". Written by a model with other arguments? To leave these at their initial values (e.g. a new head "
            f"for another number of classes), pass init_weights_skip: {globs[:_SHOWN]}")
    loaded = {k: v for k, v in state.items() if k in expected and not skipped(k)}
    module.load_state_dict(loaded, strict=False)
    left = sorted({k for k in expected if k not in loaded} | {k for k in state if k not in loaded})
    rank_zero_info(f"init_weights: loaded {len(loaded)} tensors from {path}"
                   + (f"; skipped (init_weights_skip={skip}): {_listed(left)}" if left else ""))
    return left
