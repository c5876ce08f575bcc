"""Marginal matching (ours): choose ``gamma`` so the corrected batch has the energy of the next marginal.

The next marginal ``x_{k-1} = alpha_{k-1} x0 + sigma_{k-1} eps`` (coordinates as in
:mod:`.base`) has ``E||x_{k-1}||^2 = alpha_{k-1}^2 E||x0||^2 + d sigma_{k-1}^2``.  The data energy is
reference-free by Tweedie's second-order identity (VE state ``x`` at level ``sigma``):

    E||x0||^2 = E||D(x)||^2 + sigma^2 E[div D(x)]         (E[x0 x0^T | x] = D D^T + sigma^2 dD/dx)

with ``div D`` by Hutchinson through the denoiser output of the step.  The corrected batch energy
``s_xx - 2 gamma s_xu + gamma^2 s_uu`` equals the target at the roots
``gamma = (s_xu +- sqrt(s_xu^2 - s_uu (s_xx - target))) / s_uu``; we take the root nearest 1.  Where
no root exists or the root is ill-conditioned (the last steps, where the plain step barely changes
the energy), ``gamma = 1`` (the plain solver): the safe fallback.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from .base import GammaStabilizer, StepStats, dot

__all__ = ["EnergyMatchingStabilizer"]


class EnergyMatchingStabilizer(GammaStabilizer):
    """Energy matching to the next marginal (module docstring).

    ``energy_from``: ``"first"`` estimates ``E||x0||^2`` once, at the first step (where the state
    follows the prior exactly), and reuses it; ``"each"`` re-estimates it at every step.
    ``min_sensitivity``: fall back to ``gamma = 1`` when ``|d energy / d gamma|`` at the root, relative
    to the target energy, is below this (an ill-conditioned quadratic).
    """

    name = "stein-energy"
    jacobian_of = "D"

    def __init__(self, *, energy_from: str = "first", min_sensitivity: float = 0.05, gamma_min: float | None = 0.5,
                 gamma_max: float | None = 1.5, **options):
        if energy_from not in ("first", "each"):
            raise ValueError(f"energy_from must be 'first' or 'each', got {energy_from!r}")
        super().__init__(gamma_min=gamma_min, gamma_max=gamma_max, **options)
        self.energy_from, self.min_sensitivity = energy_from, min_sensitivity
        self.data_energy: float | None = None

    def statistics(self, s: StepStats) -> dict[str, torch.Tensor]:
        if s.div is None:  # the data energy is known (energy_from="first"): no divergence at this step
            s = replace(s, div=torch.zeros(s.x.shape[0], dtype=torch.float64, device=s.x.device))
        # the VE denoiser's divergence: s.div is d/dx of D with respect to the VE state
        e0 = dot(s.step.denoised, s.step.denoised) + s.op.sigma**2 * s.div
        return {"xx": dot(s.x_c, s.x_c), "xu": dot(s.u, s.x_c), "uu": dot(s.u, s.u), "e0": e0}

    def jacobian_target(self, op):
        """The denoiser's divergence, only while the data energy is not known yet (``energy_from="first"``)."""
        return None if self.energy_from == "first" and self.data_energy is not None else "D"

    def step(self, op, x):
        if op.is_first:
            self.data_energy = None  # a new trajectory
        return super().step(op, x)

    def _batch_mean(self, v: torch.Tensor) -> float:
        """The mean of per-sample values over the whole batch, across processes (``reduce``) too."""
        tot = torch.stack([v.sum().to(torch.float64), torch.full((), float(v.numel()), dtype=torch.float64,
                                                                 device=v.device)])
        if self.reduce is not None:
            tot = self.reduce(tot)
        return float(tot[0] / tot[1])

    def coefficient(self, m, s: StepStats):
        if self.energy_from == "first":
            if self.data_energy is None:
                self.data_energy = self._batch_mean(m["e0"]) if isinstance(m["e0"], torch.Tensor) else m["e0"]
            e0 = self.data_energy
        else:
            e0 = m["e0"]
        sig_next_c = s.alpha_next * s.op.sigma_next if self.coords == "vp" else s.op.sigma_next
        target = s.alpha_next**2 * e0 + s.dim * sig_next_c**2
        xx, xu, uu = m["xx"], m["xu"], m["uu"]
        if isinstance(uu, torch.Tensor):  # per sample
            disc = (xu**2 - uu * (xx - target)).clamp_min(0)
            r1, r2 = (xu - disc.sqrt()) / uu, (xu + disc.sqrt()) / uu
            g = torch.where((r1 - 1).abs() < (r2 - 1).abs(), r1, r2)
            sens = (2 * (g * uu - xu)).abs() / target
            return torch.where((xu**2 - uu * (xx - target) >= 0) & (sens >= self.min_sensitivity), g,
                               torch.ones_like(g))
        disc = xu**2 - uu * (xx - target)
        if disc < 0:
            return 1.0
        roots = ((xu - math.sqrt(disc)) / uu, (xu + math.sqrt(disc)) / uu)
        g = min(roots, key=lambda r: abs(r - 1))
        if abs(2 * (g * uu - xu)) / target < self.min_sensitivity:
            return 1.0
        return g
