"""Stein stabilization (Li & Zeng 2026, "SteinDiff", Algorithm 1) and its oracle and look-ahead forms.

``gamma*`` minimizes ``J(gamma) = E||x_k - gamma u_k - x*||^2``, ``u_k = x_k - T(x_k)``:
``gamma* = E<u_k, x_k - x*> / E||u_k||^2``.  Under ``x_k | x* ~ N(alpha_k x*, sigma_k^2 I)``, Stein's
identity ``E<v(x), x - alpha x*> = sigma^2 E[div v]`` gives the reference-free estimate

    gamma_hat = max( ((1 - 1/alpha_k) s_xu + (sigma_k^2 / alpha_k) s_div) / s_uu , gamma_min )

with batch means ``s_xu = <u, x>``, ``s_uu = ||u||^2`` and the Hutchinson estimate ``s_div`` of
``div u = d - div T`` (in VP coordinates ``div T_vp = (alpha_{k-1}/alpha_k) div T``).
"""

from __future__ import annotations

from typing import Callable

import torch

from .base import GammaStabilizer, NotDifferentiableError, StepStats, dot

__all__ = ["SteinStabilizer", "NotDifferentiableError"]


class SteinStabilizer(GammaStabilizer):
    """The paper's coefficient (``estimator="stein"``), or for study:

    - ``oracle``: ``gamma* = <u, x - x*>/||u||^2`` with paired clean targets ``clean_target(x, sigma)``
      (e.g. a mixture's exact posterior mean, which equals ``E[x* | x_k]`` under the coupling);
    - ``lookahead``: our reading of the paper's one-sentence "SC" variant (label: ours): the clean
      target of ``x_k`` is the denoiser at the look-ahead candidate, ``x* ~ D(T(x_k), sigma_{k-1})``;
      one extra model pass per step (counted in NFE), no Jacobian products.

    Options of :class:`~steindiff.stabilizers.base.GammaStabilizer` apply (``coords``,
    ``divergence``, ``probes``, ``gamma_min``, ``gamma_max``, ...).
    """

    def __init__(self, estimator: str = "stein", *, clean_target: Callable[[torch.Tensor, float],
                                                                           torch.Tensor] | None = None, **options):
        if estimator not in ("stein", "oracle", "lookahead"):
            raise ValueError(f"estimator must be 'stein', 'oracle' or 'lookahead', got {estimator!r}")
        if estimator == "oracle" and clean_target is None:
            raise ValueError("the oracle estimator needs clean_target(x, sigma) (e.g. a mixture's exact denoiser)")
        exact = estimator == "stein" and options.get("divergence") == "exact"
        options.setdefault("name", {"stein": "stein", "oracle": "stein-oracle", "lookahead": "stein-sc"}[estimator]
                           + ("-exact" if exact else ""))
        super().__init__(**options)
        self.estimator, self.clean_target = estimator, clean_target
        self.jacobian_of = "T" if estimator == "stein" else None

    def statistics(self, s: StepStats) -> dict[str, torch.Tensor]:
        out = {"xu": dot(s.u, s.x_c), "uu": dot(s.u, s.u)}
        if self.estimator == "stein":
            out["div"] = s.dim - (s.alpha_next / s.alpha) * s.div
        else:
            if self.estimator == "oracle":
                target = self.clean_target(s.x, s.op.sigma)
            elif s.op.sigma_next == 0:
                target = s.step.x_next
            else:
                with torch.no_grad():
                    target = s.op.denoise(s.step.x_next, s.op.sigma_next, s.op.i)
            out["num"] = dot(s.u, s.x_c - target)
        return out

    def coefficient(self, m, s: StepStats):
        if self.estimator != "stein":
            return m["num"] / m["uu"]
        a = s.alpha
        return ((1 - 1 / a) * m["xu"] + (s.sigma_c**2 / a) * m["div"]) / m["uu"]
