"""Pictures of samples: image grids written as PNG (atomically)."""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from .io import atomic_path

__all__ = ["image_grid", "save_image_grid"]


def image_grid(samples: torch.Tensor | np.ndarray, nrow: int | None = None, *, padding: int = 1,
               scale: int = 1, value_range: tuple[float, float] = (-1.0, 1.0), pad_value: float = 1.0) -> np.ndarray:
    """Tile ``(N, C, H, W)`` images (``C`` = 1 or 3; ``(N, H, W)`` is taken as grayscale) into one
    ``uint8`` array ``(rows, cols)`` or ``(rows, cols, 3)``: ``nrow`` images per row (default about
    ``sqrt(N)``), ``padding`` pixels between them, each pixel repeated ``scale`` times.  Values are
    mapped from ``value_range`` to 0..255 and clipped (NaN shows as black)."""
    x = samples.detach().cpu().double().numpy() if isinstance(samples, torch.Tensor) else np.asarray(samples, dtype=np.float64)
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


def save_image_grid(samples: torch.Tensor | np.ndarray, path: str | os.PathLike, nrow: int | None = None, **kwargs) -> None:
    """Write :func:`image_grid` of ``samples`` to ``path`` as PNG, atomically (see :func:`image_grid`
    for ``nrow``, ``padding``, ``scale``, ``value_range``)."""
    from PIL import Image

    arr = image_grid(samples, nrow, **kwargs)
    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")
