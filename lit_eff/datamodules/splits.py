"""Seeded train/val/test splits."""

from __future__ import annotations

import torch

from lit_eff.seeding import generator


def split_indices(num_samples: int, val_fraction: float, test_fraction: float, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Shuffle ``range(num_samples)`` with ``seed`` and cut it into (train, val, test) indices."""
    order = torch.randperm(num_samples, generator=generator(seed, "split"))
    n_test = round(num_samples * test_fraction)
    n_val = round(num_samples * val_fraction)
    return order[n_test + n_val :], order[n_test : n_test + n_val], order[:n_test]
