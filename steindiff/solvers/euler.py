"""First- and second-order single-step solvers in VE coordinates."""

from __future__ import annotations

import torch

from .base import Denoise, Scalar, Solver, Step

__all__ = ["Euler", "Heun"]


class Euler(Solver):
    """Euler on the PF-ODE, ``x_{i+1} = x_i + (sigma_{i+1} - sigma_i) (x_i - D(x_i)) / sigma_i``
    (Karras et al. 2022, Alg. 1 without the correction).  In VE coordinates this is DDIM with
    ``eta = 0`` (Song et al. 2021, Eq. 12): ``x_{i+1} = D + (sigma_{i+1}/sigma_i)(x_i - D)``."""

    name = "euler"
    order = 1

    def step(self, denoise: Denoise, x: torch.Tensor, i: int, sigmas: list[Scalar], state: dict) -> Step:
        s, s_next = sigmas[i], sigmas[i + 1]
        d = denoise(x, s, i)
        return Step(d + (s_next / s) * (x - d), d, state)


class Heun(Solver):
    """EDM's deterministic second-order sampler (Karras et al. 2022, Alg. 1, lines 5-8):
    an Euler predictor then the trapezoidal corrector, except for a final step to ``sigma = 0``,
    which is plain Euler.  Two model passes per step, one for a final step to 0."""

    name = "heun"
    order = 2

    def step(self, denoise: Denoise, x: torch.Tensor, i: int, sigmas: list[Scalar], state: dict) -> Step:
        s, s_next = sigmas[i], sigmas[i + 1]
        d = denoise(x, s, i)
        slope = (x - d) / s
        x_euler = x + (s_next - s) * slope
        if s_next == 0:
            return Step(x_euler, d, state)
        slope_next = (x_euler - denoise(x_euler, s_next, i)) / s_next
        return Step(x + (s_next - s) * 0.5 * (slope + slope_next), d, state)

    def nfe(self, sigmas: list[Scalar] | torch.Tensor) -> int:
        n = len(sigmas) - 1
        return 2 * n - (1 if float(sigmas[-1]) == 0 else 0)
