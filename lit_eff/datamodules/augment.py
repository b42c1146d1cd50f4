"""Batched image augmentation drawing from an explicit generator (so resumed runs match)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_shift(images: torch.Tensor, max_shift: int, gen: torch.Generator, fill: float = 0.0) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels in each direction (pad and crop)."""
    if max_shift <= 0:
        return images
    n, _, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4, value=fill)
    offsets = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=gen)
    out = torch.empty_like(images)
    for oy in range(2 * max_shift + 1):
        for ox in range(2 * max_shift + 1):
            sel = ((offsets[:, 0] == oy) & (offsets[:, 1] == ox)).nonzero().flatten()
            if len(sel):
                out[sel] = padded[sel, :, oy : oy + h, ox : ox + w]
    return out


def random_flip(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Mirror a random half of the images horizontally."""
    flip = torch.rand(images.shape[0], generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (images - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
