"""Figures for the supernet tools, drawn on matplotlib's Agg canvas without touching the global
backend (``matplotlib.use`` is never called, so a notebook's backend stays as it was)."""

from __future__ import annotations

from typing import Any


def figure(width: float, height: float) -> tuple[Any, Any]:
    """A matplotlib ``Figure`` on an Agg canvas, and its axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def line_figure(points: list[tuple[float, float]], xlabel: str, ylabel: str) -> Any:
    """One curve through ``points`` (x, y), for TensorBoard's ``add_figure``."""
    fig, ax = figure(4, 3)
    ax.plot([p[0] for p in points], [p[1] for p in points], "o-")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
