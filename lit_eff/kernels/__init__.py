"""Kernels, each with a torch reference it is tested against; each builds on first use.
Importing this package imports neither triton nor a compiler.

- :mod:`~lit_eff.kernels.nm_sparsify`: the N:M mask and ``W ⊙ (E + β(1−E))`` in one pass, with
  the STE + SR-STE backward (Triton on CUDA, the reference elsewhere).
- :mod:`~lit_eff.kernels.nm_cpu`: N:M masks and the SR-STE term on CPU, one pass over each
  weight (C, compiled with the system compiler), what :class:`lit_eff.callbacks.NMSparsity` uses on CPU.
"""

from lit_eff.kernels.nm_sparsify import nm_sparsify, nm_sparsify_reference, triton_available

__all__ = ["nm_sparsify", "nm_sparsify_reference", "triton_available"]
