"""N:M mask and effective weight in one pass: ``W ⊙ (E + β(1−E))``, with an STE/SR-STE backward.

``E`` keeps the ``n`` largest ``|w|`` of every ``m`` consecutive weights along the input dimension
(a Linear ``[out, in]`` is grouped along ``in``; a convolution ``[out, in, *kernel]`` along ``in``
at each kernel position), ties going to the lower index and NaN ranking lowest, exactly as
:func:`lit_eff.sparsity.nm_mask`. Backward is straight-through (the gradient of the effective
weight reaches every entry of ``W``, unscaled by β, as in the progressive-gradient-flow code) plus
the SR-STE term ``λ(1−E)⊙W``::

    grad_W = grad_out + λ · (1 − E) ⊙ W

- :func:`nm_sparsify` is the public op: Triton kernels on CUDA tensors (when triton is installed),
  the torch reference elsewhere. It returns ``(effective_weight, mask)``; only the weight is
  differentiable.
- :func:`nm_sparsify_reference` is the same op in plain torch (:func:`lit_eff.sparsity.nm_mask`
  and one ``where``), the definition the kernel is tested against.

>>> w = torch.tensor([[0.1, -3.0, 2.0, 0.5]], requires_grad=True)
>>> out, mask = nm_sparsify(w, 2, 4, beta=0.5, srste_lambda=0.1)
>>> out
tensor([[ 0.0500, -3.0000,  2.0000,  0.2500]], grad_fn=<_NMSparsifyBackward>)
>>> out.sum().backward(); w.grad      # 1 everywhere, plus 0.1 * w where pruned
tensor([[1.0100, 1.0000, 1.0000, 1.0500]])

Triton is imported only when a CUDA tensor first reaches the kernel (it is installed on Linux
x86_64 only). Tests run the kernels on CPU with ``TRITON_INTERPRET=1`` set before that first
use (tests/kernels/). GPU timings: ``python benchmarks/nm_kernel.py`` on a CUDA machine.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

from lit_eff.sparsity.masks import nm_mask
from lit_eff.validation import check_nm

__all__ = ["nm_sparsify", "nm_sparsify_reference", "triton_available"]

_BACKENDS = ("auto", "torch", "triton")


# ---------------------------------------------------------------------------------------------
# Triton kernels (built on first use, so importing this module never imports triton)
# ---------------------------------------------------------------------------------------------
@functools.cache
def _kernels() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def nm_forward(w_ptr, out_ptr, mask_ptr, groups, beta, N: tl.constexpr, M: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr):
        # BLOCK_G groups of M consecutive weights per program; columns padded to BLOCK_M (a power of 2)
        g = tl.program_id(0).to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G)
        c = tl.arange(0, BLOCK_M)
        valid = (g[:, None] < groups) & (c[None, :] < M)
        offs = g[:, None] * M + c[None, :]
        w = tl.load(w_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        # padding and NaN (w != w) rank below every real |w| >= 0; ties go to the lower index, so a
        # real NaN column still beats the padding after it (as lit_eff.sparsity.nm_mask ranks)
        s = tl.where(valid & (w == w), tl.abs(w), -1.0)
        # rank of column i = columns that beat it: larger, or equal and to its left (lower index wins)
        s_i = tl.expand_dims(s, 2)
        s_j = tl.expand_dims(s, 1)
        left = tl.expand_dims(tl.expand_dims(c, 0), 0) < tl.expand_dims(tl.expand_dims(c, 0), 2)
        beats = (s_j > s_i) | ((s_j == s_i) & left)
        rank = tl.sum(beats.to(tl.int32), axis=2)
        keep = rank < N
        out = tl.where(keep, w, w * beta)
        tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=valid)
        tl.store(mask_ptr + offs, keep.to(tl.int8), mask=valid)

    @triton.jit
    def nm_backward(grad_ptr, w_ptr, mask_ptr, out_ptr, numel, lam, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        valid = offs < numel
        grad = tl.load(grad_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        keep = tl.load(mask_ptr + offs, mask=valid, other=1) != 0
        out = tl.where(keep, grad, grad + lam * w)
        tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=valid)

    return triton, nm_forward, nm_backward


def triton_available() -> bool:
    """Whether triton can be imported here (Linux x86_64 installs)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _input_last(weight: torch.Tensor) -> torch.Tensor:
    """``[out, *kernel, in]``, contiguous: groups of ``m`` are consecutive in memory."""
    return (weight if weight.ndim == 2 else weight.movedim(1, -1)).contiguous()


def _back(view: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return view if like.ndim == 2 else view.movedim(-1, 1).contiguous()


def _block_g(block_m: int) -> int:
    return max(4, 8192 // (block_m * block_m))  # the pairwise rank tile is BLOCK_G x BLOCK_M x BLOCK_M


def _triton_forward(weight: torch.Tensor, n: int, m: int, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    triton, nm_forward, _ = _kernels()
    view = _input_last(weight)
    out = torch.empty_like(view)
    mask = torch.empty(view.shape, dtype=torch.int8, device=view.device)
    groups = view.numel() // m
    block_m = triton.next_power_of_2(m)
    block_g = _block_g(block_m)
    if groups:
        nm_forward[(triton.cdiv(groups, block_g),)](view, out, mask, groups, float(beta), N=n, M=m,
                                                   BLOCK_M=block_m, BLOCK_G=block_g)
    return _back(out, weight), _back(mask.view(torch.bool), weight)


def _triton_backward(grad: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, lam: float) -> torch.Tensor:
    triton, _, nm_backward = _kernels()
    grad, weight, mask = grad.contiguous(), weight.contiguous(), mask.contiguous()
    out = torch.empty_like(grad)
    block = 1024
    if grad.numel():
        nm_backward[(triton.cdiv(grad.numel(), block),)](grad, weight, mask.view(torch.int8), out, grad.numel(),
                                                         float(lam), BLOCK=block)
    return out


# ---------------------------------------------------------------------------------------------
# torch reference
# ---------------------------------------------------------------------------------------------
def _torch_forward(weight: torch.Tensor, n: int, m: int, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    mask = nm_mask(weight, n, m)
    return torch.where(mask, weight, weight * beta), mask


def _torch_backward(grad: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, lam: float) -> torch.Tensor:
    return torch.where(mask, grad, grad + lam * weight)


# ---------------------------------------------------------------------------------------------
# the op
# ---------------------------------------------------------------------------------------------
class _NMSparsify(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: torch.Tensor, n: int, m: int, beta: float, lam: float, use_triton: bool):
        weight = weight.detach()
        forward = _triton_forward if use_triton else _torch_forward
        out, mask = forward(weight, n, m, beta)
        ctx.mark_non_differentiable(mask)
        ctx.lam, ctx.use_triton = lam, use_triton
        if lam:
            ctx.save_for_backward(weight, mask)
        return out, mask

    @staticmethod
    def backward(ctx, grad: torch.Tensor, grad_mask: Any):
        if ctx.lam:
            weight, mask = ctx.saved_tensors
            backward = _triton_backward if ctx.use_triton else _torch_backward
            grad = backward(grad, weight, mask, ctx.lam)
        return grad, None, None, None, None, None


def _check(weight: torch.Tensor, n: int, m: int, beta: float, srste_lambda: float) -> None:
    check_nm(n, m)
    if weight.ndim < 2:
        raise ValueError(f"Expected a weight with at least 2 dimensions [out, in, ...], got shape {tuple(weight.shape)}")
    if weight.shape[1] % m:
        raise ValueError(f"Expected `m` to divide the input size of a weight with shape {tuple(weight.shape)}, "
                         f"got m={m} for {weight.shape[1]} inputs")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"Expected `beta` in [0, 1], got beta={beta}")
    if not (srste_lambda >= 0.0 and math.isfinite(srste_lambda)):
        raise ValueError(f"Expected `srste_lambda` >= 0, got srste_lambda={srste_lambda}")


def _apply(weight: torch.Tensor, n: int, m: int, beta: float, srste_lambda: float,
           backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    if backend not in _BACKENDS:
        raise ValueError(f"Expected `backend` in {list(_BACKENDS)}, got backend={backend!r}")
    _check(weight, n, m, beta, srste_lambda)
    use_triton = backend == "triton" or (backend == "auto" and weight.is_cuda and triton_available())
    return _NMSparsify.apply(weight, n, m, float(beta), float(srste_lambda), use_triton)


def nm_sparsify(weight: torch.Tensor, n: int, m: int, beta: float = 0.0,
                srste_lambda: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W ⊙ (E + β(1−E)), E)`` for the N:M mask ``E`` of ``|W|``; Triton on CUDA, torch elsewhere.

    Backward: ``grad_W = grad_out + srste_lambda · (1 − E) ⊙ W`` (straight-through, SR-STE term).
    """
    return _apply(weight, n, m, beta, srste_lambda, "auto")


def nm_sparsify_reference(weight: torch.Tensor, n: int, m: int, beta: float = 0.0,
                          srste_lambda: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`nm_sparsify` in plain torch, on any device (the definition the kernel is tested against)."""
    return _apply(weight, n, m, beta, srste_lambda, "torch")
