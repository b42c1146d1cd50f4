"""Which layers feature matching pairs, and how wide their outputs are.

Names are ``named_modules()`` names (without ``torch.compile``'s ``_orig_mod.``), matched with
:func:`fnmatch.fnmatchcase` as everywhere in the kit (``*`` matches dots too, so ``blocks.?``
picks blocks 0-9 and ``blocks.*`` would also pick everything inside them).
"""

from __future__ import annotations

from fnmatch import fnmatchcase

from torch import nn

from lit_eff.models.naming import named_modules

__all__ = ["PROJECTIONS", "match_layers", "output_width", "pair_layers"]

#: The attribute of the student network that holds the learned feature projections.
PROJECTIONS = "kd_projections"
_SHOWN = 20


def match_layers(model: nn.Module, pattern: str) -> dict[str, nn.Module]:
    """The modules of ``model`` whose names match ``pattern``, in ``named_modules()`` order."""
    return {name: module for name, module in named_modules(model)
            if name and not name.startswith(PROJECTIONS) and fnmatchcase(name, pattern)}


def _listing(model: nn.Module) -> str:
    names = [name for name, _ in named_modules(model) if name and not name.startswith(PROJECTIONS)]
    more = f" ... ({len(names)} in all)" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more


def pair_layers(student: nn.Module, teacher: nn.Module,
                features: dict[str, str]) -> list[tuple[str, str, nn.Module, nn.Module]]:
    """``(student name, teacher name, student layer, teacher layer)`` for every pair that
    ``features`` (student pattern -> teacher pattern) names; a pattern may match several
    layers, paired in order with as many on the other side."""
    pairs = []
    for student_pattern, teacher_pattern in features.items():
        found = []
        for side, model, pattern in (("student", student, student_pattern), ("teacher", teacher, teacher_pattern)):
            matched = match_layers(model, pattern)
            if not matched:
                raise ValueError(f"`features` {student_pattern!r}: {pattern!r} matches no {side} layer of "
                                 f"{type(model).__name__}; its layers: {_listing(model)}")
            found.append(matched)
        if len(found[0]) != len(found[1]):
            raise ValueError(f"`features` {student_pattern!r}: {teacher_pattern!r} must match as many teacher layers "
                             f"as the student pattern matches student layers (they are paired in order), got "
                             f"{list(found[0])} and {list(found[1])}")
        pairs += [(s, t, found[0][s], found[1][t]) for s, t in zip(found[0], found[1])]
    return pairs


def output_width(module: nn.Module) -> tuple[int, int] | None:
    """``(width, dim)`` of ``module``'s output, read from its structure: the last layer with a
    known width (Linear, Conv, a norm, Embedding) in registration order, ``dim`` -1 for
    token/feature vectors and 1 for convolution channels; ``None`` when no such layer exists.
    The true shapes are checked again on the first training step."""
    found = None
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            found = (layer.out_features, -1)
        elif isinstance(layer, nn.Embedding):
            found = (layer.embedding_dim, -1)
        elif isinstance(layer, (nn.LayerNorm, nn.RMSNorm)) and layer.normalized_shape:
            found = (layer.normalized_shape[-1], -1)
        elif isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            found = (layer.out_channels, 1)
        elif isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
            found = (layer.num_features, 1)
        elif isinstance(layer, nn.GroupNorm):
            found = (layer.num_channels, 1)
    return found
