"""Progressive layer freezing (FreezeOut / Composer-style): the schedule and the model's units.

A model is a stem (what runs before the first block: patch or token embedding, position
embedding, class token; a CNN's first conv), a sequence of *units* (transformer blocks; a
CNN's stages) and a head. Freezing takes units from the front: unit ``i`` only freezes when
units ``0..i-1`` and the stem are frozen, so nothing before a frozen unit needs a gradient and
autograd drops the frozen units' whole backward (input and weight gradients).

>>> [frozen_count(s, 100, 4, 0.5, 0.25, 0.75) for s in (0, 24, 25, 74, 75, 99)]
[0, 0, 1, 1, 2, 2]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

_CONTAINERS = ("blocks", "stages", "layers")  # timm ViT/GPT, timm ConvNeXt-like, others
_SHOWN = 12


def validate_fraction(value: float, name: str, *, low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a float in [0, 1] (ends open as asked), else ``ValueError`` naming ``name``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    if ok:
        ok = (value > 0 if low_open else value >= 0) and (value < 1 if high_open else value <= 1)
    if not ok:
        interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
        raise ValueError(f"Expected `{name}` in {interval}, got {name}={value!r}")
    return float(value)


def frozen_count(step: int, total_steps: int, n_units: int, final_fraction: float, freeze_start: float,
                 freeze_end: float) -> int:
    """How many of the first units are frozen at optimizer step ``step``.

    ``k = floor(final_fraction · n_units)`` units freeze one by one at evenly spaced steps from
    ``int(freeze_start · total_steps)`` (the first) to ``int(freeze_end · total_steps)`` (the
    ``k``-th); none before, ``k`` from then on. Monotone in ``step``.
    """
    k = math.floor(final_fraction * n_units + 1e-9)
    start, end = int(freeze_start * total_steps), int(freeze_end * total_steps)
    if k == 0 or step < start:
        return 0
    if k == 1 or end <= start:
        return k
    return min(k, 1 + (step - start) * (k - 1) // (end - start))


@dataclass
class Units:
    """Where a model's freezable units are: ``container`` (dotted name of the module that holds
    them, ``""`` for the root), the units' names and modules, and ``attrs`` (the container's
    child names that hold the units, in order)."""

    container: str
    names: list[str]
    modules: list[nn.Module]
    attrs: list[str]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _sequence(container: str, attr: str, seq: nn.Module) -> Units:
    names = [_join(_join(container, attr), str(i)) for i in range(len(seq))]
    return Units(container, names, list(seq), [attr])


def find_units(model: nn.Module, path: str | None = None) -> Units:
    """The model's units, earliest first.

    ``path`` names an ``nn.ModuleList``/``nn.Sequential`` to use (``"model.blocks"``). Otherwise
    the first module (in ``named_modules`` order) with a child ``blocks``, ``stages`` or
    ``layers`` of at least two modules (timm ViT, the kit's GPT, ConvNeXt-style CNNs), or with
    children ``layer1``, ``layer2``, ... (timm/torchvision ResNets: one unit per stage).
    """
    if path is not None:
        try:
            seq = model.get_submodule(path)
        except AttributeError:
            raise ValueError(f"Expected `blocks` to name a submodule of {type(model).__name__}, got "
                             f"blocks={path!r}") from None
        if not isinstance(seq, (nn.ModuleList, nn.Sequential)) or len(seq) < 1:
            raise ValueError(f"Expected `blocks` to name an nn.ModuleList or nn.Sequential of blocks, got "
                             f"blocks={path!r} ({type(seq).__name__})")
        container, _, attr = path.rpartition(".")
        return _sequence(container, attr, seq)
    for name, module in model.named_modules():
        for attr in _CONTAINERS:
            seq = module._modules.get(attr)
            if isinstance(seq, (nn.ModuleList, nn.Sequential)) and len(seq) >= 2:
                return _sequence(name, attr, seq)
        stages = []
        while (stage := module._modules.get(f"layer{len(stages) + 1}")) is not None:
            stages.append(stage)
        if len(stages) >= 2:
            attrs = [f"layer{i + 1}" for i in range(len(stages))]
            return Units(name, [_join(name, a) for a in attrs], stages, attrs)
    children = [n for n, _ in model.named_children()][:_SHOWN]
    raise ValueError(f"Found no blocks to freeze in {type(model).__name__}: looked for a ModuleList/Sequential "
                     f"named {list(_CONTAINERS)} or stages layer1, layer2, ...; its children: {children}. "
                     f"Name the blocks with `blocks` (e.g. blocks='model.blocks')")


def stem_modules(model: nn.Module, units: Units) -> dict[str, nn.Module]:
    """The container's children registered before the units (patch/token embedding, a CNN's
    stem convolutions and norms, embedding dropout)."""
    container = model.get_submodule(units.container) if units.container else model
    stem: dict[str, nn.Module] = {}
    for name, child in container.named_children():
        if name in units.attrs:
            break
        stem[_join(units.container, name)] = child
    return stem


def stem_parameters(model: nn.Module, units: Units) -> dict[str, nn.Parameter]:
    """Parameters that run before the first unit: the container's own parameters (class token,
    position embedding) and those of its children registered before the units (patch/token
    embedding, a CNN's stem). A parameter also used elsewhere (the GPT's token embedding, tied
    to the LM head) is left out: freezing it would freeze the other use too."""
    container = model.get_submodule(units.container) if units.container else model
    stem: dict[str, nn.Parameter] = {}
    for name, param in container._parameters.items():
        if param is not None:
            stem[_join(units.container, name)] = param
    for child_name, child in stem_modules(model, units).items():
        for name, param in child.named_parameters():
            stem[_join(child_name, name)] = param
    in_stem = {id(p) for p in stem.values()}
    holders: dict[int, set[str]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for param_name, param in module._parameters.items():
            if param is not None and id(param) in in_stem:
                holders.setdefault(id(param), set()).add(_join(module_name, param_name))
    return {name: p for name, p in stem.items() if holders.get(id(p), {name}) <= set(stem)}
