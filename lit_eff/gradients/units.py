"""A model's freezable units, earliest first, and its stem.

A model is a stem (what runs before the first block: patch or token embedding, position
embedding, class token; a CNN's first convolutions), a sequence of *units* (transformer blocks;
a CNN's stages) and a head. Units freeze from the front, with the stem, so nothing before a
frozen unit needs a gradient and autograd skips the frozen units' whole backward.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

_CONTAINERS = ("blocks", "stages", "layers")  # timm ViT/GPT, timm ConvNeXt-like, others
_SHOWN = 12


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
