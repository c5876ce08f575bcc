"""Noise processes: alpha(t), sigma(t) and log-SNR lambda(t), and VP <-> VE coordinates.

A forward process ``x_t = alpha_t x0 + sigma_t eps`` (VP, or flow matching with ``alpha_t = 1 - t``,
``sigma_t = t``) is described by its VE
("EDM", k-diffusion) noise level ``sigma_ve = sigma_t / alpha_t``; in VE coordinates
``x_ve = x_vp / alpha_t`` and ``alpha = 1``.  All solvers in this package work in VE
coordinates with ``lambda = -log(sigma_ve)`` (Lu et al. 2022, DPM-Solver, Sec. 3), which
makes DDIM, DPM-Solver++ and UniPC identical to their VP formulations.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Sequence

import numpy as np
import torch

__all__ = ["NoiseProcess", "VEProcess", "DiscreteVPProcess", "ContinuousVPProcess", "FlowProcess", "FLOW_T_DELTA",
           "betas_for_schedule", "zero_snr_alphas_cumprod", "vp_alpha", "log_snr", "sigma_from_log_snr",
           "coordinate_scales"]


def vp_alpha(sigma: torch.Tensor | float) -> torch.Tensor | float:
    """``alpha = 1 / sqrt(1 + sigma^2)``: the VP signal scale at VE noise level ``sigma`` (a float for a
    float, a tensor of the same dtype for a tensor)."""
    if isinstance(sigma, torch.Tensor):
        return torch.rsqrt(1.0 + sigma**2)
    return 1 / math.sqrt(1 + sigma**2)


def log_snr(sigma: torch.Tensor | float) -> torch.Tensor | float:
    """log-SNR ``lambda = log(alpha / sigma_vp) = -log(sigma_ve)`` (``+inf`` at ``sigma = 0``); a float for
    a float, a float64 tensor for a tensor."""
    if isinstance(sigma, torch.Tensor):
        return -torch.log(sigma.to(torch.float64))
    return math.inf if sigma == 0 else -math.log(sigma)


def sigma_from_log_snr(lam: torch.Tensor | float) -> torch.Tensor:
    """The VE noise level of log-SNR ``lam`` (inverse of :func:`log_snr`), float64."""
    return torch.exp(-torch.as_tensor(lam, dtype=torch.float64))


def coordinate_scales(coords: str, sigma: float, sigma_next: float) -> tuple[float, float, float]:
    """``(alpha_k, alpha_{k-1}, sigma_k)`` of a step from ``sigma`` to ``sigma_next`` in coordinates ``ve``
    (the state as the solvers carry it: ``alpha = 1``) or ``vp`` (``x_vp = alpha x``, ``sigma_vp = alpha sigma``)."""
    if coords == "ve":
        return 1.0, 1.0, sigma
    if coords == "vp":
        a, a_next = vp_alpha(sigma), vp_alpha(sigma_next)
        return a, a_next, a * sigma
    raise ValueError(f"coords must be 've' or 'vp', got {coords!r}")


class NoiseProcess:
    """A diffusion forward process, parameterized by the VE noise level ``sigma``.

    The default is variance preserving: ``alpha(sigma)`` (the VP signal scale at the time whose VE
    noise level is ``sigma``) is :func:`vp_alpha` and the prior at ``sigma_max`` is ``x_vp ~ N(0, I)``.
    """

    name: str = "process"
    sigma_min: float
    sigma_max: float

    def alpha(self, sigma: torch.Tensor | float) -> torch.Tensor:
        return vp_alpha(torch.as_tensor(sigma, dtype=torch.float64))

    def sigma_vp(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """VP noise std ``sigma_t = alpha_t * sigma_ve``."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        return self.alpha(sigma) * sigma

    def to_ve(self, x_vp: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """``x_ve = x_vp / alpha``."""
        return x_vp / self.alpha(sigma).to(x_vp.dtype)

    def to_vp(self, x_ve: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """``x_vp = alpha * x_ve``."""
        return x_ve * self.alpha(sigma).to(x_ve.dtype)

    def prior_scale(self, sigma_max: float) -> float:
        """Std of the VE state at ``sigma_max`` for unit-variance data-free noise: the prior is
        ``x_vp ~ N(0, I)``, so ``x_ve = eps / alpha`` (``sqrt(1 + sigma_max^2)``)."""
        return math.sqrt(1.0 + float(sigma_max) ** 2)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sigma_min={self.sigma_min:.4g}, sigma_max={self.sigma_max:.4g})"


class VEProcess(NoiseProcess):
    """Variance-exploding / EDM process: ``x = x0 + sigma eps`` (Karras et al. 2022)."""

    name = "ve"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0):
        if not (0 < sigma_min < sigma_max):
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)

    def alpha(self, sigma: torch.Tensor | float) -> torch.Tensor:
        return torch.ones_like(torch.as_tensor(sigma, dtype=torch.float64))

    def prior_scale(self, sigma_max: float) -> float:
        """The prior is ``x_ve ~ N(0, sigma_max^2 I)``."""
        return float(sigma_max)


def betas_for_schedule(schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"],
                       num_train_timesteps: int = 1000, beta_start: float = 0.0001,
                       beta_end: float = 0.02) -> np.ndarray:
    """Discrete betas as in DDPM (linear), Stable Diffusion (scaled_linear) and
    Nichol & Dhariwal 2021 (squaredcos_cap_v2, Eq. 17 with beta clipped at 0.999)."""
    if schedule == "linear":
        return np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64)
    if schedule == "scaled_linear":
        return np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float64) ** 2
    if schedule == "squaredcos_cap_v2":
        def abar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        n = num_train_timesteps
        return np.array([min(1 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)])
    raise ValueError(f"unknown beta schedule {schedule!r}; choose linear, scaled_linear or squaredcos_cap_v2")


def zero_snr_alphas_cumprod(alphas_cumprod: np.ndarray) -> np.ndarray:
    """``alphas_cumprod`` rescaled to zero terminal SNR (Lin et al. 2024, Alg. 1: ``sqrt(abar)`` shifted
    and scaled to keep its first value and end at 0), then ``abar_T = 2**-24`` as diffusers' Euler
    scheduler sets it (a terminal SNR of exactly 0 has no VE noise level)."""
    s = np.sqrt(alphas_cumprod)
    s0, sT = s[0], s[-1]
    s = (s - sT) * s0 / (s0 - sT)
    out = s**2
    out[-1] = 2.0**-24
    return out


class DiscreteVPProcess(NoiseProcess):
    """VP process on integer timesteps ``t = 0..N-1`` with ``alpha_t^2 = prod_{s<=t} (1 - beta_s)``
    (Ho et al. 2020).  ``sigma_ve(t) = sqrt((1 - abar_t) / abar_t)``.

    ``sigma_to_t`` maps a noise level to a (fractional) timestep by linear interpolation in
    ``log sigma`` between table entries, the convention of k-diffusion and diffusers.
    """

    name = "vp-discrete"

    def __init__(self, betas: Sequence[float] | np.ndarray | None = None, *,
                 alphas_cumprod: Sequence[float] | np.ndarray | None = None, beta_schedule: str = "linear",
                 num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02):
        if alphas_cumprod is None:
            if betas is None:
                betas = betas_for_schedule(beta_schedule, num_train_timesteps, beta_start, beta_end)
            betas = np.asarray(betas, dtype=np.float64)
            if betas.ndim != 1 or np.any(betas <= 0) or np.any(betas >= 1):
                raise ValueError("betas must be a 1-D array with values in (0, 1)")
            alphas_cumprod = np.cumprod(1.0 - betas)
        ac = np.asarray(alphas_cumprod, dtype=np.float64)
        if ac.ndim != 1 or len(ac) < 2 or np.any(ac <= 0) or np.any(ac > 1) or np.any(np.diff(ac) >= 0):
            raise ValueError("alphas_cumprod must be 1-D, in (0, 1] and strictly decreasing")
        self.alphas_cumprod = torch.from_numpy(ac)
        self.sigmas_table = torch.sqrt((1 - self.alphas_cumprod) / self.alphas_cumprod)
        self.log_sigmas = torch.log(self.sigmas_table)
        self.sigma_min = float(self.sigmas_table[0])
        self.sigma_max = float(self.sigmas_table[-1])
        self.num_train_timesteps = len(ac)

    def _table(self, device: torch.device) -> torch.Tensor:
        """``log sigma`` per timestep on ``device`` (copied once per device, then cached)."""
        if device.type == "cpu":
            return self.log_sigmas
        cache = self.__dict__.setdefault("_tables", {})
        if device not in cache:
            cache[device] = self.log_sigmas.to(device)
        return cache[device]

    def t_to_sigma(self, t: torch.Tensor | float) -> torch.Tensor:
        """Noise level at a (fractional) timestep, interpolating ``log sigma`` (on ``t``'s device)."""
        t = torch.as_tensor(t, dtype=torch.float64).clamp(0, self.num_train_timesteps - 1)
        table = self._table(t.device)
        lo = t.floor().long().clamp(max=self.num_train_timesteps - 2)
        w = t - lo
        return torch.exp((1 - w) * table[lo] + w * table[lo + 1])

    def sigma_to_t(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """Fractional timestep of a noise level (inverse of :meth:`t_to_sigma`, on ``sigma``'s device)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        table = self._table(sigma.device)
        log_sigma = torch.log(sigma.clamp(min=1e-10))
        idx = torch.searchsorted(table, log_sigma.reshape(-1), right=True) - 1
        idx = idx.clamp(0, self.num_train_timesteps - 2).reshape(log_sigma.shape)
        lo, hi = table[idx], table[idx + 1]
        w = ((log_sigma - lo) / (hi - lo)).clamp(0, 1)
        return idx + w


class ContinuousVPProcess(NoiseProcess):
    """Continuous-time VP process on ``t in [eps, 1]`` (Song et al. 2021).

    ``linear``: ``log alpha_t = -t^2 (beta_max - beta_min)/4 - t beta_min / 2``;
    ``cosine``: ``alpha_t = cos((t + s)/(1 + s) pi/2) / cos(s/(1+s) pi/2)`` (Nichol & Dhariwal),
    with ``t_max`` < 1 to keep ``sigma`` finite.
    """

    name = "vp-continuous"

    def __init__(self, kind: Literal["linear", "cosine"] = "linear", beta_min: float = 0.1, beta_max: float = 20.0,
                 cosine_s: float = 0.008, t_min: float = 1e-3, t_max: float | None = None):
        if kind not in ("linear", "cosine"):
            raise ValueError(f"unknown continuous VP schedule {kind!r}; choose linear or cosine")
        self.kind, self.beta_min, self.beta_max, self.cosine_s = kind, beta_min, beta_max, cosine_s
        self.t_min = t_min
        self.t_max = t_max if t_max is not None else (1.0 if kind == "linear" else 0.9946)
        self.sigma_min = float(self.t_to_sigma(self.t_min))
        self.sigma_max = float(self.t_to_sigma(self.t_max))

    def log_alpha_t(self, t: torch.Tensor | float) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        if self.kind == "linear":
            return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min
        s = self.cosine_s
        return torch.log(torch.cos((t + s) / (1 + s) * math.pi / 2)) - math.log(math.cos(s / (1 + s) * math.pi / 2))

    def t_to_sigma(self, t: torch.Tensor | float) -> torch.Tensor:
        return torch.sqrt(torch.expm1(-2 * self.log_alpha_t(t)))

    def sigma_to_t(self, sigma: torch.Tensor | float) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        log_a = -0.5 * torch.log1p(sigma**2)
        if self.kind == "linear":
            b0, b1 = self.beta_min, self.beta_max - self.beta_min
            # 0.25 b1 t^2 + 0.5 b0 t + log_a = 0
            return (-0.5 * b0 + torch.sqrt(0.25 * b0**2 - b1 * log_a)) / (0.5 * b1)
        s = self.cosine_s
        c = torch.exp(log_a + math.log(math.cos(s / (1 + s) * math.pi / 2)))
        return torch.acos(c.clamp(-1, 1)) * 2 / math.pi * (1 + s) - s


#: ``1 - t_max`` of the default :class:`FlowProcess`: its ``t_max`` stands in for ``t = 1`` (no VE noise level),
#: wherever steindiff starts a flow there (:func:`~steindiff.integrations.diffusers.process_from_scheduler`, the
#: diffusers scheduler and pipelines, the built-in flow models); ``benchmarks/flow_t1.py`` measures what it costs.
FLOW_T_DELTA = 1e-6


class FlowProcess(NoiseProcess):
    """Flow matching / rectified flow: ``x_t = (1 - t) x0 + t eps`` on ``t in [t_min, t_max]``
    (Lipman et al. 2023; Liu et al. 2023; Esser et al. 2024, Stable Diffusion 3, Sec. 2).

    In VE coordinates ``sigma = t / (1 - t)`` and ``x_ve = x_t / (1 - t)``, so the signal scale is
    ``alpha(sigma) = 1 - t = 1 / (1 + sigma)`` and the log-SNR ``log((1 - t) / t) = -log sigma``, as for
    every other process: the solvers run on it unchanged.

    ``t = 1`` itself has no VE noise level (``sigma = inf``), so ``t_max`` must be below 1: it stands in for
    ``t = 1`` wherever a schedule starts there (diffusers' ``FlowMatchEulerDiscreteScheduler`` does), and the
    prior is the flow's own, ``x_t ~ N(0, I)`` at ``t_max`` whatever the data (as flow pipelines draw it at
    ``t = 1``), so the VE state's scale is ``1 + sigma_max`` (:meth:`prior_scale`).  The default
    ``t_max = 1 - 1e-6`` (:data:`FLOW_T_DELTA`, the stand-in diffusers' UniPC uses too) moves a solve from
    ``t = 1`` by about ``1e-6`` relative, and every solver stays exact to float32 rounding from there
    (``benchmarks/flow_t1.py``).

    ``schedule``: how the pipelines that sampled the model place their noise levels (the time shift of SD3
    and FLUX, :class:`steindiff.schedules.FlowSchedule`; ``None``: its default, FlowMatchEuler's uniform times
    without shift); the schedule named ``"flow"`` uses it.  It does not change the process.
    """

    name = "flow"

    def __init__(self, t_min: float = 1e-3, t_max: float = 1.0 - FLOW_T_DELTA, schedule: Any = None):
        if not (0 < t_min < t_max < 1):
            raise ValueError(f"need 0 < t_min < t_max < 1 (t = 1 has no VE noise level), got t_min={t_min}, "
                             f"t_max={t_max}")
        if schedule is not None and not callable(getattr(schedule, "sigmas", None)):
            raise TypeError(f"schedule must be a steindiff.schedules.FlowSchedule, got {type(schedule).__name__}")
        self.t_min, self.t_max, self.schedule = float(t_min), float(t_max), schedule
        self.sigma_min = float(self.t_to_sigma(self.t_min))
        self.sigma_max = float(self.t_to_sigma(self.t_max))

    @classmethod
    def from_sigmas(cls, sigma_min: float, sigma_max: float, schedule: Any = None) -> "FlowProcess":
        """The flow process whose VE noise range is ``[sigma_min, sigma_max]`` (``t = sigma / (1 + sigma)``)."""
        return cls(sigma_min / (1.0 + sigma_min), sigma_max / (1.0 + sigma_max), schedule)

    def alpha(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """``1 - t = 1 / (1 + sigma)``."""
        return 1.0 / (1.0 + torch.as_tensor(sigma, dtype=torch.float64))

    @staticmethod
    def t_to_sigma(t: torch.Tensor | float) -> torch.Tensor:
        """``sigma = t / (1 - t)`` (float64)."""
        t = torch.as_tensor(t, dtype=torch.float64)
        return t / (1.0 - t)

    @staticmethod
    def sigma_to_t(sigma: torch.Tensor | float) -> torch.Tensor:
        """``t = sigma / (1 + sigma)`` (float64; the inverse of :meth:`t_to_sigma`)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        return sigma / (1.0 + sigma)

    def prior_scale(self, sigma_max: float) -> float:
        """``x_t ~ N(0, I)`` at ``sigma_max``, so ``x_ve = eps / (1 - t) = eps (1 + sigma_max)``."""
        return 1.0 + float(sigma_max)

    def __repr__(self) -> str:
        return f"FlowProcess(t_min={self.t_min:.9g}, t_max={self.t_max:.9g}, schedule={self.schedule!r})"
