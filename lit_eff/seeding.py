"""Rank-consistent randomness: every stochastic decision draws from a generator seeded by
(run seed, what, when), so all DDP ranks make the same choice without communicating."""

from __future__ import annotations

import hashlib
import os

import torch


def run_seed(default: int = 0) -> int:
    """The seed given to ``seed_everything`` for this run (``PL_GLOBAL_SEED``), else ``default``."""
    value = os.environ.get("PL_GLOBAL_SEED")
    return int(value) if value is not None else default


def derive_seed(*keys: object) -> int:
    """A stable 63-bit seed from any printable keys (same keys, same seed, on every process)."""
    digest = hashlib.blake2b(repr(keys).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def generator(*keys: object, device: str | torch.device = "cpu") -> torch.Generator:
    """A fresh ``torch.Generator`` seeded by :func:`derive_seed` of ``keys``."""
    gen = torch.Generator(device=device)
    gen.manual_seed(derive_seed(*keys))
    return gen
