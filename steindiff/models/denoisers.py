"""Denoisers ``D(x, sigma, **extra) -> x0_hat`` in VE coordinates, and adapters that turn
epsilon-, v-, x0- or score-prediction networks on a VP process, or velocity-prediction networks on a
flow-matching process, into one.

Convention (k-diffusion): ``x = x0 + sigma * eps`` with ``sigma`` the VE noise level, passed as a
tensor of shape ``(batch,)``.  A VP network sees ``x_vp = alpha x`` with ``alpha = 1/sqrt(1+sigma^2)``.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Protocol

import torch
from torch import nn

from ..noise import ContinuousVPProcess, DiscreteVPProcess, FlowProcess, vp_alpha

__all__ = ["Denoiser", "Preconditioned", "VPDenoiser", "EDMPrecond", "FlowDenoiser", "edm_coefficients",
           "PREDICTION_TYPES", "FLOW_PREDICTION_TYPES"]

PREDICTION_TYPES = ("epsilon", "v", "x0", "score")
FLOW_PREDICTION_TYPES = ("velocity", "x0", "epsilon")


class Denoiser(Protocol):
    """``D(x, sigma, **extra)``: estimate of ``E[x0 | x]`` for ``x = x0 + sigma eps``."""

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **extra: Any) -> torch.Tensor: ...


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample vector ``(B,)`` (or scalar) to broadcast against ``x``."""
    v = torch.as_tensor(v, dtype=x.dtype, device=x.device)
    return v if v.ndim == 0 else v.reshape(v.shape[0], *([1] * (x.ndim - 1)))


def edm_coefficients(sigma: torch.Tensor, sigma_data: float) -> tuple[torch.Tensor, ...]:
    """``(c_skip, c_out, c_in, c_noise)`` of EDM's preconditioning at ``sigma`` (Karras et al. 2022, Table 1)."""
    sd = sigma_data
    c_skip = sd**2 / (sigma**2 + sd**2)
    c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
    c_in = 1 / (sigma**2 + sd**2).sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


class Preconditioned(nn.Module):
    """A network ``F`` as a VE denoiser ``D(x, sigma) = c_skip x + c_out F(c_in x, c_noise)`` (Karras et
    al. 2022, Eq. 7; k-diffusion's form), with the coefficients of :meth:`coefficients`.  ``dtype`` is
    the network's dtype; its inputs are cast to it and its output cast back."""

    def __init__(self, net: Callable[..., torch.Tensor], dtype: torch.dtype | None = None):
        super().__init__()
        self.net, self.dtype = net, dtype

    def coefficients(self, sigma: torch.Tensor, x: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """``(c_skip, c_out, c_in, c_noise)`` at ``sigma`` (per sample; broadcast against ``x`` when given,
        ``c_noise`` one value per sample)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **extra: Any) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, device=x.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma, x)
        dtype = self.dtype or x.dtype
        F = self.net((c_in * x).to(dtype), c_noise.to(dtype if dtype.is_floating_point else torch.float32), **extra)
        F = F.to(x.dtype)
        if F.shape != x.shape:
            raise ValueError(f"network output has shape {tuple(F.shape)}, expected "
                             f"{tuple(x.shape)} (same as its input)")
        return c_skip * x + c_out * F


class VPDenoiser(Preconditioned):
    """Wrap a network ``net(x_vp, t, **extra)`` trained on a VP process into a VE denoiser.

    The network sees ``x_vp = alpha x`` (``c_in = alpha = 1/sqrt(1+sigma^2)``, ``sigma_vp = alpha
    sigma``) and the time of ``sigma`` (``c_noise``); from its output ``F``:

    - ``epsilon``: ``D = x - sigma F``                                   (Ho et al. 2020)
    - ``v``:       ``D = alpha x_vp - sigma_vp F``                       (Salimans & Ho 2022, Eq. 22)
    - ``x0``:      ``D = F``
    - ``score``:   ``F = grad log p(x_vp)``, ``eps = -sigma_vp F``, ``D = x + sigma sigma_vp F``

    ``timestep``: how a noise level maps to the network's time input.  ``"interp"`` gives the
    fractional timestep (k-diffusion, diffusers' Euler/Heun); ``"round"`` rounds it to the nearest
    integer (diffusers' DPM-Solver++ and UniPC with Karras sigmas).  For a continuous process the
    time is ``t * time_scale`` (e.g. ``time_scale=1000`` for score-SDE checkpoints).
    """

    def __init__(self, net: Callable[..., torch.Tensor], process: DiscreteVPProcess | ContinuousVPProcess,
                 prediction: Literal["epsilon", "v", "x0", "score"] = "epsilon",
                 timestep: Literal["interp", "round"] = "interp", time_scale: float = 1.0,
                 dtype: torch.dtype | None = None):
        super().__init__(net, dtype)
        if prediction not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction type {prediction!r}; choose one of {', '.join(PREDICTION_TYPES)}")
        if timestep not in ("interp", "round"):
            raise ValueError(f"timestep must be 'interp' or 'round', got {timestep!r}")
        if not hasattr(process, "sigma_to_t"):
            raise TypeError(f"VPDenoiser needs a VP process with sigma_to_t, got {process!r}")
        self.process = process
        self.prediction, self.timestep, self.time_scale = prediction, timestep, time_scale

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        t = self.process.sigma_to_t(sigma.detach().to(torch.float64))
        if self.timestep == "round":
            t = t.round()
        return t * self.time_scale

    def coefficients(self, sigma: torch.Tensor, x: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        s = sigma if x is None else _bcast(sigma, x)
        alpha = vp_alpha(s)
        c_skip, c_out = {"epsilon": (1.0, -s), "v": (alpha**2, -alpha * s), "x0": (0.0, 1.0),
                         "score": (1.0, s * (alpha * s))}[self.prediction]
        return c_skip, c_out, alpha, self.sigma_to_t(sigma.reshape(-1))


class EDMPrecond(Preconditioned):
    """EDM preconditioning (Karras et al. 2022, Table 1 and Eq. 7): the coefficients of
    :func:`edm_coefficients`, ``c_skip = sd^2/(sigma^2+sd^2)``, ``c_out = sigma sd / sqrt(sigma^2+sd^2)``,
    ``c_in = 1/sqrt(sigma^2+sd^2)``, ``c_noise = log(sigma)/4``."""

    def __init__(self, net: Callable[..., torch.Tensor], sigma_data: float = 0.5, dtype: torch.dtype | None = None):
        super().__init__(net, dtype)
        self.sigma_data = float(sigma_data)

    def coefficients(self, sigma: torch.Tensor, x: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        c_skip, c_out, c_in, c_noise = edm_coefficients(sigma if x is None else _bcast(sigma, x), self.sigma_data)
        return c_skip, c_out, c_in, c_noise.reshape(-1)


class FlowDenoiser(Preconditioned):
    """Wrap a network ``net(x_t, t, **extra)`` trained by flow matching (``x_t = (1 - t) x0 + t eps``,
    :class:`~steindiff.noise.FlowProcess`) into a VE denoiser.

    The network sees ``x_t = x / (1 + sigma)`` (``c_in = 1 - t``) and ``t = sigma / (1 + sigma)`` times
    ``time_scale`` (1 for FLUX-style models, 1000 for SD3-style ones, as the model was trained); from its
    output ``F``:

    - ``velocity``: ``F = eps - x0`` (rectified flow, SD3, FLUX), ``D = x_t - t F``
    - ``x0``:       ``D = F``
    - ``epsilon``:  ``D = (x_t - t F) / (1 - t)``

    ``timestep``: ``"continuous"`` passes ``t * time_scale`` as is (diffusers' flow-matching Euler and Heun
    schedulers); ``"floor"`` its integer part, as ``DPMSolverMultistepScheduler`` and ``UniPCMultistepScheduler``
    with ``use_flow_sigmas`` pass their timesteps (``int64``), while their update uses the exact ``t``.
    """

    def __init__(self, net: Callable[..., torch.Tensor], process: FlowProcess | None = None,
                 prediction: Literal["velocity", "x0", "epsilon"] = "velocity", time_scale: float = 1.0,
                 dtype: torch.dtype | None = None, timestep: Literal["continuous", "floor"] = "continuous"):
        super().__init__(net, dtype)
        if prediction not in FLOW_PREDICTION_TYPES:
            raise ValueError(f"unknown flow prediction type {prediction!r}; choose one of "
                             f"{', '.join(FLOW_PREDICTION_TYPES)}")
        if not time_scale > 0:
            raise ValueError(f"time_scale must be > 0, got {time_scale}")
        if timestep not in ("continuous", "floor"):
            raise ValueError(f"timestep must be 'continuous' or 'floor', got {timestep!r}")
        self.process = process if process is not None else FlowProcess()
        self.prediction, self.time_scale, self.timestep = prediction, float(time_scale), timestep

    def model_time(self, sigma: torch.Tensor) -> torch.Tensor:
        """The network's time input at VE noise level ``sigma``: ``t * time_scale`` (float64), floored with
        ``timestep="floor"``."""
        t = FlowProcess.sigma_to_t(sigma.detach().reshape(-1)) * self.time_scale
        return t.floor() if self.timestep == "floor" else t

    def coefficients(self, sigma: torch.Tensor, x: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        s = sigma if x is None else _bcast(sigma, x)
        c_in = 1 / (1 + s)  # 1 - t
        t = s * c_in
        c_skip, c_out = {"velocity": (c_in, -t), "x0": (0.0, 1.0), "epsilon": (1.0, -s)}[self.prediction]
        return c_skip, c_out, c_in, self.model_time(sigma)
