"""Sampling plans: which solver runs over which noise levels, with which per-step ``gamma``.

A plan is everything a few-step solve needs beyond the model and the initial noise: the solver,
the ``N + 1`` noise levels and, for a calibrated sampler, one ``gamma_k`` per step of the rectified
update ``x_{k+1} = x_k - gamma_k (x_k - T(x_k))`` (SteinDiff, Alg. 1, with a fixed ``gamma``), and
optionally the noise level the model is given at each level (``model_sigmas``) and per-step corrections
over the past denoised outputs (``history``), both applied by :class:`~steindiff.stabilizers.schedule.GammaSchedule`
with no extra model pass.
:func:`make_plan` is the one place where a model-pass budget becomes noise levels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from .noise import NoiseProcess
from .schedules import get_sigmas, validate_sigmas
from .solvers import Solver, get_solver, steps_for_nfe
from .stabilizers.schedule import GammaSchedule

__all__ = ["SamplingPlan", "make_plan"]


@dataclass
class SamplingPlan:
    """A solver over ``sigmas`` (``N + 1`` values ending in 0), with optional per-step ``gammas``.

    ``schedule`` names the time schedule the sigmas came from (``"fitted"`` when a calibration moved
    them, ``"custom"`` for user sigmas).  ``gammas = None`` is the plain solver.  ``model_sigmas`` (one per
    step) and ``history`` (one list of coefficients per step) are the optional parameters of
    :class:`~steindiff.stabilizers.schedule.GammaSchedule`; ``None`` leaves them out.
    """

    solver: str
    sigmas: torch.Tensor
    schedule: str = "custom"
    gammas: list[float] | None = None
    coords: str = "ve"
    solver_options: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    model_sigmas: list[float] | None = None
    history: list[list[float]] | None = None

    def __post_init__(self) -> None:
        self.sigmas = validate_sigmas(self.sigmas)
        if self.gammas is not None and len(self.gammas) != self.steps:
            raise ValueError(f"plan has {self.steps} steps but {len(self.gammas)} gammas")
        if self.model_sigmas is not None or self.history is not None:  # checked as the schedule checks them
            GammaSchedule([1.0] * self.steps, self.coords, model_sigmas=self.model_sigmas, history=self.history)

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    def get_solver(self) -> Solver:
        return get_solver(self.solver, **self.solver_options)

    @property
    def nfe(self) -> int:
        """Model passes per sample of one solve."""
        return self.get_solver().nfe(self.sigmas)

    def stabilizer(self) -> GammaSchedule | None:
        """The per-step parameters this plan applies (``None``: the plain solver: no ``model_sigmas``, no
        ``history`` and every ``gamma`` 1)."""
        sched = GammaSchedule(self.gammas or [1.0] * self.steps, self.coords,
                              {"name": self.meta.get("name", "calibrated")}, model_sigmas=self.model_sigmas,
                              history=self.history)
        if not sched.requires and all(g == 1.0 for g in sched.gammas):
            return None
        return sched


def make_plan(process: NoiseProcess, solver: str, nfe: int, schedule: str = "karras", *, rho: float = 7.0,
              sigmas: Sequence[float] | torch.Tensor | None = None, solver_options: dict | None = None) -> SamplingPlan:
    """The plain plan for ``solver`` within ``nfe`` model passes per sample: the largest number of
    steps that fits the budget, on ``schedule`` (``karras``, ``logsnr``, ``time``) between the
    process's noise range, ending at 0.  ``sigmas`` overrides the schedule (validated as is)."""
    if isinstance(rho, bool) or not rho > 0:
        raise ValueError(f"rho must be > 0, got {rho!r}")
    opts = dict(solver_options or {})
    if sigmas is None:
        steps = steps_for_nfe(get_solver(solver, **opts), nfe)
        sigmas = get_sigmas(schedule, steps, process, rho=rho)
        return SamplingPlan(solver, sigmas, schedule, solver_options=opts)
    return SamplingPlan(solver, sigmas, "custom", solver_options=opts)
