"""Attaching a token technique to block instances so that copies of the model work.

A technique changes what a block computes by swapping the block *instance's* class for a
generated subclass (the technique's mixin first, then the block's own class), as
``torch.nn.utils.parametrize`` does; its settings are plain attributes of the instance. So
``copy.deepcopy`` (EMA, SWA) gives a model that computes with its own weights and settings,
``state_dict`` keys do not change, pickling works, and ``torch.compile``, activation
checkpointing and FSDP2 (which subclasses the class once more) see an ordinary module.
:func:`detach` restores the original class, also under such a wrapper class.
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["BlockMixin", "attach", "detach", "is_attached"]

_CLASSES: dict[tuple[type, type], type] = {}


def _swapped(mixin: type, base: type) -> type:
    """The subclass ``(mixin, base)``, created once per pair (so compiled code sees one class)."""
    cls = _CLASSES.get((mixin, base))
    if cls is None:
        name = f"{base.__name__}With{mixin.__name__}"
        cls = type(name, (mixin, base), {"_lit_mixin": mixin, "_lit_base": base, "__qualname__": name})
        _CLASSES[(mixin, base)] = cls
    return cls


def _chain(cls: type) -> tuple[tuple[type, ...], type]:
    """The mixins stacked on ``cls`` (outermost first) and the class under them."""
    mixins = []
    while "_lit_mixin" in cls.__dict__:
        mixins.append(cls.__dict__["_lit_mixin"])
        cls = cls.__dict__["_lit_base"]
    return tuple(mixins), cls


def _rebuild(mixins: tuple[type, ...], base: type) -> nn.Module:
    cls = base
    for mixin in reversed(mixins):
        cls = _swapped(mixin, cls)
    return cls.__new__(cls)


class BlockMixin:
    """Base of the technique mixins: a swapped block pickles (and deep-copies) as its original
    class plus the mixins, which are rebuilt on load."""

    def __reduce_ex__(self, protocol: Any):
        reduced = super().__reduce_ex__(protocol)
        mixins, base = _chain(type(self))
        if not mixins:  # another wrapper class on top (FSDP2): its own rules apply
            return reduced
        return (_rebuild, (mixins, base), *reduced[2:])


def _strip(cls: type, mixin: type) -> type:
    """``cls`` without ``mixin`` (rebuilding any class stacked on top of it)."""
    if cls.__dict__.get("_lit_mixin") is mixin:
        return cls.__dict__["_lit_base"]
    if "_lit_mixin" in cls.__dict__:
        return _swapped(cls.__dict__["_lit_mixin"], _strip(cls.__dict__["_lit_base"], mixin))
    if not issubclass(cls, mixin):
        return cls
    key = (cls, mixin)
    if key not in _CLASSES:  # e.g. FSDP2's FSDP<class>: the same wrapper over the original class
        bases = tuple(_strip(base, mixin) for base in cls.__bases__)
        body = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
        _CLASSES[key] = type(cls.__name__, bases, body)
    return _CLASSES[key]


def is_attached(block: nn.Module, mixin: type) -> bool:
    return isinstance(block, mixin)


def attach(block: nn.Module, mixin: type, name: str, settings: Any) -> None:
    """Swap ``block``'s class for ``(mixin, class)`` and store ``settings`` as ``block.<name>``."""
    if isinstance(block, mixin):
        raise ValueError(f"{type(block).__name__} already runs {mixin.__name__}")
    block.__class__ = _swapped(mixin, type(block))
    object.__setattr__(block, name, settings)


def detach(block: nn.Module, mixin: type, name: str) -> None:
    """Undo :func:`attach` (nothing if ``block`` does not run ``mixin``)."""
    if not isinstance(block, mixin):
        return
    block.__class__ = _strip(type(block), mixin)
    block.__dict__.pop(name, None)
