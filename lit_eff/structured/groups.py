"""Prunable structures: attention heads, MLP hidden units, and the inner channels of ResNet
blocks, each a :class:`Group` that knows its weights, its importance, and how to remove,
re-expand or rescale its members in place.

A group's members are numbered by their position in the dense model; ``group.kept`` lists the
members still present (in order), so a shrunken model can always be re-expanded to the
constructor's shapes with zeros where members were removed (the function stays the same).

Supported: timm's ``Attention`` and ``Mlp`` (ViT and relatives), the kit's GPT
(``CausalSelfAttention``, ``Mlp``), timm ResNet ``BasicBlock``/``Bottleneck``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

import torch
from torch import nn

from lit_eff.models.naming import named_modules

__all__ = ["KINDS", "AttentionHeads", "ConvChannels", "Group", "Layout", "MlpUnits", "find_groups"]

KINDS = ("heads", "mlp", "channels")

#: ``{new parameter: (old parameter, [(dim, kept index), ...])}``: how a removal made each new
#: parameter from an old one (so optimizer state can follow).
Carried = dict[nn.Parameter, tuple[nn.Parameter, list[tuple[int, torch.Tensor]]]]


@dataclass
class Layout:
    """Tensor ``name`` of ``module`` holds ``blocks`` runs of ``per_member`` entries per member
    along ``dim`` (q, k, v rows of each head: 3 runs of ``head_dim``); ``fill`` re-expands
    removed members (1 for a BatchNorm's running variance, 0 elsewhere)."""

    module: nn.Module
    name: str
    dim: int
    per_member: int = 1
    blocks: int = 1
    fill: float = 0.0


def _take(param: nn.Parameter | None, dim: int, index: torch.Tensor, carried: Carried) -> nn.Parameter | None:
    if param is None:
        return None
    new = nn.Parameter(param.detach().index_select(dim, index.to(param.device)).clone(),
                       requires_grad=param.requires_grad)
    carried[new] = (param, [(dim, index)])
    return new


def _take_buffer(buffer: torch.Tensor | None, index: torch.Tensor) -> torch.Tensor | None:
    return None if buffer is None else buffer.index_select(0, index.to(buffer.device)).clone()


def _spread(value: torch.Tensor, dim: int, positions: torch.Tensor, size: int, fill: float = 0.0) -> torch.Tensor:
    """``value`` placed at ``positions`` along ``dim`` of a tensor of ``size`` there, ``fill`` elsewhere."""
    shape = list(value.shape)
    shape[dim] = size
    out = torch.full(shape, fill, dtype=value.dtype, device=value.device)
    return out.index_copy(dim, positions.to(value.device), value)


class Group:
    """Members of one layer that are pruned together, with one threshold in LAPP."""

    kind = ""
    gate_name = "prune_gate"

    def __init__(self, name: str, owner: nn.Module, dense: int) -> None:
        self.name = name  # e.g. "model.blocks.0.mlp.fc1"
        self.owner = owner  # the module holding the gate
        self.dense = dense  # members in the dense model
        self.kept = torch.arange(dense)  # dense positions of the members present, in order

    @property
    def count(self) -> int:
        return int(self.kept.numel())

    # to be provided by each kind --------------------------------------------------------------
    def importance(self, p: int) -> torch.Tensor:
        """Torch-Pruning's group norm: for each member, ``Σ|w|^p`` over each weight slice it owns
        (an output row, an input column, a BatchNorm scale), averaged over those slices."""
        raise NotImplementedError

    def mask_site(self) -> tuple[nn.Module, str]:
        """``(module, "input" | "output")``: where a per-member mask multiplies activations."""
        raise NotImplementedError

    def expand_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """A per-member mask shaped to multiply the activation at :meth:`mask_site`."""
        return mask

    def keep(self, index: torch.Tensor) -> Carried:
        """Keep members ``index`` (positions among the present ones, sorted), remove the others."""
        raise NotImplementedError

    def expand(self) -> None:
        """Put the removed members back as zeros (the dense shapes; the function is unchanged)."""
        raise NotImplementedError

    def scale(self, factor: torch.Tensor) -> None:
        """Multiply member ``j``'s output by ``factor[j]`` (folds a mask into the weights)."""
        raise NotImplementedError

    def cost_modules(self) -> list[nn.Module]:
        """Modules whose FLOPs are proportional to this group's member count."""
        raise NotImplementedError

    def tensors(self) -> list[Layout]:
        """Every tensor whose size depends on the member count, with how (the first one tells
        the count of a checkpoint)."""
        raise NotImplementedError

    def _commit(self, index: torch.Tensor) -> None:
        self.kept = self.kept[index.cpu()]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.count}/{self.dense})"


def _set_linear(linear: nn.Linear, weight: nn.Parameter, bias: nn.Parameter | None) -> None:
    linear.weight = weight
    if linear.bias is not None:
        linear.bias = bias
    linear.out_features, linear.in_features = weight.shape


class MlpUnits(Group):
    """Hidden units of ``fc1 → act → fc2`` (timm ``Mlp``, the kit's GPT ``Mlp``)."""

    kind = "mlp"

    def __init__(self, name: str, owner: nn.Module) -> None:
        self.fc1, self.fc2 = owner.fc1, owner.fc2
        super().__init__(name, owner, self.fc1.out_features)

    def importance(self, p: int) -> torch.Tensor:
        w1, w2 = self.fc1.weight.detach().float(), self.fc2.weight.detach().float()
        return (w1.abs().pow(p).sum(1) + w2.abs().pow(p).sum(0)) / 2

    def mask_site(self) -> tuple[nn.Module, str]:
        return self.fc2, "input"

    def keep(self, index: torch.Tensor) -> Carried:
        carried: Carried = {}
        _set_linear(self.fc1, _take(self.fc1.weight, 0, index, carried), _take(self.fc1.bias, 0, index, carried))
        _set_linear(self.fc2, _take(self.fc2.weight, 1, index, carried), self.fc2.bias)
        self._commit(index)
        return carried

    @torch.no_grad()
    def expand(self) -> None:
        w1, w2 = self.fc1.weight, self.fc2.weight
        _set_linear(self.fc1, nn.Parameter(_spread(w1.detach(), 0, self.kept, self.dense)),
                    None if self.fc1.bias is None else nn.Parameter(_spread(self.fc1.bias.detach(), 0, self.kept,
                                                                            self.dense)))
        _set_linear(self.fc2, nn.Parameter(_spread(w2.detach(), 1, self.kept, self.dense)), self.fc2.bias)
        self.kept = torch.arange(self.dense)

    @torch.no_grad()
    def scale(self, factor: torch.Tensor) -> None:
        self.fc2.weight.mul_(factor.to(self.fc2.weight)[None, :])

    def cost_modules(self) -> list[nn.Module]:
        return [self.owner]

    def tensors(self) -> list[Layout]:
        return [Layout(self.fc1, "weight", 0), *([Layout(self.fc1, "bias", 0)] if self.fc1.bias is not None else []),
                Layout(self.fc2, "weight", 1)]


class AttentionHeads(Group):
    """Heads of a fused-QKV attention (timm ``Attention``, the kit's ``CausalSelfAttention``):
    each head owns ``head_dim`` rows of q, of k and of v in ``qkv`` and as many input columns of
    ``proj``. Pruning sets ``num_heads`` (and timm's ``attn_dim``)."""

    kind = "heads"

    def __init__(self, name: str, owner: nn.Module) -> None:
        self.qkv, self.proj = owner.qkv, owner.proj
        self.head_dim = int(owner.head_dim)
        super().__init__(name, owner, int(owner.num_heads))

    def _rows(self, heads: torch.Tensor, total: int) -> torch.Tensor:
        d = self.head_dim
        per = (heads[:, None] * d + torch.arange(d)[None, :]).reshape(-1)
        return torch.cat([which * total * d + per for which in range(3)])

    def _cols(self, heads: torch.Tensor) -> torch.Tensor:
        return (heads[:, None] * self.head_dim + torch.arange(self.head_dim)[None, :]).reshape(-1)

    def importance(self, p: int) -> torch.Tensor:
        h, d = self.count, self.head_dim
        rows = self.qkv.weight.detach().float().abs().pow(p).sum(1).reshape(3, h * d)
        cols = self.proj.weight.detach().float().abs().pow(p).sum(0)
        per_channel = (rows.sum(0) + cols) / 4
        return per_channel.reshape(h, d).mean(1)

    def mask_site(self) -> tuple[nn.Module, str]:
        return self.proj, "input"

    def expand_mask(self, mask: torch.Tensor) -> torch.Tensor:
        return mask.repeat_interleave(self.head_dim)

    def _set_heads(self, heads: int) -> None:
        self.owner.num_heads = heads
        if hasattr(self.owner, "attn_dim"):
            self.owner.attn_dim = heads * self.head_dim

    def keep(self, index: torch.Tensor) -> Carried:
        carried: Carried = {}
        rows, cols = self._rows(index, self.count), self._cols(index)
        _set_linear(self.qkv, _take(self.qkv.weight, 0, rows, carried), _take(self.qkv.bias, 0, rows, carried))
        _set_linear(self.proj, _take(self.proj.weight, 1, cols, carried), self.proj.bias)
        self._commit(index)
        self._set_heads(self.count)
        return carried

    @torch.no_grad()
    def expand(self) -> None:
        rows, cols = self._rows(self.kept, self.dense), self._cols(self.kept)
        size = 3 * self.dense * self.head_dim
        bias = self.qkv.bias
        _set_linear(self.qkv, nn.Parameter(_spread(self.qkv.weight.detach(), 0, rows, size)),
                    None if bias is None else nn.Parameter(_spread(bias.detach(), 0, rows, size)))
        _set_linear(self.proj, nn.Parameter(_spread(self.proj.weight.detach(), 1, cols,
                                                    self.dense * self.head_dim)), self.proj.bias)
        self.kept = torch.arange(self.dense)
        self._set_heads(self.dense)

    @torch.no_grad()
    def scale(self, factor: torch.Tensor) -> None:
        self.proj.weight.mul_(self.expand_mask(factor.to(self.proj.weight))[None, :])

    def cost_modules(self) -> list[nn.Module]:
        return [self.owner]

    def tensors(self) -> list[Layout]:
        d = self.head_dim
        return [Layout(self.qkv, "weight", 0, d, 3),
                *([Layout(self.qkv, "bias", 0, d, 3)] if self.qkv.bias is not None else []),
                Layout(self.proj, "weight", 1, d)]


class ConvChannels(Group):
    """Output channels of ``conv → bn`` feeding ``next_conv`` inside a ResNet block (the block's
    residual width is not touched). The mask multiplies the BatchNorm output."""

    kind = "channels"

    def __init__(self, name: str, owner: nn.Module, conv: nn.Conv2d, bn: nn.BatchNorm2d, next_conv: nn.Conv2d,
                 gate_name: str) -> None:
        self.conv, self.bn, self.next_conv, self.gate_name = conv, bn, next_conv, gate_name
        super().__init__(name, owner, conv.out_channels)

    def importance(self, p: int) -> torch.Tensor:
        out_rows = self.conv.weight.detach().float().abs().pow(p).flatten(1).sum(1)
        in_cols = self.next_conv.weight.detach().float().abs().pow(p).transpose(0, 1).flatten(1).sum(1)
        gamma = self.bn.weight.detach().float().abs().pow(p)
        return (out_rows + in_cols + gamma) / 3

    def bn_importance(self) -> torch.Tensor:
        """``|γ|`` of the BatchNorm (network slimming's channel scale)."""
        return self.bn.weight.detach().float().abs()

    def mask_site(self) -> tuple[nn.Module, str]:
        return self.bn, "output"

    def expand_mask(self, mask: torch.Tensor) -> torch.Tensor:
        return mask[:, None, None]

    def _set(self, conv_w, conv_b, bn_params, bn_buffers, next_w) -> None:
        self.conv.weight = conv_w
        if self.conv.bias is not None:
            self.conv.bias = conv_b
        self.conv.out_channels = conv_w.shape[0]
        self.bn.weight, self.bn.bias = bn_params
        self.bn.running_mean, self.bn.running_var = bn_buffers
        self.bn.num_features = conv_w.shape[0]
        self.next_conv.weight = next_w
        self.next_conv.in_channels = next_w.shape[1]

    def keep(self, index: torch.Tensor) -> Carried:
        carried: Carried = {}
        self._set(_take(self.conv.weight, 0, index, carried), _take(self.conv.bias, 0, index, carried),
                  (_take(self.bn.weight, 0, index, carried), _take(self.bn.bias, 0, index, carried)),
                  (_take_buffer(self.bn.running_mean, index), _take_buffer(self.bn.running_var, index)),
                  _take(self.next_conv.weight, 1, index, carried))
        self._commit(index)
        return carried

    @torch.no_grad()
    def expand(self) -> None:
        k, n = self.kept, self.dense
        bias = self.conv.bias
        self._set(nn.Parameter(_spread(self.conv.weight.detach(), 0, k, n)),
                  None if bias is None else nn.Parameter(_spread(bias.detach(), 0, k, n)),
                  (nn.Parameter(_spread(self.bn.weight.detach(), 0, k, n)),
                   nn.Parameter(_spread(self.bn.bias.detach(), 0, k, n))),
                  (_spread(self.bn.running_mean, 0, k, n), _spread(self.bn.running_var, 0, k, n, fill=1.0)),
                  nn.Parameter(_spread(self.next_conv.weight.detach(), 1, k, n)))
        self.kept = torch.arange(n)

    @torch.no_grad()
    def scale(self, factor: torch.Tensor) -> None:
        factor = factor.to(self.bn.weight)
        self.bn.weight.mul_(factor)
        self.bn.bias.mul_(factor)

    def cost_modules(self) -> list[nn.Module]:
        return [self.conv, self.next_conv]

    def tensors(self) -> list[Layout]:
        return [Layout(self.conv, "weight", 0), *([Layout(self.conv, "bias", 0)] if self.conv.bias is not None else []),
                Layout(self.bn, "weight", 0), Layout(self.bn, "bias", 0), Layout(self.bn, "running_mean", 0),
                Layout(self.bn, "running_var", 0, fill=1.0), Layout(self.next_conv, "weight", 1)]


# ---------------------------------------------------------------------------------------------
# discovery
# ---------------------------------------------------------------------------------------------
def _identity(module: nn.Module | None) -> bool:
    return module is None or isinstance(module, (nn.Identity, nn.Dropout))


def _attention(name: str, module: nn.Module) -> AttentionHeads | None:
    qkv, proj = getattr(module, "qkv", None), getattr(module, "proj", None)
    heads, head_dim = getattr(module, "num_heads", None), getattr(module, "head_dim", None)
    if not (isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear) and isinstance(heads, int)
            and isinstance(head_dim, int)):
        return None
    if qkv.out_features != 3 * heads * head_dim or proj.in_features != heads * head_dim:
        return None
    if not _identity(getattr(module, "norm", None)) or getattr(module, "gate", None) is not None:
        return None  # a norm over all heads' outputs, or an output gate, couples the heads
    return AttentionHeads(f"{name}.heads", module)


def _mlp(name: str, module: nn.Module) -> MlpUnits | None:
    fc1, fc2 = getattr(module, "fc1", None), getattr(module, "fc2", None)
    if not (isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear)) or fc1.out_features != fc2.in_features:
        return None  # also GLU variants, whose fc1 is twice as wide as fc2's input
    if not _identity(getattr(module, "norm", None)):
        return None
    return MlpUnits(f"{name}.fc1", module)


def _resnet_block(name: str, module: nn.Module) -> list[ConvChannels]:
    from timm.models.resnet import BasicBlock, Bottleneck

    if isinstance(module, BasicBlock):
        chain = [("conv1", "bn1", "conv2")]
        between = [module.drop_block, module.aa]
    elif isinstance(module, Bottleneck):
        chain = [("conv1", "bn1", "conv2"), ("conv2", "bn2", "conv3")]
        between = [module.drop_block, module.aa]
    else:
        return []
    if not all(_identity(m) or type(m).__name__ == "DropBlock2d" for m in between):
        return []  # anti-aliasing layers hold per-channel filters
    groups = []
    for conv_name, bn_name, next_name in chain:
        conv, bn, nxt = getattr(module, conv_name), getattr(module, bn_name), getattr(module, next_name)
        if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.affine
                and isinstance(nxt, nn.Conv2d) and conv.groups == 1 and nxt.groups == 1):
            return []
        groups.append(ConvChannels(f"{name}.{conv_name}", module, conv, bn, nxt, f"prune_gate_{conv_name}"))
    return groups


def find_groups(model: nn.Module, kinds: Sequence[str] | None = None, include: Sequence[str] | None = None,
                exclude: Sequence[str] | None = None) -> list[Group]:
    """The prunable groups of ``model`` of the given ``kinds`` (default all), whose names
    (``<attention>.heads``, ``<mlp>.fc1``, ``<block>.conv1``...) match an ``include`` glob
    (default all) and no ``exclude`` glob. Raises, naming what exists, if none is found."""
    kinds = list(KINDS if kinds is None else kinds)
    found: list[Group] = []
    for name, module in named_modules(model):
        candidates: list[Group] = []
        if "heads" in kinds and (group := _attention(name, module)) is not None:
            candidates.append(group)
        if "mlp" in kinds and (group := _mlp(name, module)) is not None:
            candidates.append(group)
        if "channels" in kinds:
            candidates.extend(_resnet_block(name, module))
        found.extend(candidates)
    every = [g.name for g in found]
    if include is not None:
        found = [g for g in found if any(fnmatchcase(g.name, p) for p in include)]
    if exclude:
        found = [g for g in found if not any(fnmatchcase(g.name, p) for p in exclude)]
    if not found:
        shown = ", ".join(every[:12]) + (", ..." if len(every) > 12 else "")
        raise ValueError(
            f"No prunable structures of {type(model).__name__} for structures={kinds}, include={include}, "
            f"exclude={exclude}. Supported: attention heads and MLP hidden units of timm ViTs and the kit's GPT, "
            f"inner channels of timm ResNet blocks; found in this model: {shown or 'none'}")
    return found
