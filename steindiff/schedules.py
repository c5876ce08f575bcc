"""Time-step schedules: decreasing noise levels ``sigma_0 > ... > sigma_{N-1} >= 0``.

Every schedule returns ``N + 1`` values for ``N`` steps, the last being ``0`` (the data) unless
``final_zero=False``.  Noise levels are VE (EDM) sigmas; see :mod:`steindiff.noise`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from .noise import DiscreteVPProcess, FlowProcess, NoiseProcess

__all__ = ["SCHEDULES", "get_sigmas", "karras_sigmas", "logsnr_sigmas", "time_sigmas", "validate_sigmas",
           "flow_time_shift", "flow_shift_mu", "FlowSchedule", "FLOW_GRIDS", "FLOW_SPACINGS", "FLOW_SHIFT_TYPES"]

SCHEDULES = ("karras", "logsnr", "time", "flow")


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


#: diffusers' ``time_shift_type``: how a dynamic (resolution) shift ``mu`` acts (:func:`flow_time_shift`).
FLOW_SHIFT_TYPES = ("exponential", "linear")


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
    raise ValueError(f"unknown time shift kind {kind!r}; choose {' or '.join(FLOW_SHIFT_TYPES)}")


def flow_shift_mu(image_seq_len: int, base_image_seq_len: int = 256, max_image_seq_len: int = 4096,
                  base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """The resolution shift ``mu`` of FLUX-style pipelines: linear in the number of latent tokens, ``base_shift``
    at ``base_image_seq_len`` and ``max_shift`` at ``max_image_seq_len`` (diffusers' ``calculate_shift``)."""
    m = (max_shift - base_shift) / (max_image_seq_len - base_image_seq_len)
    return float(image_seq_len * m + base_shift - m * base_image_seq_len)


FLOW_GRIDS = ("euler", "dpm", "unipc")
FLOW_SPACINGS = ("karras", "exponential", "beta")


@dataclass(frozen=True)
class FlowSchedule:
    """Where diffusers' flow-matching schedulers put their noise levels: flow times ``t`` from (about) 1 down,
    shifted.  ``times(n)`` reproduces ``scheduler.sigmas[:-1]`` (flow times, float64) for ``n`` steps of:

    - ``grid="euler"``: ``FlowMatchEulerDiscreteScheduler`` and ``FlowMatchHeunDiscreteScheduler``: ``u`` uniform
      from 1 to the smallest entry of the training table (``1/N``, shifted when the shift is static, so a static
      shift acts twice on it), then shifted; the first level is ``t = 1`` exactly;
    - ``grid="dpm"``: ``DPMSolverMultistepScheduler(use_flow_sigmas=True)``: ``u`` from ``1 - 1/N`` to
      ``(1 - 1/N)/n``, shifted by ``shift``, or by ``e^mu`` when ``mu`` is given;
    - ``grid="unipc"``: ``UniPCMultistepScheduler(use_flow_sigmas=True)``: ``u`` from 1 to ``1/N + (1 - 1/N)/n``.

    The shift (:func:`flow_time_shift`): static ``shift``, or with ``dynamic`` the resolution shift ``mu`` of
    kind ``shift_type`` (``exponential``, ``linear``), which the pipeline computes from the image size
    (:func:`flow_shift_mu`).  ``shift_terminal``: the levels stretched so that the last one is this value
    (LTX-Video).  ``spacing``: ``FlowMatchEulerDiscreteScheduler``'s ``use_karras_sigmas`` (Karras' rho = 7 on
    flow times), ``use_exponential_sigmas`` or ``use_beta_sigmas`` (Beta(0.6, 0.6) quantiles), applied to the
    shifted levels.  ``N = num_train_timesteps``.
    """

    shift: float = 1.0
    dynamic: bool = False
    mu: float | None = None
    shift_type: str = "exponential"
    shift_terminal: float | None = None
    grid: str = "euler"
    spacing: str | None = None
    num_train_timesteps: int = 1000

    def __post_init__(self) -> None:
        if not (isinstance(self.shift, (int, float)) and self.shift > 0):
            raise ValueError(f"shift must be a number > 0, got {self.shift!r}")
        if self.shift_type not in FLOW_SHIFT_TYPES:
            raise ValueError(f"unknown time_shift_type {self.shift_type!r}: diffusers knows "
                             f"{' and '.join(map(repr, FLOW_SHIFT_TYPES))}")
        if self.grid not in FLOW_GRIDS:
            raise ValueError(f"unknown flow grid {self.grid!r}; choose one of {', '.join(FLOW_GRIDS)}")
        if self.spacing is not None and self.spacing not in FLOW_SPACINGS:
            raise ValueError(f"unknown flow spacing {self.spacing!r}; choose one of {', '.join(FLOW_SPACINGS)}")
        if self.spacing is not None and self.grid != "euler":
            raise ValueError("Karras, exponential and beta spacings of flow times are "
                             "FlowMatchEulerDiscreteScheduler's (grid 'euler')")
        if self.shift_terminal is not None and not 0 < self.shift_terminal < 1:
            raise ValueError(f"shift_terminal must be in (0, 1), got {self.shift_terminal}")
        if int(self.num_train_timesteps) != self.num_train_timesteps or self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be an integer >= 2, got {self.num_train_timesteps}")
        if self.mu is not None and not math.isfinite(self.mu):
            raise ValueError(f"mu must be finite, got {self.mu}")
        if self.dynamic and self.shift_type == "linear" and self.mu is not None and not self.mu > 0:
            raise ValueError(f"a linear time shift needs mu > 0, got {self.mu}")

    def shifted(self, u: torch.Tensor | Sequence[float]) -> torch.Tensor:
        """The schedule's time shift of flow times ``u`` (float64), as ``set_timesteps`` applies it to its grid, or to
        the ``sigmas`` a pipeline passes (:func:`flow_time_shift`)."""
        return self._shift(u, inverse=False)

    def unshifted(self, t: torch.Tensor | Sequence[float]) -> torch.Tensor:
        """The inverse of :meth:`shifted`: every shift maps ``1/t - 1`` to ``(1/t - 1) / a`` (``a``: ``shift``,
        ``e^mu`` or ``mu``), undone by the inverse factor (``1/shift``, ``-mu`` exponential, ``1/mu`` linear)."""
        return self._shift(t, inverse=True)

    def _shift(self, u: torch.Tensor | Sequence[float], inverse: bool) -> torch.Tensor:
        u = torch.as_tensor(u, dtype=torch.float64)
        if self.grid == "dpm":  # DPM-Solver: a static shift, e^mu when mu is passed (exponential only)
            if self.mu is not None and self.shift_type != "exponential":
                raise ValueError("DPMSolverMultistepScheduler's mu needs time_shift_type='exponential', got "
                                 f"{self.shift_type!r}")
            a = math.exp(self.mu) if self.mu is not None else self.shift
            return flow_time_shift(u, 1 / a if inverse else a)
        if self.dynamic:
            if self.mu is None:
                raise ValueError("mu must be given when the scheduler config sets use_dynamic_shifting=True: the "
                                 "noise levels then depend on the image size (the pipeline passes mu to set_timesteps; "
                                 "pass mu=..., or image_seq_len=... to compute it from the image size, "
                                 "steindiff.schedules.flow_shift_mu)")
            mu = self.mu if not inverse else (-self.mu if self.shift_type == "exponential" else 1 / self.mu)
            return flow_time_shift(u, mu=mu, kind=self.shift_type)
        return flow_time_shift(u, 1 / self.shift if inverse else self.shift)

    def times(self, n: int) -> torch.Tensor:
        """The ``n`` flow times of ``n`` steps (decreasing, float64; the final ``t = 0`` not included)."""
        if n < 1:
            raise ValueError(f"number of steps must be >= 1, got {n}")
        N = self.num_train_timesteps
        if self.grid == "euler":
            last = 1 / N if self.dynamic else float(flow_time_shift(1 / N, self.shift))
            u = torch.linspace(1.0, last, n, dtype=torch.float64)
        elif self.grid == "dpm":
            u = (1 - torch.linspace(1.0, 1 / N, n + 1, dtype=torch.float64)).flip(0)[:-1]
        else:
            u = torch.linspace(1.0, 1 / N, n + 1, dtype=torch.float64)[:-1]
        t = self.shifted(u)
        if self.shift_terminal is not None:  # stretched so that the last level is shift_terminal
            if n < 2:
                raise ValueError("shift_terminal stretches the levels between t = 1 and the last one: it needs at "
                                 "least 2 steps")
            t = 1 - (1 - t) * (1 - self.shift_terminal) / (1 - t[-1])
        if self.spacing is not None:
            t = _respaced(t, n, self.spacing)
        if self.grid == "unipc" and abs(float(t[0]) - 1) < 1e-6:  # UniPC's own stand-in for t = 1
            t[0] -= 1e-6
        return t

    def sigmas(self, n: int, t_max: float) -> torch.Tensor:
        """VE noise levels of :meth:`times`, ending in 0, with ``t = 1`` (and anything at or above ``t_max``, e.g.
        UniPC's own stand-in ``1 - 1e-6``) at ``t_max``; only the first level may be there."""
        t = self.times(n).clone()
        if t[0] >= t_max:
            t[0] = t_max
        if len(t) > 1 and t[1] >= t_max:
            raise ValueError(f"the flow schedule's second level t = {float(t[1]):.9g} is at or above the process's "
                             f"t_max = {t_max:.9g}: use a process with a larger t_max (closer to 1) or fewer steps")
        return _append_zero(t / (1 - t), True)


def _respaced(t: torch.Tensor, n: int, spacing: str) -> torch.Tensor:
    """FlowMatchEulerDiscreteScheduler's ``_convert_to_karras/_exponential/_beta`` of flow times ``t``."""
    hi, lo = float(t[0]), float(t[-1])
    if spacing == "karras":
        return karras_sigmas(n, lo, hi, 7.0, final_zero=False) if n > 1 else t
    if spacing == "exponential":
        return torch.exp(torch.linspace(math.log(hi), math.log(lo), n, dtype=torch.float64))
    from scipy.stats import beta

    q = 1 - torch.linspace(0, 1, n, dtype=torch.float64)
    return torch.tensor([lo + float(beta.ppf(float(p), 0.6, 0.6)) * (hi - lo) for p in q], dtype=torch.float64)


def _check(n: int, sigma_min: float, sigma_max: float) -> None:
    if n < 1:
        raise ValueError(f"number of steps must be >= 1, got {n}")
    if not (0 < sigma_min < sigma_max):
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")


def get_sigmas(schedule: str | Sequence[float] | torch.Tensor, steps: int, process: NoiseProcess, *,
               sigma_min: float | None = None, sigma_max: float | None = None, rho: float = 7.0) -> torch.Tensor:
    """Noise levels for ``steps`` solver steps: ``steps + 1`` values ending in 0.

    ``schedule`` is ``"karras"``, ``"logsnr"``, ``"time"``, ``"flow"`` (a :class:`~steindiff.noise.FlowProcess`'s
    own shifted times, :class:`FlowSchedule`; ``sigma_min``/``sigma_max`` do not apply) or an explicit sequence
    of sigmas (validated and returned as is; ``steps`` is then ignored).
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
    elif schedule == "flow":
        if not isinstance(process, FlowProcess):
            raise ValueError(f"the 'flow' schedule (shifted flow times, as flow-matching pipelines step) needs a "
                             f"FlowProcess, got {process!r}")
        s = (process.schedule or FlowSchedule()).sigmas(steps, process.t_max)
    else:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)} or pass sigmas")
    return validate_sigmas(s)
