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
    which is plain Euler.  Two model passes per step, one for a final step to 0.

    ``time``: the variable the trapezoidal rule integrates over.  ``"sigma"`` (EDM): ``dx/dsigma`` on the VE
    state.  ``"flow"``: ``dx_t/dt`` (the velocity) on the flow state ``x_t = x / (1 + sigma)``,
    ``t = sigma / (1 + sigma)``, as ``FlowMatchHeunDiscreteScheduler`` steps; a different second-order method
    with the same predictor, and the one whose first step from ``t`` near 1 (``sigma`` near infinity) stays
    finite.  Both are written as the predictor ``x' = D + (sigma'/sigma)(x - D)`` (Euler, i.e. DDIM) plus
    ``w (D(x') - D(x))``, with ``w = (sigma - sigma') / (2 sigma')`` in ``sigma``, times
    ``(1 + sigma') / (1 + sigma)`` in flow time: algebraically the trapezoidal rule, without cancelling a
    large state against its slope."""

    order = 2

    def __init__(self, time: str = "sigma"):
        if time not in ("sigma", "flow"):
            raise ValueError(f"Heun's time must be 'sigma' or 'flow', got {time!r}")
        self.time = time

    @property
    def name(self) -> str:
        return "heun" if self.time == "sigma" else "heun_flow"

    def step(self, denoise: Denoise, x: torch.Tensor, i: int, sigmas: list[Scalar], state: dict) -> Step:
        s, s_next = sigmas[i], sigmas[i + 1]
        d = denoise(x, s, i)
        x_euler = d + (s_next / s) * (x - d)
        if s_next == 0:
            return Step(x_euler, d, state)
        w = (s - s_next) / (2 * s_next)
        if self.time == "flow":
            w = w * (1 + s_next) / (1 + s)
        return Step(x_euler + w * (denoise(x_euler, s_next, i) - d), d, state)

    def nfe(self, sigmas: list[Scalar] | torch.Tensor) -> int:
        n = len(sigmas) - 1
        return 2 * n - (1 if float(sigmas[-1]) == 0 else 0)
