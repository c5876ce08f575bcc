"""Every figure of the package goes through here: one style (matplotlib's Agg canvas, no pyplot and no
global backend switch) and one way out (PNG, written atomically).

:func:`figure` makes a figure and its axes, :func:`panels` a grid of ``n`` panels, :func:`save_figure`
writes one; :func:`image_grid` / :func:`save_image_grid` tile samples into one image.  The figures
themselves are drawn where their data lives (the demo, the benchmark report, the diagnostics)."""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import torch

from .io import atomic_path

__all__ = ["figure", "panels", "save_figure", "colormap", "image_grid", "save_image_grid"]


def figure(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float], dpi: float | None = None, **kw: Any):
    """``(fig, axes)``: a matplotlib figure on the Agg canvas and ``fig.subplots(nrows, ncols, **kw)``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, **kw)


def panels(n: int, ncols: int = 3, w: float = 4.2, h: float = 3.2):
    """``(fig, axes)``: ``n`` panels of ``w x h`` inches, ``ncols`` to a row (the unused ones hidden)."""
    ncols = min(ncols, n)
    fig, axes = figure(math.ceil(n / ncols), ncols, figsize=(w * ncols, h * math.ceil(n / ncols)), squeeze=False)
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def save_figure(fig: Any, path: str | os.PathLike, dpi: float | None = None) -> str:
    """Write ``fig`` to ``path`` as PNG, atomically; returns the path."""
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=dpi if dpi is not None else "figure")
    return str(path)


def colormap(name: str) -> Any:
    """A matplotlib colormap by name (``tab10``, ``viridis``, ...)."""
    import matplotlib

    return matplotlib.colormaps[name]


def image_grid(samples: torch.Tensor | np.ndarray, nrow: int | None = None, *, padding: int = 1,
               scale: int = 1, value_range: tuple[float, float] = (-1.0, 1.0), pad_value: float = 1.0) -> np.ndarray:
    """Tile ``(N, C, H, W)`` images (``C`` = 1 or 3; ``(N, H, W)`` is taken as grayscale) into one
    ``uint8`` array ``(rows, cols)`` or ``(rows, cols, 3)``: ``nrow`` images per row (default about
    ``sqrt(N)``), ``padding`` pixels between them, each pixel repeated ``scale`` times.  Values are
    mapped from ``value_range`` to 0..255 and clipped (NaN shows as black)."""
    x = samples.detach().cpu().double().numpy() if isinstance(samples, torch.Tensor) else samples
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[1] not in (1, 3) or x.shape[0] < 1:
        raise ValueError(f"samples must be (N, 1 or 3, H, W) with N >= 1, got shape {x.shape}")
    if scale < 1 or padding < 0:
        raise ValueError("scale must be >= 1 and padding >= 0")
    lo, hi = value_range
    if not hi > lo:
        raise ValueError(f"value_range must be increasing, got {value_range}")
    n, c, h, w = x.shape
    nrow = int(nrow) if nrow is not None else max(1, math.ceil(math.sqrt(n)))
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    ncol_imgs, nrows_imgs = min(nrow, n), math.ceil(n / nrow)
    x = np.nan_to_num((x - lo) / (hi - lo), nan=0.0, posinf=1.0, neginf=0.0).clip(0, 1)
    if scale > 1:
        x = x.repeat(scale, axis=2).repeat(scale, axis=3)
        h, w = h * scale, w * scale
    grid = np.full((c, nrows_imgs * (h + padding) + padding, ncol_imgs * (w + padding) + padding), float(pad_value))
    for i in range(n):
        r, q = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + q * (w + padding)
        grid[:, top : top + h, left : left + w] = x[i]
    img = (grid * 255 + 0.5).astype(np.uint8)
    return img[0] if c == 1 else img.transpose(1, 2, 0)


def save_image_grid(samples: torch.Tensor | np.ndarray, path: str | os.PathLike, nrow: int | None = None,
                    **kwargs) -> None:
    """Write :func:`image_grid` of ``samples`` to ``path`` as PNG, atomically (see :func:`image_grid`
    for ``nrow``, ``padding``, ``scale``, ``value_range``)."""
    from PIL import Image

    arr = image_grid(samples, nrow, **kwargs)
    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")
