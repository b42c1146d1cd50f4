"""How token techniques reach a model's token sequence: one small adapter per model family.

A :class:`TokenAdapter` says where the blocks are (each maps ``[batch, tokens, dim]`` to the same
shape), how many leading *prefix* tokens (class, distillation, registers) never drop or merge,
whether the model is causal, and how many tokens an input makes. Positions must be in the
hidden states already (absolute embeddings added at the input). Blocks inside
``checkpoint_wrapper`` are seen through. Built in: timm ViTs (``blocks`` and
``num_prefix_tokens``, no rotary or relative position biases) and the kit's GPT. Another family
takes one function, registered with :func:`register_adapter`::

    @register_adapter
    def my_family(module):
        if not isinstance(module, MyTransformer):
            return None
        return TokenAdapter(model=module, blocks=list(module.layers), num_prefix_tokens=1,
                            family="my_family", sequence_length=lambda inputs: 1 + inputs.shape[1])
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["TokenAdapter", "find_adapter", "register_adapter"]


@dataclass
class TokenAdapter:
    """Where a model's tokens flow.

    Attributes:
        model: the module that owns the blocks (the timm model, the GPT).
        blocks: the transformer blocks in order; techniques address them by index.
        num_prefix_tokens: leading tokens never dropped, skipped or merged (class, registers).
        causal: a decoder with causal attention (token dropping/merging would break it).
        family: a short name for messages (``"timm_vit"``, ``"gpt"``).
        class_token: index of the class token among the prefix tokens (``None`` if there is none).
        num_patches: number of non-prefix tokens at the input, when fixed by the model
            (``None`` if it depends on the input).
        global_pool: the pooling of the head (``"avg"``, ``"token"``, ...) when known.
        dim: width of the token features (``None`` if unknown).
        norm: the module applied to the tokens after the last block (``None`` if unknown).
        sequence_length: tokens entering the first block (prefix included) for a model input
            (the first tensor of a batch); ``None``: ``num_prefix_tokens + num_patches``.
    """

    model: nn.Module
    blocks: list[nn.Module]
    num_prefix_tokens: int = 0
    causal: bool = False
    family: str = "custom"
    class_token: int | None = None
    num_patches: int | None = None
    global_pool: str | None = None
    dim: int | None = None
    norm: nn.Module | None = None
    sequence_length: Callable[[torch.Tensor], int] | None = None

    def __post_init__(self) -> None:
        self.blocks = [unwrap(block) for block in self.blocks]

    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def knows_length(self) -> bool:
        return self.sequence_length is not None or self.num_patches is not None

    def tokens_in(self, inputs: torch.Tensor) -> int:
        """Tokens entering the first block for the model input ``inputs``."""
        if self.sequence_length is not None:
            return int(self.sequence_length(inputs))
        if self.num_patches is None:
            raise ValueError(f"The {self.family} adapter cannot tell how many tokens an input makes: give the "
                             "TokenAdapter `num_patches` or `sequence_length`")
        return self.num_prefix_tokens + self.num_patches


def unwrap(block: nn.Module) -> nn.Module:
    """The block inside activation-checkpointing wrappers (``checkpoint_wrapper``)."""
    while isinstance(inner := block.__dict__.get("_modules", {}).get("_checkpoint_wrapped_module"), nn.Module):
        block = inner
    return block


_ADAPTERS: list[Callable[[nn.Module], TokenAdapter | None]] = []


def register_adapter(fn: Callable[[nn.Module], TokenAdapter | None]) -> Callable[[nn.Module], TokenAdapter | None]:
    """Add an adapter function (checked before the built-in ones); usable as a decorator."""
    _ADAPTERS.insert(0, fn)
    return fn


def _gpt_adapter(module: nn.Module) -> TokenAdapter | None:
    from lit_eff.models.gpt import GPT

    if not isinstance(module, GPT):
        return None
    if module.recursion is not None:
        raise ValueError("Token techniques (TokenDrop, TokenMerge, TokenSkip) cannot attach to a GPT with "
                         "Mixture-of-Recursions (`recursion` set): its shared blocks already run on routed token "
                         "subsets, several times per forward; use the GPT without `recursion` or drop the token "
                         "technique")
    return TokenAdapter(model=module, blocks=list(module.blocks), num_prefix_tokens=0, causal=True, family="gpt",
                        num_patches=module.block_size, dim=module.wte.embedding_dim, norm=module.norm,
                        sequence_length=_last_dim)


def _last_dim(idx: torch.Tensor) -> int:
    return idx.shape[-1]


def _vit_length(module: nn.Module) -> Callable[[torch.Tensor], int]:
    def length(images: torch.Tensor) -> int:
        grid = module.patch_embed.dynamic_feat_size(tuple(images.shape[-2:]))
        return module.num_prefix_tokens + grid[0] * grid[1]

    return length


def _timm_vit_adapter(module: nn.Module) -> TokenAdapter | None:
    blocks = getattr(module, "blocks", None)
    prefix = getattr(module, "num_prefix_tokens", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or not isinstance(prefix, int):
        return None
    if getattr(module, "rope", None) is not None:
        raise ValueError(f"{type(module).__name__} applies rotary position embeddings inside its blocks, so a "
                         "token subset would lose its positions; no lit_eff.tokens adapter handles it yet "
                         "(see lit_eff/tokens/adapters.py to add one)")
    if any(getattr(getattr(b, "attn", None), "relative_position_bias_table", None) is not None for b in blocks) \
            or getattr(module, "rel_pos_bias", None) is not None:
        raise ValueError(f"{type(module).__name__} uses relative position biases tied to the full token grid, so a "
                         "token subset cannot use them; no lit_eff.tokens adapter handles it yet "
                         "(see lit_eff/tokens/adapters.py to add one)")
    has_cls = bool(getattr(module, "has_class_token", getattr(module, "cls_token", None) is not None))
    patch_embed = getattr(module, "patch_embed", None)
    num_patches = getattr(patch_embed, "num_patches", None)
    if getattr(patch_embed, "dynamic_img_size", False):
        num_patches = None
    return TokenAdapter(model=module, blocks=list(blocks), num_prefix_tokens=prefix, causal=False, family="timm_vit",
                        class_token=0 if has_cls else None, num_patches=num_patches,
                        global_pool=getattr(module, "global_pool", None),
                        dim=getattr(module, "embed_dim", getattr(module, "num_features", None)),
                        norm=norm if isinstance(norm := getattr(module, "norm", None), nn.Module) else None,
                        sequence_length=_vit_length(module) if num_patches is None
                        and hasattr(patch_embed, "dynamic_feat_size") else None)


_BUILTIN = [_gpt_adapter, _timm_vit_adapter]


def find_adapter(root: nn.Module) -> TokenAdapter:
    """The adapter of the first module in ``root`` (``root`` itself first) that one fits."""
    for module in root.modules():
        for fn in [*_ADAPTERS, *_BUILTIN]:
            adapter = fn(module)
            if adapter is not None:
                if not adapter.blocks:
                    raise ValueError(f"{type(module).__name__} has no transformer blocks (`blocks` is empty)")
                return adapter
    inner = [type(m).__name__ for m in root.children()]
    what = type(root).__name__ + (f" (holding {', '.join(inner)})" if inner else "")
    missing = []
    if not any(isinstance(getattr(m, "blocks", None), (nn.Sequential, nn.ModuleList)) for m in root.modules()):
        missing.append("no module has `blocks` (an nn.Sequential or nn.ModuleList of transformer blocks)")
    if not any(isinstance(getattr(m, "num_prefix_tokens", None), int) for m in root.modules()):
        missing.append("no module has `num_prefix_tokens`")
    raise ValueError(
        f"Found no token sequence in {what}: token techniques need a transformer; {'; '.join(missing)}, and it is "
        "not lit_eff.models.GPT. A CNN has no tokens. For another transformer family, register an adapter "
        "(lit_eff.tokens.register_adapter)"
    )
