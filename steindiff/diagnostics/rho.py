"""``rho_k = gamma_raw^2 s_uu / E_k``: a stabilized step's raw correction against the state's distance to the
data, ``E_k = mean ||x_c - D(x)||^2 + sigma^2 mean div D(x)`` (``x_c = alpha x`` in the stabilizer's coordinates,
``s_uu`` the batch mean of ``||u||^2`` from its trace, ``div D`` an exact divergence, e.g. a mixture's).
Measured beside the method (the benchmark grid records it on mixtures), never part of it.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..solvers import Step, StepOperator
from ..stabilizers import Stabilizer
from ..stabilizers.base import dot

__all__ = ["RhoRecorder"]


class RhoRecorder:
    """``stabilizer``, with ``rho`` added to each record that has ``gamma_raw`` and ``s_uu``;
    ``denoiser_divergence(x, sigma)`` is the exact per-sample ``div D``."""

    def __init__(self, stabilizer: Stabilizer, denoiser_divergence: Callable[[torch.Tensor, float], torch.Tensor]):
        self.stabilizer, self.denoiser_divergence = stabilizer, denoiser_divergence

    def __getattr__(self, key: str):
        return getattr(self.stabilizer, key)

    def step(self, op: StepOperator, x: torch.Tensor) -> tuple[torch.Tensor, Step, dict | None]:
        x_next, st, record = self.stabilizer.step(op, x)
        if record is not None and "gamma_raw" in record and "s_uu" in record:
            x = x.detach()
            with torch.no_grad():
                div = self.denoiser_divergence(x, op.sigma).to(torch.float64)
            x_c = record["alpha"] * x
            e_k = float((dot(x_c - st.denoised, x_c - st.denoised) + op.sigma**2 * div).mean())
            record["rho"] = record["gamma_raw"] ** 2 * record["s_uu"] / e_k if e_k > 0 else None
        return x_next, st, record
