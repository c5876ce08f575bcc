"""UniPC: unified predictor-corrector, data prediction (Zhao et al. 2023, Alg. 1-3, B(h) variants).

With ``h = lambda_t - lambda_s``, the predictor UniP-p from ``x_s`` uses the ratios
``r_k = (lambda_{s_k} - lambda_s)/h`` of past steps and the scaled differences
``D1_k = (m_k - m_0)/r_k``:

    x_t = (sigma_t/sigma_s) x_s - expm1(-h) m_0 - B(h) sum_k a_k D1_k

where ``a`` solves ``R a = g`` with ``R_{jk} = r_k^(j-1)`` and ``g_j = j! phi_{j+1}(-h) / B(h)``
(Eq. 8; ``B(h) = -h`` for bh1, ``expm1(-h)`` for bh2).  The corrector UniC-p adds the new
evaluation ``D1_t = D(x_t) - m_0`` at ``r = 1`` with its own weights, which costs no extra model
pass: it is applied at the start of the next step, using the model output computed there.
"""

from __future__ import annotations

import torch

from ..noise import log_snr
from .base import Denoise, Scalar, Solver, Step, scalar_expm1, scalar_solve

__all__ = ["UniPC"]


def unipc_weights(rks: list[Scalar], h: Scalar, order: int,
                  variant: str) -> tuple[list[Scalar], list[Scalar], Scalar]:
    """Predictor weights (``order - 1``), corrector weights (``order``) and ``B(h)``.

    ``rks`` holds the ``order - 1`` past ratios; the corrector adds ``r = 1``.
    UniP-2 uses ``a = 1/2`` and UniC-1 ``c = 1/2`` (Zhao et al. 2023, App. C).  Floats for float
    ratios and step; 0-d tensors, differentiable in them, for tensors (:func:`~steindiff.solvers.base.scalar_solve`).
    """
    hh = -h
    h_phi_1 = scalar_expm1(hh)
    B_h = hh if variant == "bh1" else h_phi_1
    r = list(rks) + [1.0]
    R = [[rk**j for rk in r] for j in range(order)]
    g, h_phi_k, fact = [], h_phi_1 / hh - 1.0, 1.0
    for j in range(1, order + 1):
        g.append(h_phi_k * fact / B_h)
        fact *= j + 1
        h_phi_k = h_phi_k / hh - 1.0 / fact
    if order == 1:
        pred = []
    elif order == 2:
        pred = [0.5]
    else:
        pred = scalar_solve([row[:-1] for row in R[:-1]], g[:-1])
    corr = [0.5] if order == 1 else scalar_solve(R, g)
    return pred, corr, B_h


class UniPC(Solver):
    """UniPC-p with B(h) = ``variant`` ("bh1" or "bh2") and order 1 to 3.

    Step ``i`` uses order ``min(order, i + 1)`` (warm-up); with ``lower_order_final`` (the diffusers
    default) also at most ``n - i`` so the last steps drop order.  A step to ``sigma = 0`` is first
    order.  ``corrector=False`` gives UniP alone.

    The corrector is applied additively: the state at step ``i`` becomes
    ``x_i + (x_i^c - x_i^p)``, where ``x_i^c - x_i^p`` depends only on model outputs.  Without a
    stabilizer ``x_i = x_i^p`` and this is UniC exactly; with one, the stabilizer's adjustment of
    ``x_i`` is kept rather than overwritten.
    """

    def __init__(self, order: int = 2, variant: str = "bh2", corrector: bool = True, lower_order_final: bool = True):
        if order not in (1, 2, 3):
            raise ValueError(f"UniPC order must be 1, 2 or 3, got {order}")
        if variant not in ("bh1", "bh2"):
            raise ValueError(f"UniPC variant must be 'bh1' or 'bh2', got {variant!r}")
        self.order, self.variant, self.corrector, self.lower_order_final = order, variant, corrector, lower_order_final

    @property
    def name(self) -> str:
        return "unipc" if self.variant == "bh2" else "unipc_bh1"

    def init_state(self) -> dict:
        return {"denoised": [], "lambdas": [], "pending": None}

    def step(self, denoise: Denoise, x: torch.Tensor, i: int, sigmas: list[Scalar], state: dict) -> Step:
        s, s_next = sigmas[i], sigmas[i + 1]
        n = len(sigmas) - 1
        m0 = denoise(x, s, i)
        pending = state["pending"]
        if pending is not None:  # UniC for the previous predictor, with the model output at x
            hist_term, c_t, m_prev, B_h = pending
            x = x - B_h * (hist_term + c_t * (m0 - m_prev))
        lam, lam_next = log_snr(s), log_snr(s_next)
        hist_d, hist_l = state["denoised"], state["lambdas"]
        p = min(self.order, len(hist_d) + 1)
        if self.lower_order_final:
            p = min(p, n - i)
        if s_next == 0:
            p = 1
        h = lam_next - lam
        e = -1.0 if s_next == 0 else scalar_expm1(-h)
        x_next = (s_next / s) * x - e * m0
        new_pending = None
        if s_next > 0:
            rks = [(hist_l[-k] - lam) / h for k in range(1, p)]
            d1s = [(hist_d[-k] - m0) / r for k, r in zip(range(1, p), rks)]
            pred, corr, B_h = unipc_weights(rks, h, p, self.variant)
            if p > 1:
                x_next = x_next - B_h * sum(a * d for a, d in zip(pred, d1s))
            if self.corrector:
                hist_term = sum(((c - a) * d for c, a, d in zip(corr[:-1], pred, d1s)), torch.zeros_like(m0))
                new_pending = (hist_term, corr[-1], m0, B_h)
        keep = self.order
        new_state = {"denoised": (hist_d + [m0])[-keep:], "lambdas": (hist_l + [lam])[-keep:], "pending": new_pending}
        return Step(x_next, m0, new_state)
