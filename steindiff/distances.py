"""Feature maps for the gradient fit's distance (``loss="features"``, :func:`steindiff.calibrate`).

The fit minimises ``mean ||f(x) - f(x_teacher)||^2`` over the calibration pairs; ``f = identity`` is the L2
distance.  These maps are data-free and model-free (no metric's network), so a fit with them can still be
judged fairly on any metric.

- :class:`LaplacianPyramid`: the bands of a Laplacian pyramid (Burt and Adelson 1983), each band weighted.
  With every weight 1 it is close to L2; weights above 1 on the fine bands penalise lost detail (blur) more
  than L2 does, on the coarse bands lost structure.
- :class:`DenoiserFeatures`: the activations of the model's own denoiser network on the samples, each layer's
  unit-normalised over channels as LPIPS does (Zhang et al. 2018, Eq. 1, with every layer weight 1): a learned,
  model-specific perceptual distance that needs nothing but the model being calibrated.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DenoiserFeatures", "LaplacianPyramid", "parse_distance"]


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


class DenoiserFeatures(nn.Module):
    """``f(x)``: what the model's own network computes inside ``denoiser(x, sigma_k)`` at the noise levels
    ``sigmas``, the clean samples given as if noised to ``sigma_k``.  For each hooked layer ``l`` with output
    ``a_l`` of shape ``(n, c, h, w)``: ``a_l / ||a_l||_c`` (unit length over channels at each pixel), flattened and
    scaled by ``1 / sqrt(h w)``, so that ``||f(x) - f(y)||^2 = sum_{k,l} mean_hw ||a_l(x) - a_l(y)||^2`` on the
    normalised activations, LPIPS's distance (Zhang et al. 2018, Eq. 1) with unit layer weights; plus
    ``pixel_weight`` times the mean squared pixel difference.  The metrics' networks (digits-FID's, patch-FD's
    classifiers) are never used, so a fit with this distance can be judged on them fairly.

    ``denoiser``: the model ``D(x, sigma)`` being calibrated; ``network``: the ``nn.Module`` whose layers are
    hooked (default ``denoiser`` itself, which must then be a module); ``layers``: names of its submodules
    (``network.named_modules()``); default the first half of its 2-D convolutions in the order a forward pass
    runs them (a U-Net's encoder: the features it extracts, not the image it rebuilds), found by a one-sample pass
    on each call, so that nothing about the map changes once it has run (its fingerprint keys a calibration).
    ``extra_args`` of a conditional model are not passed: the features are the unconditional model's.

    The defaults (``sigmas=(0.5,)``, ``pixel_weight=10``, the two parts then of about the same size on the
    digits model) are the measured ones (docs/calibrated-sampler-gradient.md): at ``sigma = 0.5`` the network
    does not see faint pixel noise, and a fit to the features alone can keep some, which the calibration's
    residual guard then rejects; the pixel term removes it.
    """

    def __init__(self, denoiser: Callable[..., torch.Tensor], sigmas: Sequence[float] = (0.5,), *,
                 network: nn.Module | None = None, layers: Sequence[str] | None = None, pixel_weight: float = 10.0):
        super().__init__()
        net = network if network is not None else denoiser
        if not isinstance(net, nn.Module):
            raise ValueError("DenoiserFeatures hooks the layers of a torch.nn.Module: the denoiser is not one, so "
                             "pass its network as network=")
        s = [float(v) for v in sigmas]
        if not s or any(not v > 0 for v in s):
            raise ValueError(f"sigmas must be positive noise levels, got {list(sigmas)}")
        if not pixel_weight >= 0:
            raise ValueError(f"pixel_weight must be >= 0, got {pixel_weight}")
        self.denoiser, self.network, self.sigmas, self.pixel_weight = denoiser, net, s, float(pixel_weight)
        modules = dict(net.named_modules())
        if layers is not None:
            unknown = [n for n in layers if n not in modules]
            if unknown or not layers:
                raise ValueError(f"layers {unknown or list(layers)} are not submodules of the network (see its "
                                 "named_modules())")
        self.layers = list(layers) if layers is not None else None

    def _default_layers(self, x: torch.Tensor) -> list[str]:
        order: list[str] = []
        names = {m: n for n, m in self.network.named_modules() if isinstance(m, nn.Conv2d)}
        hooks = [m.register_forward_hook(lambda mod, i, o: order.append(names[mod])) for m in names]
        try:
            with torch.no_grad():
                self.denoiser(x[:1], torch.full((1,), self.sigmas[0], dtype=x.dtype, device=x.device))
        finally:
            for h in hooks:
                h.remove()
        order = list(dict.fromkeys(order))
        if not order:
            raise ValueError("the network runs no 2-D convolution on these samples: name its layers (layers=)")
        return order[:max(1, len(order) // 2)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"DenoiserFeatures takes images (n, c, h, w), got shape {tuple(x.shape)}")
        layers = self.layers if self.layers is not None else self._default_layers(x)
        modules = dict(self.network.named_modules())
        out: list[torch.Tensor] = []

        def keep(_mod: nn.Module, _inp: tuple, a: torch.Tensor) -> None:
            if a.dim() == 4:
                a = a / a.norm(dim=1, keepdim=True).clamp_min(1e-10)
                out.append(a.reshape(len(a), -1) / (a.shape[-2] * a.shape[-1]) ** 0.5)
            else:  # a layer with a flat output: the same normalisation over its features
                a = a.reshape(len(a), -1)
                out.append(a / a.norm(dim=1, keepdim=True).clamp_min(1e-10))

        hooks = [modules[n].register_forward_hook(keep) for n in layers]
        try:
            for s in self.sigmas:
                self.denoiser(x, torch.full((len(x),), s, dtype=x.dtype, device=x.device))
        finally:
            for h in hooks:
                h.remove()
        if self.pixel_weight > 0:
            out.append(x.reshape(len(x), -1) * (self.pixel_weight / x[0].numel()) ** 0.5)
        return torch.cat([o.to(x.dtype) for o in out], dim=1)


def parse_distance(text: str, denoiser: Callable[..., torch.Tensor] | None = None) -> nn.Module | None:
    """A distance named on the command line: ``l2`` (``None``: the fit's own L2), ``pyramid:W0/W1/...``
    (:class:`LaplacianPyramid` with these weights, finest band first) or ``denoiser[:S0/S1/...[:PIXEL_WEIGHT]]``
    (:class:`DenoiserFeatures` of ``denoiser`` at these noise levels, default ``0.5`` and ``10``)."""
    name, _, rest = text.strip().partition(":")
    try:
        if name == "l2" and not rest:
            return None
        if name == "pyramid" and rest:
            return LaplacianPyramid([float(w) for w in rest.split("/")])
        if name == "denoiser":
            sig, _, pix = rest.partition(":")
            if denoiser is None:
                raise ValueError("the denoiser distance needs the model")
            given = {"sigmas": [float(v) for v in sig.split("/")] if sig else None,
                     "pixel_weight": float(pix) if pix else None}
            return DenoiserFeatures(denoiser, **{k: v for k, v in given.items() if v is not None})
    except ValueError as e:
        raise ValueError(f"distance {text!r}: {e}") from None
    raise ValueError(f"unknown distance {text!r}: l2, pyramid:W0/W1/... (band weights, finest first) or "
                     "denoiser[:S0/S1/...[:PIXEL_WEIGHT]] (the model's own features at noise levels S)")
