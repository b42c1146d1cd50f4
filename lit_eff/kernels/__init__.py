"""Triton kernels, each with a torch reference and a dispatcher (Triton on CUDA, the reference
elsewhere). Importing this package never imports triton; a kernel builds on first use.

- :mod:`~lit_eff.kernels.nm_sparsify`: the N:M mask and ``W ⊙ (E + β(1−E))`` in one pass, with
  the STE + SR-STE backward.
"""

from lit_eff.kernels.nm_sparsify import nm_sparsify, nm_sparsify_reference, triton_available

__all__ = ["nm_sparsify", "nm_sparsify_reference", "triton_available"]
