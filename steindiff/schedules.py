"""Time-step schedules: decreasing noise levels ``sigma_0 > ... > sigma_{N-1} >= 0``.

Every schedule returns ``N + 1`` values for ``N`` steps, the last being ``0`` (the data) unless
``final_zero=False``.  Noise levels are VE (EDM) sigmas; see :mod:`steindiff.noise`.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from .noise import DiscreteVPProcess, NoiseProcess

__all__ = ["SCHEDULES", "get_sigmas", "karras_sigmas", "logsnr_sigmas", "time_sigmas", "validate_sigmas",
           "flow_time_shift"]

SCHEDULES = ("karras", "logsnr", "time")


def validate_sigmas(sigmas: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Return ``sigmas`` as a float64 tensor, or raise if it is not a valid schedule:
    1-D, at least two entries, finite, strictly decreasing, positive except a final 0."""
    s = torch.as_tensor(sigmas, dtype=torch.float64).detach().clone()
    if s.ndim != 1 or len(s) < 2:
        raise ValueError(f"sigmas must be a 1-D sequence of at least 2 values, got shape {tuple(s.shape)}")
    if not torch.isfinite(s).all():
        raise ValueError(f"sigmas must be finite, got {s.tolist()}")
    if (s[:-1] <= 0).any() or s[-1] < 0:
        raise ValueError(f"sigmas must be positive except a final 0, got {s.tolist()}")
    if (s[1:] >= s[:-1]).any():
        i = int(torch.nonzero(s[1:] >= s[:-1])[0])
        raise ValueError(f"sigmas must be strictly decreasing: sigmas[{i}]={s[i]:.6g} <= "
                         f"sigmas[{i + 1}]={s[i + 1]:.6g}")
    return s


def _append_zero(s: torch.Tensor, final_zero: bool) -> torch.Tensor:
    return torch.cat([s, s.new_zeros(1)]) if final_zero else s


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0,
                  final_zero: bool = True) -> torch.Tensor:
    """Karras et al. 2022, Eq. 5: ``sigma_i = (smax^(1/rho) + i/(n-1) (smin^(1/rho) - smax^(1/rho)))^rho``."""
    _check(n, sigma_min, sigma_max)
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _append_zero((hi + ramp * (lo - hi)) ** rho, final_zero)


def logsnr_sigmas(n: int, sigma_min: float, sigma_max: float, final_zero: bool = True) -> torch.Tensor:
    """Uniform steps in log-SNR ``lambda = -log sigma`` (Lu et al. 2022, DPM-Solver, Sec. 3.3)."""
    _check(n, sigma_min, sigma_max)
    return _append_zero(torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64)),
                        final_zero)


def time_sigmas(n: int, process: NoiseProcess, final_zero: bool = True) -> torch.Tensor:
    """Uniform steps in the process's own time, "trailing" spacing (Lin et al. 2024, Table 2):
    ``t_i = T - i T / n`` for a discrete process, ``t`` from ``t_max`` to ``t_min`` for a continuous one,
    and uniform ``sigma`` for the VE process (where time is ``sigma``)."""
    if n < 1:
        raise ValueError(f"number of steps must be >= 1, got {n}")
    if isinstance(process, DiscreteVPProcess):
        T = process.num_train_timesteps
        t = torch.arange(T, 0, -T / n, dtype=torch.float64)[:n].round() - 1
        return _append_zero(process.t_to_sigma(t), final_zero)
    if hasattr(process, "t_to_sigma"):
        t = torch.linspace(process.t_max, process.t_min, n, dtype=torch.float64)  # type: ignore[attr-defined]
        return _append_zero(process.t_to_sigma(t), final_zero)  # type: ignore[attr-defined]
    return _append_zero(torch.linspace(process.sigma_max, process.sigma_min, n, dtype=torch.float64), final_zero)


def flow_time_shift(t: torch.Tensor | float, shift: float = 1.0, *, mu: float | None = None,
                    kind: str = "exponential") -> torch.Tensor:
    """The time shift of flow-matching samplers (Esser et al. 2024, Eq. 23): with a static ``shift``
    ``t' = shift t / (1 + (shift - 1) t)``; with dynamic shifting by resolution (FLUX) ``mu`` replaces it:
    ``kind="exponential"``: ``t' = e^mu / (e^mu + (1/t - 1))``, ``kind="linear"``: ``t' = mu / (mu + (1/t - 1))``
    (diffusers' ``time_shift_type``).  Float64; ``t`` in ``(0, 1]``."""
    t = torch.as_tensor(t, dtype=torch.float64)
    if mu is None:
        if not shift > 0:
            raise ValueError(f"shift must be > 0, got {shift}")
        return shift * t / (1 + (shift - 1) * t)
    if kind == "exponential":
        return math.exp(mu) / (math.exp(mu) + (1 / t - 1))
    if kind == "linear":
        return mu / (mu + (1 / t - 1))
    raise ValueError(f"unknown time shift kind {kind!r}; choose exponential or linear")


def _check(n: int, sigma_min: float, sigma_max: float) -> None:
    if n < 1:
        raise ValueError(f"number of steps must be >= 1, got {n}")
    if not (0 < sigma_min < sigma_max):
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")


def get_sigmas(schedule: str | Sequence[float] | torch.Tensor, steps: int, process: NoiseProcess, *,
               sigma_min: float | None = None, sigma_max: float | None = None, rho: float = 7.0) -> torch.Tensor:
    """Noise levels for ``steps`` solver steps: ``steps + 1`` values ending in 0.

    ``schedule`` is ``"karras"``, ``"logsnr"``, ``"time"`` or an explicit sequence of sigmas
    (validated and returned as is; ``steps`` is then ignored).
    """
    if not isinstance(schedule, str):
        return validate_sigmas(schedule)
    smin = process.sigma_min if sigma_min is None else sigma_min
    smax = process.sigma_max if sigma_max is None else sigma_max
    if schedule == "karras":
        s = karras_sigmas(steps, smin, smax, rho)
    elif schedule == "logsnr":
        s = logsnr_sigmas(steps, smin, smax)
    elif schedule == "time":
        s = time_sigmas(steps, process)
    else:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)} or pass sigmas")
    return validate_sigmas(s)
