"""Pictures of masks a person can read (matplotlib figures, for TensorBoard's image tab).

- :func:`density_chart`: one horizontal bar per layer, the fraction of its weights forward uses.
- :func:`pattern_crop`: a zoomed corner of one layer's mask, one cell per weight (dark = kept),
  with the N:M groups outlined and the count kept in each group written in it.

>>> fig = density_chart({"blocks.0.attn.qkv": 0.5, "blocks.0.mlp.fc1": 0.25})
>>> [round(float(bar.get_width()), 2) for bar in fig.axes[0].patches]
[0.5, 0.25]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["density_chart", "pattern_crop"]


def density_chart(densities: Mapping[str, float], title: str = "fraction of weights kept, per layer") -> Figure:
    """A bar per layer (top to bottom in the given order), its density written beside it."""
    from matplotlib.figure import Figure

    names = list(densities)
    height = 0.9 + 0.28 * len(names)
    fig = Figure(figsize=(7.5, height), dpi=80)
    ax = fig.add_subplot()
    positions = list(range(len(names)))[::-1]
    bars = ax.barh(positions, [densities[n] for n in names], color="#4c72b0", height=0.7)
    ax.set_yticks(positions, names, fontsize=8)
    ax.set_xlim(0, 1.12)
    ax.set_xlabel("density (kept / all)")
    ax.set_title(title, fontsize=10)
    ax.axvline(1.0, color="0.6", lw=0.8, ls="--")
    for bar, name in zip(bars, names):
        ax.text(bar.get_width() + 0.01, bar.get_y() + bar.get_height() / 2, f"{densities[name]:.0%}",
                va="center", fontsize=7)
    fig.tight_layout()
    return fig


def pattern_crop(mask: torch.Tensor, name: str, m: int | None = None, rows: int = 8, columns: int = 32) -> Figure:
    """The top-left ``rows x columns`` of ``mask`` (a weight ``[out, in, ...]`` seen as
    ``[out, in]`` at the first kernel position), one cell per weight, kept dark. With ``m``, the
    groups of ``m`` inputs are outlined and the number kept in each is written in it."""
    from matplotlib.figure import Figure

    crop = mask.detach().reshape(mask.shape[0], mask.shape[1], -1)[..., 0]
    if m:
        columns = max(m, columns // m * m)
    crop = crop[:rows, :columns].to("cpu", torch.float32)
    r, c = crop.shape
    fig = Figure(figsize=(0.9 + 0.24 * c, 0.9 + 0.24 * r), dpi=80)
    ax = fig.add_subplot()
    ax.imshow(crop.numpy(), cmap="Greys", vmin=0, vmax=1.6, interpolation="nearest")
    ax.set_xticks(range(0, c, m or 4))
    ax.set_yticks(range(r))
    ax.tick_params(labelsize=7)
    ax.set_xlabel("input")
    ax.set_ylabel("output")
    what = f"dark: kept ({int(crop.sum())} of {r * c})"
    if m:
        for x in range(0, c + 1, m):
            ax.axvline(x - 0.5, color="#d62728", lw=1.2)
        for row in range(r):
            for g in range(c // m):
                kept = int(crop[row, g * m:(g + 1) * m].sum())
                ax.text(g * m + (m - 1) / 2, row, str(kept), ha="center", va="center", fontsize=7, color="#d62728")
        what += f"; red: groups of {m} inputs and the number each keeps"
    ax.set_title(f"{name}, rows 0-{r - 1}, inputs 0-{c - 1}\n{what}", fontsize=8)
    fig.tight_layout()
    return fig
