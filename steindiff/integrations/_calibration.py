"""A calibration handed to an integration, as the :class:`~steindiff.plan.SamplingPlan` it describes.

The calibrated sampler of :mod:`steindiff.calibration` produces a plan (fitted noise levels and one
``gamma_k`` per step of SteinDiff's rectified update, Alg. 1 with fixed ``gamma``), saved as a
``steindiff.gamma-schedule/1`` file.  The integrations accept any of the three forms and refuse one
that was made for another solve, naming what differs.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any

import torch

from ..plan import SamplingPlan
from ..schedules import validate_sigmas
from ..solvers import get_solver
from ..stabilizers.schedule import GammaSchedule, load_gamma_schedule

__all__ = ["as_plan", "check_plan", "canonical_solver", "refuse_with_stabilizer", "Calibration"]

#: What ``calibration=`` accepts.
Calibration = SamplingPlan | GammaSchedule | str | os.PathLike

def canonical_solver(name: str, options: dict | None = None) -> str:
    """The registry's name of the solver ``name`` with ``options`` configures (``ddim`` is ``euler``,
    ``unipc_bh2`` is ``unipc``, ``unipc`` with ``variant="bh1"`` is ``unipc_bh1``: :attr:`Solver.name`)."""
    return get_solver(name, **(options or {})).name


def refuse_with_stabilizer(calibration: Any, stabilizer: Any) -> None:
    """A calibration applies its own per-step gammas: refuse it together with a stabilizer."""
    if calibration is not None and stabilizer is not None:
        raise ValueError("pass either calibration or stabilizer, not both: a calibration applies its own per-step "
                         "gammas (its stabilizer)")


def as_plan(calibration: Any, *, solver: str, sigmas: torch.Tensor | None = None) -> SamplingPlan:
    """The plan of ``calibration``: a :class:`SamplingPlan` as is; a :class:`GammaSchedule` (or the path of
    a calibration JSON file, loaded with :func:`~steindiff.stabilizers.schedule.load_gamma_schedule`)
    with the noise levels it records (``meta["sigmas"]``), else ``sigmas``, and the solver it records,
    else ``solver``.  Raises TypeError for anything else and ValueError for a file that is not a
    calibration."""
    if isinstance(calibration, SamplingPlan):
        return calibration
    if isinstance(calibration, (str, os.PathLike)):
        calibration = load_gamma_schedule(calibration)
    if not isinstance(calibration, GammaSchedule):
        raise TypeError("calibration must be a SamplingPlan, a GammaSchedule or the path of a calibration file, "
                        f"got {type(calibration).__name__}")
    meta = calibration.meta
    recorded = meta.get("sigmas")
    if recorded is None and sigmas is None:
        raise ValueError("the gamma schedule records no noise levels (meta['sigmas']); pass sigmas")
    sig = torch.as_tensor(recorded if recorded is not None else sigmas, dtype=torch.float64)
    if len(sig) - 1 != len(calibration.gammas):
        raise ValueError(f"the gamma schedule has {len(calibration.gammas)} gammas but {len(sig) - 1} steps of "
                         "noise levels")
    return SamplingPlan(str(meta.get("solver") or solver), sig, str(meta.get("schedule") or "custom"),
                        list(calibration.gammas), calibration.coords, {}, {"name": calibration.name, **meta},
                        calibration.model_sigmas, calibration.history)


def check_plan(plan: SamplingPlan, sigmas: Any, *, solver: str, solver_options: dict | None = None,
               rtol: float = 1e-5, what: str = "sigmas") -> None:
    """Refuse ``plan`` for a solve of ``solver`` over ``sigmas`` when its solver, its number of steps or
    its ``sigma_max`` differs (each named, with both values).  Interior noise levels other than the
    ones it was calibrated from (``meta["base_sigmas"]``) only warn: the plan's own are used."""
    sig = validate_sigmas(sigmas)
    want, have = canonical_solver(solver, solver_options), canonical_solver(plan.solver, plan.solver_options)
    bad = []
    if want != have:
        bad.append(f"it was made for solver {plan.solver!r}, this is {solver!r}")
    if plan.steps != len(sig) - 1:
        bad.append(f"it has {plan.steps} steps, {what} has {len(sig) - 1}")
    s_plan, s_run = float(plan.sigmas[0]), float(sig[0])
    if not math.isclose(s_plan, s_run, rel_tol=rtol):
        bad.append(f"its sigma_max is {s_plan:.6g}, {what}[0] is {s_run:.6g}")
    if bad:
        raise ValueError("calibration does not match this solve: " + "; ".join(bad))
    base = plan.meta.get("base_sigmas")
    if base is not None and len(base) == len(sig):
        b = torch.as_tensor(base, dtype=torch.float64)  # sig is float64 (validate_sigmas)
        if not (torch.allclose(sig, b, rtol=1e-4, atol=1e-8) or torch.allclose(sig, plan.sigmas, rtol=1e-4, atol=1e-8)):
            warnings.warn(f"the calibration was made from other noise levels than {what} (same steps and sigma_max); "
                          "its own noise levels are used", stacklevel=3)
