"""Reading checkpoints with a clear error, and telling why one cannot resume this run.

A resume goes wrong quietly in two ways: LightningCLI builds the model from the checkpoint's
hyper-parameters, ignoring a config that asks for another model; and a checkpoint written with
other techniques fails deep in ``load_state_dict`` with lists of missing and unexpected keys.
These helpers name both sides and the fix.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch

# callbacks that measure, save or display, and change nothing about training
PLUMBING = frozenset({
    "FlopsMonitor", "FlopsBudget", "ModelCheckpoint", "ResumableCheckpoint", "LearningRateMonitor",
    "DeviceStatsMonitor", "TQDMProgressBar", "RichProgressBar", "ModelSummary", "RichModelSummary", "Timer",
    "SparsityMonitor", "OnExceptionCheckpoint",
})
_SHOWN = 6


def stack_label(names: Iterable[str]) -> str:
    """``"NMSparsity + TokenDrop"``, or ``"dense"`` for no technique; plumbing is left out."""
    techniques = [name for name in names if name not in PLUMBING]
    return " + ".join(techniques) or "dense"


def read_checkpoint(path: str | os.PathLike, what: str = "checkpoint") -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, or ``ValueError("cannot read checkpoint
    <path>: <why>")`` for a missing, empty, truncated or foreign file."""
    path = str(path)
    if not os.path.isfile(path):
        why = "it is a folder" if os.path.isdir(path) else "no such file"
        raise ValueError(f"cannot read {what} {path}: {why}")
    if os.path.getsize(path) == 0:
        raise ValueError(f"cannot read {what} {path}: the file is empty")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001  every reason torch.load has, reported with the file
        raise ValueError(f"cannot read {what} {path}: {_why_unreadable(path, error)}") from None


def _why_unreadable(path: str, error: Exception) -> str:
    with open(path, "rb") as f:
        head = f.read(64)
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and all(c.isprintable() or c.isspace() for c in text):
        return f"a text file, not a PyTorch checkpoint (it starts with {text[:40]!r})"
    if "Weights only load failed" in str(error):
        return ("it holds Python objects besides tensors, which the kit does not unpickle (unpickling can run "
                "code); if you trust the file, re-save its tensors: torch.save(torch.load(path, "
                "weights_only=False)['state_dict'], 'weights.pt')")
    if head.startswith(b"PK"):  # a zip archive, as torch.save writes
        return (f"the file is truncated or damaged ({type(error).__name__}: {str(error).strip()[:120]}); a run "
                "killed while saving leaves such a file: use an earlier checkpoint")
    return f"not a PyTorch checkpoint ({type(error).__name__}: {str(error).strip()[:120]})"


def read_lightning_checkpoint(path: str | os.PathLike) -> dict:
    """A Lightning checkpoint (a dict with ``state_dict``), with the errors of :func:`read_checkpoint`."""
    checkpoint = read_checkpoint(path)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        held = "a plain state dict" if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(f"cannot read checkpoint {path}: it holds {held}, not a Lightning checkpoint (no "
                         f"'state_dict' entry); to start a run from these weights, pass "
                         f"--model.init_args.init_weights {path} instead of --ckpt_path")
    return checkpoint


def checkpoint_stack(checkpoint: Mapping) -> list[str]:
    """Class names of the callbacks whose state the checkpoint holds (Lightning keys them by
    ``state_key``: the class name, sometimes followed by ``{...}``), plumbing left out."""
    names = [str(key).split("{", 1)[0].rsplit(".", 1)[-1] for key in (checkpoint.get("callbacks") or {})]
    return [name for name in dict.fromkeys(names) if name not in PLUMBING]


def stateful_stack(callbacks: Iterable[Any]) -> list[str]:
    """Class names of the callbacks that would save state in a checkpoint, plumbing left out."""
    names = [type(cb).__name__ for cb in callbacks if _has_state(cb)]
    return [name for name in dict.fromkeys(names) if name not in PLUMBING]


def _has_state(callback: Any) -> bool:
    try:
        return bool(callback.state_dict())
    except Exception:  # noqa: BLE001  a callback whose state needs a trainer: count it
        return True


def stack_mismatch(path: str, saved: list[str], current: list[str]) -> str | None:
    """The message for resuming a checkpoint written with other techniques, or None if they match."""
    if sorted(saved) == sorted(current):
        return None
    return (f"--ckpt_path {path} was written by a run with techniques [{stack_label(saved)}], but this run has "
            f"[{stack_label(current)}]. To resume it, use the same technique fragments as that run (its config.yaml "
            "lists them); to start a new run with other techniques from its weights, pass "
            f"--model.init_args.init_weights {path} instead (masks are hardened into the weights)")


def _plain(value: Any) -> Any:
    if hasattr(value, "as_dict"):  # jsonargparse Namespace
        value = value.as_dict()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _diff(mine: Any, theirs: Any, key: str) -> list[tuple[str, Any, Any]]:
    if isinstance(mine, dict) and isinstance(theirs, dict):
        return [d for k in sorted(set(mine) | set(theirs), key=str)
                for d in _diff(mine.get(k, _UNSET), theirs.get(k, _UNSET), f"{key}.{k}")]
    return [] if mine == theirs else [(key, mine, theirs)]


class _Unset:
    def __repr__(self) -> str:
        return "(unset)"


_UNSET = _Unset()


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def model_mismatch(path: str, config_model: Any, hparams: Mapping) -> str | None:
    """Why the configured model (``{class_path, init_args}``) is not the one the checkpoint's
    hyper-parameters describe, or None. LightningCLI would train the checkpoint's model."""
    config = _plain(config_model)
    if not isinstance(config, dict) or not hparams:
        return None
    saved = _plain(dict(hparams))
    saved_class = saved.pop("_class_path", None)
    saved.pop("_instantiator", None)
    config_class = config.get("class_path")
    fix = (f"LightningCLI builds the model from the checkpoint and would ignore the config's. To resume, "
           f"use the config of the run that wrote it (its config.yaml) without these changes; to train this model "
           f"from its weights, pass --model.init_args.init_weights {path} instead of --ckpt_path")
    if saved_class and config_class and saved_class != config_class:
        return f"--ckpt_path {path} holds a {saved_class}, but the config asks for a {config_class}. {fix}"
    mine = config.get("init_args") or {}
    # names first (model_name, arch: what the model is), then the other arguments
    keys = sorted((k for k in saved if k in mine), key=lambda k: (not isinstance(saved[k], str), k))
    differ = [f"{name}: {_short(a)} in the config, {_short(b)} in the checkpoint"
              for k in keys for name, a, b in _diff(mine[k], saved[k], k)]
    if not differ:
        return None
    more = f" (and {len(differ) - _SHOWN} more)" if len(differ) > _SHOWN else ""
    return (f"--ckpt_path {path} holds a {saved_class or config_class} whose arguments differ from the config's: "
            f"{'; '.join(differ[:_SHOWN])}{more}. {fix}")


def check_resume_state(module: Any, checkpoint: Mapping) -> None:
    """Called from a LightningModule's ``on_load_checkpoint``: remember the checkpoint, so that
    :func:`load_or_explain` can name both technique stacks if its weights do not load."""
    try:
        trainer = module.trainer
    except RuntimeError:  # not attached: load_from_checkpoint and friends
        return
    if trainer is not None and "state_dict" in checkpoint:
        module.__dict__["_resume_checkpoint"] = checkpoint


def load_or_explain(module: Any, load: Any, state_dict: Mapping, strict: bool = True, assign: bool = False) -> Any:
    """``load(state_dict, strict, assign)`` (a module's ``load_state_dict``); when it fails on keys
    while a run resumes from a checkpoint (:func:`check_resume_state`), raise naming the
    checkpoint's technique stack and this run's (instead of lists of keys). Techniques that
    reshape the model on load (load_state_dict pre-hooks) have done so by then."""
    checkpoint = module.__dict__.pop("_resume_checkpoint", None)
    try:
        return load(state_dict, strict=strict, assign=assign)
    except RuntimeError as error:
        if checkpoint is None or not any(word in str(error) for word in ("Missing key", "Unexpected key")):
            raise
        trainer = module.trainer
        expected, saved = set(module.state_dict()), set(checkpoint["state_dict"])
        path = getattr(trainer, "ckpt_path", None) or "the checkpoint"
        message = stack_mismatch(path, checkpoint_stack(checkpoint), stateful_stack(trainer.callbacks))
        if message is None:
            missing, unexpected = sorted(expected - saved), sorted(saved - expected)
            message = (f"--ckpt_path {path} does not fit {type(module).__name__} as set up here: missing "
                       f"{missing[:_SHOWN]}{' ...' if len(missing) > _SHOWN else ''}, unexpected "
                       f"{unexpected[:_SHOWN]}{' ...' if len(unexpected) > _SHOWN else ''}. Was it written with "
                       "the same model arguments and techniques?")
        raise ValueError(message) from error
