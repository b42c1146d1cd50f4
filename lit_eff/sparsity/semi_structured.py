"""2:4 inference: Linear weights with the 2:4 pattern as torch's semi-structured sparse tensors.

After training with 2:4 masks (``NMSparsity(n=2, m=4)``, or ``MagnitudePruning`` with
``structure="nm"`` at 2:4) and :func:`lit_eff.sparsity.export`, every targeted Linear weight has at
most 2 nonzeros in each group of 4 consecutive input weights. On a GPU with 2:4 sparse tensor
cores, :func:`to_semi_structured` stores those weights with
``torch.sparse.to_sparse_semi_structured`` (values + metadata, half the values), and
``F.linear`` runs a sparse matmul. Anywhere else it raises one ``ValueError`` listing every
reason, so a CPU run says plainly why not::

    model = lit_eff.sparsity.export(model).half().cuda().eval()
    converted = lit_eff.sparsity.to_semi_structured(model)        # names of converted layers

What torch requires (read from the installed ``torch/sparse/semi_structured.py``): a CUDA tensor
on a GPU of compute capability >= 8.0 (Ampere or newer), 2-D and contiguous, dtype float16 or
bfloat16 here (the cuSPARSELt backend, torch's default, also takes int8 / float8; the CUTLASS
backend float32 and int8), and both dimensions multiples of (and at least) the backend's minimum:
(16, 16) for cuSPARSELt at fp16/bf16, (32, 64) for CUTLASS. Inference only: the converted weights
do not train (``requires_grad=False``).

:func:`layers_2to4` tells which Linear layers have the pattern, on any device.
"""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase

import torch
from torch import nn

from lit_eff.sparsity.parametrize import masked_modules

__all__ = ["is_2to4", "layers_2to4", "semi_structured_problems", "to_semi_structured"]

_DTYPES = (torch.float16, torch.bfloat16)
_MIN_CAPABILITY = (8, 0)


def _violations(weight: torch.Tensor) -> torch.Tensor:
    """Indices ``[row, group]`` of the groups of 4 with more than 2 nonzeros."""
    counts = (weight.detach() != 0).reshape(weight.shape[0], -1, 4).sum(-1)
    return (counts > 2).nonzero()


def is_2to4(weight: torch.Tensor) -> bool:
    """Whether a 2-D weight has at most 2 nonzeros in every group of 4 consecutive inputs.

    (A kept weight may be exactly zero, so a group with fewer nonzeros still has the pattern.)

    >>> is_2to4(torch.tensor([[1.0, 0.0, 0.0, 2.0]])), is_2to4(torch.tensor([[1.0, 1.0, 0.0, 2.0]]))
    (True, False)
    """
    return weight.ndim == 2 and weight.shape[1] % 4 == 0 and _violations(weight).numel() == 0


def _linear_layers(model: nn.Module, include: Sequence[str] | None, exclude: Sequence[str] | None) -> dict:
    for name, value in (("include", include), ("exclude", exclude)):
        if value is not None and (isinstance(value, str) or not all(isinstance(p, str) for p in value)):
            raise ValueError(f"Expected `{name}` to be a list of name patterns (strings), got {name}={value!r}")
    return {name: module for name, module in model.named_modules()
            if isinstance(module, nn.Linear)
            and (include is None or any(fnmatchcase(name, p) for p in include))
            and not any(fnmatchcase(name, p) for p in exclude or ())}


def layers_2to4(model: nn.Module, include: Sequence[str] | None = None,
                exclude: Sequence[str] | None = None) -> list[str]:
    """Names of the Linear layers (matching ``include``, default all, and no ``exclude`` glob)
    whose weight has the 2:4 pattern (:func:`is_2to4`)."""
    return [name for name, layer in _linear_layers(model, include, exclude).items() if is_2to4(layer.weight)]


def _backend() -> tuple[str, dict]:
    """The backend ``to_sparse_semi_structured`` will use and its (dtype -> min shape) table."""
    from torch.sparse import (
        SparseSemiStructuredTensor,
        SparseSemiStructuredTensorCUSPARSELT,
        SparseSemiStructuredTensorCUTLASS,
    )

    cusparselt = getattr(torch.backends, "cusparselt", None)
    use_cutlass = SparseSemiStructuredTensor._FORCE_CUTLASS or (cusparselt is not None and not cusparselt.is_available())
    cls = SparseSemiStructuredTensorCUTLASS if use_cutlass else SparseSemiStructuredTensorCUSPARSELT
    table = {dtype: (c.sparse_min_rows, c.sparse_min_cols) for dtype, c in cls._DTYPE_SHAPE_CONSTRAINTS.items()}
    return cls.BACKEND, table


def _layer_problems(name: str, weight: torch.Tensor, backend: str, table: dict) -> list[str]:
    problems = []
    if weight.ndim != 2 or weight.shape[1] % 4:
        problems.append(f"`{name}.weight` (shape {tuple(weight.shape)}) has no groups of 4 inputs")
    else:
        bad = _violations(weight)
        if bad.numel():
            row, group = (int(i) for i in bad[0])
            count = bad.shape[0]
            problems.append(f"`{name}.weight` is not 2:4: {count} group{'' if count == 1 else 's'} of 4 "
                            f"ha{'s' if count == 1 else 've'} more than 2 nonzeros "
                            f"(first: row {row}, columns {4 * group}-{4 * group + 3}); train it with "
                            "NMSparsity(n=2, m=4) and lit_eff.sparsity.export, or exclude it")
    if weight.dtype not in _DTYPES:
        problems.append(f"`{name}.weight` is {str(weight.dtype).removeprefix('torch.')}; 2:4 sparse matmuls "
                        "here take float16 or bfloat16 (model.half() or model.to(torch.bfloat16) first)")
    elif weight.ndim == 2 and weight.dtype in table:
        min_rows, min_cols = table[weight.dtype]
        rows, cols = weight.shape
        if rows < min_rows or rows % min_rows or cols < min_cols or cols % min_cols:
            problems.append(f"`{name}.weight` has shape {tuple(weight.shape)}; the {backend} backend needs both "
                            f"dimensions multiples of (and at least) ({min_rows}, {min_cols}) for "
                            f"{str(weight.dtype).removeprefix('torch.')}")
    if weight.is_cuda:
        capability = torch.cuda.get_device_capability(weight.device)
        if capability < _MIN_CAPABILITY:
            problems.append(f"`{name}.weight` is on {torch.cuda.get_device_name(weight.device)} (compute capability "
                            f"{capability[0]}.{capability[1]}); 2:4 sparse tensor cores need compute capability "
                            ">= 8.0 (Ampere or newer)")
    else:
        problems.append(f"`{name}.weight` is on {weight.device.type}; 2:4 semi-structured sparse tensors need a CUDA "
                        "GPU with compute capability >= 8.0 (model.cuda() first"
                        + ("" if torch.cuda.is_available() else "; no CUDA GPU is visible here") + ")")
    return problems


def semi_structured_problems(model: nn.Module, include: Sequence[str] | None = None,
                             exclude: Sequence[str] | None = None) -> dict[str, list[str]]:
    """Why each candidate layer cannot be converted (an empty list: it can).

    Candidates: with ``include``, every matching Linear layer (each must be 2:4); without it, the
    Linear layers that are 2:4 (others are left dense). A model still carrying lit_eff masks, or
    with no candidate at all, is reported under ``"model"``.
    """
    if masked_modules(model):
        return {"model": ["the model still carries lit_eff masks; call lit_eff.sparsity.export(model) first"]}
    layers = _linear_layers(model, include, exclude)
    if include is None:
        layers = {name: layer for name, layer in layers.items() if is_2to4(layer.weight)}
    if not layers:
        which = f"matched include={list(include)}" if include is not None else "has the 2:4 pattern"
        return {"model": [f"no Linear layer {which} (exclude={list(exclude or [])}); train with "
                          "NMSparsity(n=2, m=4) and call lit_eff.sparsity.export(model) first"]}
    backend, table = _backend()
    return {name: _layer_problems(name, layer.weight, backend, table) for name, layer in layers.items()}


def to_semi_structured(model: nn.Module, include: Sequence[str] | None = None,
                       exclude: Sequence[str] | None = None) -> list[str]:
    """Store 2:4 Linear weights as ``torch.sparse`` semi-structured tensors, in place, for inference.

    Without ``include`` every Linear layer with the 2:4 pattern is converted and the others stay
    dense; with ``include`` every matching Linear layer must be 2:4. Raises ``ValueError`` listing
    every reason when any candidate cannot be converted (CPU, GPU older than compute capability 8.0,
    dtype other than float16/bfloat16, shape, pattern, masks not exported); converts nothing then.
    Returns the converted layers' names.
    """
    problems = semi_structured_problems(model, include, exclude)
    found = [f"- {reason}" for reasons in problems.values() for reason in reasons]
    if found:
        raise ValueError("Cannot convert to 2:4 semi-structured sparse weights:\n" + "\n".join(found))
    from torch.sparse import to_sparse_semi_structured

    layers = _linear_layers(model, include, exclude)
    for name in problems:
        layer = layers[name]
        layer.weight = nn.Parameter(to_sparse_semi_structured(layer.weight.detach().contiguous()),
                                    requires_grad=False)
    return list(problems)
