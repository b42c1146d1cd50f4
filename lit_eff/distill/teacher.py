"""Loading the teacher: a frozen network rebuilt from a checkpoint file.

- A kit checkpoint (Lightning ``.ckpt`` of a kit LightningModule): rebuilt from the
  checkpoint's hyperparameters, as the class LightningCLI recorded (``_class_path``) or else
  the trained module's own class.
- A state dict (``.pt``/``.pth``/``.safetensors``; timm or torch) with ``model="student"``
  (the trained module's architecture, rebuilt from its hyperparameters) or a timm model name.

The teacher is the module's ``model`` network when it has one (the kit's modules do), the
module itself otherwise; the student is taken the same way (:func:`network_of`).
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import torch
from torch import nn

from lit_eff.distill.layers import PROJECTIONS
from lit_eff.models.naming import clean_name
from lit_eff.sparsity import harden_state_dict

__all__ = ["STUDENT", "build_teacher", "load_teacher_weights", "network_of", "read_teacher"]

#: ``teacher_model`` value meaning "the trained module's own architecture".
STUDENT = "student"
_SHOWN = 5


def network_of(module: nn.Module) -> nn.Module:
    """The network that maps inputs to logits: ``module.model`` when it is a module, else ``module``."""
    inner = getattr(module, "model", None)
    return inner if isinstance(inner, nn.Module) else module


def read_teacher(path: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """``(state dict, hyperparameters or None)`` of the checkpoint file ``path``."""
    if not isinstance(path, (str, os.PathLike)) or not os.path.isfile(path):
        raise ValueError(f"Expected `teacher` to be a checkpoint file, got teacher={str(path)!r} (no such file)")
    try:
        if str(path).endswith(".safetensors"):
            from safetensors.torch import load_file

            checkpoint = load_file(str(path), device="cpu")
        else:
            try:
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)
            except Exception:  # noqa: BLE001  a Lightning checkpoint may hold objects weights_only refuses
                checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001
        raise ValueError(f"Could not read `teacher`={str(path)!r} as a checkpoint: {type(error).__name__}: "
                         f"{error}") from error
    hparams = None
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        state, hparams = checkpoint["state_dict"], checkpoint.get("hyper_parameters")
    else:
        state = checkpoint
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"Expected `teacher` to hold a Lightning checkpoint or a state dict, got "
                         f"{type(checkpoint).__name__} in teacher={str(path)!r}")
    return state, (dict(hparams) if hparams else None)


def _import(class_path: str) -> type:
    module_name, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(f"The teacher checkpoint names the class {class_path!r}, which cannot be imported: "
                         f"{error}") from error


def _construct(cls: type, hparams: dict[str, Any], where: str) -> nn.Module:
    init = {k: v for k, v in hparams.items() if not k.startswith("_")}  # LightningCLI's _class_path, _instantiator
    try:
        return cls(**init)
    except Exception as error:  # noqa: BLE001
        raise ValueError(f"Could not rebuild the teacher as {cls.__name__}(**hyperparameters of {where}): "
                         f"{type(error).__name__}: {error}") from error


def build_teacher(path: str, model: str | None = None, kwargs: dict[str, Any] | None = None,
                  student: nn.Module | None = None) -> nn.Module:
    """The teacher network of ``path``, with its weights, frozen and in eval mode.

    ``model``: ``None`` (rebuild the checkpoint's LightningModule from its hyperparameters),
    ``"student"`` (rebuild ``student``'s class from ``student.hparams``) or a timm model name.
    ``kwargs`` override those hyperparameters (or are the timm model's arguments).
    """
    state, hparams = read_teacher(path)
    kwargs = dict(kwargs or {})
    with torch.random.fork_rng(devices=[]):  # building draws initial weights: keep the run's random stream
        if model is None:
            if hparams is None:
                raise ValueError(f"`teacher`={str(path)!r} holds no hyperparameters to rebuild its model from (a "
                                 "plain state dict?): set `teacher_model` to 'student' (the trained model's "
                                 "architecture) or to a timm model name")
            if "_class_path" in hparams:
                cls = _import(hparams["_class_path"])
            elif student is not None:
                cls = type(student)
            else:
                raise ValueError(f"`teacher`={str(path)!r} does not name its LightningModule class: set `teacher_model`")
            module = _construct(cls, {**hparams, **kwargs}, f"teacher={str(path)!r}")
        elif model == STUDENT:
            student_hparams = dict(getattr(student, "hparams", None) or {})
            if student is None or not student_hparams:
                raise ValueError(f"teacher_model='student' rebuilds the trained module from its hyperparameters, but "
                                 f"{type(student).__name__} saved none (call self.save_hyperparameters()); or set "
                                 "`teacher_model` to a timm model name")
            module = _construct(type(student), {**student_hparams, **kwargs}, "the trained module")
        else:
            import timm

            if not timm.is_model(model):
                raise ValueError(f"Expected `teacher_model` to be None, 'student' or a timm model name, got "
                                 f"teacher_model={model!r}")
            module = timm.create_model(model, **kwargs)
    net = network_of(module)
    load_teacher_weights(net, state, path)
    net.eval()
    net.requires_grad_(False)
    return net


def load_teacher_weights(net: nn.Module, state: dict[str, torch.Tensor], path: str = "") -> None:
    """Load ``state`` into ``net``, strictly, accepting keys with a ``model.`` or ``module.`` prefix;
    lit_eff masks are hardened and the student-side projections of a distilled run are ignored."""
    state = harden_state_dict({clean_name(k): v for k, v in state.items() if PROJECTIONS not in k})
    expected = set(net.state_dict())
    best = None
    for prefix in ("", "model.", "module."):
        candidate = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        missing, unexpected = sorted(expected - set(candidate)), sorted(set(candidate) - expected)
        if not missing and not unexpected and len(candidate) == len(state):
            own = net.state_dict()
            shapes = [f"{k} {tuple(v.shape)} in the file, {tuple(own[k].shape)} in the model"
                      for k, v in candidate.items() if v.shape != own[k].shape]
            if shapes:
                raise ValueError(f"The weights in `teacher`={str(path)!r} do not fit the teacher {type(net).__name__}: "
                                 f"shapes differ: {'; '.join(shapes[:_SHOWN])}; check `teacher_model` and `teacher_kwargs`")
            net.load_state_dict(candidate, strict=True)
            return
        if best is None or len(missing) + len(unexpected) < len(best[0]) + len(best[1]):
            best = (missing, unexpected)
    missing, unexpected = best

    def shown(keys: list[str]) -> str:
        return f"{keys[:_SHOWN]}{' ...' if len(keys) > _SHOWN else ''}"

    raise ValueError(f"The weights in `teacher`={str(path)!r} do not fit the teacher {type(net).__name__}: missing "
                     f"{shown(missing)}, unexpected {shown(unexpected)}; check `teacher_model` and `teacher_kwargs`")
