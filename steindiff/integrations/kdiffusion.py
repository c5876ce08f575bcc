"""k-diffusion-style sampler functions over :func:`steindiff.sampling.sample`.

Drop-in for ``k_diffusion.sampling.sample_*``::

    x = sample_dpmpp_2m(model, noise * sigmas[0], sigmas, extra_args={"cond": c}, stabilizer=stab)

``model(x, sigma, **extra_args)`` is a VE denoiser (k-diffusion's convention); scaling the initial
noise by ``sigmas[0]`` is the caller's job, as in k-diffusion.  ``callback`` receives, once per step, a
dict with k-diffusion's keys: ``x`` (the state at ``sigma``, before the step), ``i``, ``sigma``,
``sigma_hat`` (equal to ``sigma``: these samplers add no churn) and ``denoised`` (the step's
denoised estimate).  ``disable``: ``None`` or ``True`` hides the progress bar, ``False`` shows it.
The functions return the final ``x`` in the input's dtype.  ``stabilizer`` and
solver options (``order``, ...) are steindiff's; these wrappers add nothing solver-specific.

``calibration``: a calibrated sampler (:mod:`steindiff.calibration`, issue 9) as a
:class:`~steindiff.plan.SamplingPlan`, a :class:`~steindiff.stabilizers.schedule.GammaSchedule` or
the path of a calibration JSON file.  The solve then runs over the calibration's noise levels with its
per-step ``gamma`` (SteinDiff's rectified update with fixed ``gamma``): exactly
``steindiff.sample(model, x, plan.sigmas, plan.solver, stabilizer=plan.stabilizer())``.  ``sigmas``
still says which solve is meant: a calibration whose number of steps, ``sigma_max`` or solver differs
is refused with a ValueError naming both values, and so is ``calibration`` together with ``stabilizer``.

Only deterministic sampling: k-diffusion's churn options are accepted at their neutral values
(``s_churn=0``, ``s_noise=1``, ...) and refused otherwise.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from ..sampling import sample
from ..schedules import validate_sigmas
from ..stabilizers import Stabilizer
from ._calibration import Calibration, as_plan, check_plan, refuse_with_stabilizer

__all__ = ["sample_euler", "sample_heun", "sample_dpmpp_2m", "sample_dpmpp_3m", "sample_unipc", "sample_ipndm"]

# k-diffusion's stochastic options and their neutral values
_NEUTRAL = {"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": math.inf, "s_noise": 1.0, "eta": 0.0, "noise_sampler": None}


def _run(solver: str, model: Callable[..., torch.Tensor], x: torch.Tensor, sigmas: Any, extra_args: dict | None,
         callback: Callable[[dict], None] | None, disable: bool | None, stabilizer: Stabilizer | None, options: dict,
         calibration: Calibration | None = None) -> torch.Tensor:
    for key in [k for k in options if k in _NEUTRAL]:
        v = options.pop(key)
        if v != _NEUTRAL[key] and not (key == "s_tmax" and v is None):
            raise ValueError(f"{key}={v!r} is not supported: steindiff samplers are deterministic (ODE) samplers")
    refuse_with_stabilizer(calibration, stabilizer)
    if calibration is not None:
        plan = as_plan(calibration, solver=solver, sigmas=validate_sigmas(sigmas))
        check_plan(plan, sigmas, solver=solver, solver_options=options)
        sigmas, stabilizer = plan.sigmas, plan.stabilizer()
    cb = None
    if callback is not None:
        state = {"x": x}

        def cb(info: dict) -> None:
            i = info["step"]
            sigma = sigmas[i] if isinstance(sigmas, torch.Tensor) else info["sigma"]
            callback({"x": state["x"], "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": info["denoised"]})
            state["x"] = info["x"]

    res = sample(model, x, sigmas, solver, stabilizer=stabilizer, extra_args=extra_args, callback=cb,
                 progress=not disable if disable is not None else False, solver_options=options)
    return res.x.to(x.dtype)


def _make(solver: str, label: str):
    def fn(model, x, sigmas, extra_args=None, callback=None, disable=None, *, stabilizer=None, calibration=None,
           **solver_options):
        return _run(solver, model, x, sigmas, extra_args, callback, disable, stabilizer, solver_options, calibration)

    fn.__name__ = fn.__qualname__ = f"sample_{solver}"
    fn.__doc__ = (f"{label}: ``(model, x, sigmas, extra_args=None, callback=None, disable=None, *, stabilizer=None, "
                  f"calibration=None, **solver_options) -> x``, k-diffusion's calling convention over steindiff solver "
                  f"``{solver}`` (``calibration``: see the module docstring).")
    return fn


sample_euler = _make("euler", "Euler (DDIM)")
sample_heun = _make("heun", "Heun (EDM 2nd order; 2 passes per step except a final step to 0)")
sample_dpmpp_2m = _make("dpmpp_2m", "DPM-Solver++(2M)")
sample_dpmpp_3m = _make("dpmpp_3m", "DPM-Solver++(3M)")
sample_unipc = _make("unipc", "UniPC (variant 'bh2' by default; pass variant='bh1' for bh1)")
sample_ipndm = _make("ipndm", "iPNDM")
