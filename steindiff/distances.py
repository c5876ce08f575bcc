"""Feature maps for the gradient fit's distance (``loss="features"``, :func:`steindiff.calibrate`).

The fit minimises ``mean ||f(x) - f(x_teacher)||^2`` over the calibration pairs; ``f = identity`` is the L2
distance.  These maps are data-free and model-free (no metric's network), so a fit with them can still be
judged fairly on any metric.

- :class:`LaplacianPyramid`: the bands of a Laplacian pyramid (Burt and Adelson 1983), each band weighted.
  With every weight 1 it is close to L2; weights above 1 on the fine bands penalise lost detail (blur) more
  than L2 does, on the coarse bands lost structure.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LaplacianPyramid"]


class LaplacianPyramid(nn.Module):
    """``f(x) = concat(w_0 b_0, ..., w_{L-1} b_{L-1}, w_L g_L)`` for images ``(n, c, h, w)``: ``g_0 = x``,
    ``g_{k+1} = avgpool_2(g_k)``, band ``b_k = g_k - upsample(g_{k+1})`` (nearest), the coarsest level ``g_L``;
    each flattened and scaled by ``sqrt(pixels of g_0 / pixels of g_k)`` so that a band's weight, not its size,
    sets its share.  ``weights``: finest band first, one per band plus one for ``g_L`` (``levels + 1`` values).
    """

    def __init__(self, weights: Sequence[float] = (2.0, 1.0, 1.0)):
        super().__init__()
        w = [float(v) for v in weights]
        if len(w) < 2 or any(not v >= 0 for v in w):
            raise ValueError(f"weights must be at least two non-negative numbers (bands, finest first, then the "
                             f"coarsest level), got {list(weights)}")
        self.register_buffer("weights", torch.tensor(w, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"LaplacianPyramid takes images (n, c, h, w), got shape {tuple(x.shape)}")
        levels = len(self.weights) - 1
        if min(x.shape[-2:]) < 2 ** levels:
            raise ValueError(f"{levels} pyramid levels need images of at least {2 ** levels} pixels a side, got "
                             f"{tuple(x.shape[-2:])}")
        n, full = x.shape[0], x.shape[-2] * x.shape[-1]
        out, g = [], x
        for k in range(levels):
            coarse = F.avg_pool2d(g, 2)
            band = g - F.interpolate(coarse, size=g.shape[-2:], mode="nearest")
            out.append(band.reshape(n, -1) * (float(self.weights[k]) * (full / band[0, 0].numel()) ** 0.5))
            g = coarse
        out.append(g.reshape(n, -1) * (float(self.weights[-1]) * (full / g[0, 0].numel()) ** 0.5))
        return torch.cat(out, dim=1)
