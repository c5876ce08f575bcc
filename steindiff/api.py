"""``steindiff.sample``: the sampling loop (:func:`steindiff.sampling.sample`) with stabilizers by name.

A stabilizer given as a string goes through :func:`steindiff.stabilizers.make_stabilizer`;
``"auto"``, when it is the calibrated sampler (:data:`steindiff.stabilizers.registry.AUTO`), takes the
trajectory calibration of this model, solver and noise levels from the cache, fitting it on first use
(:func:`steindiff.calibration.calibrated_plan`), and samples with its noise levels and gammas.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import torch

from .calibration import calibrated_plan, conditioning_digest
from .models.registry import ModelSpec
from .noise import FlowProcess, NoiseProcess, VEProcess
from .plan import SamplingPlan
from .sampling import SampleResult
from .sampling import sample as run_loop
from .schedules import validate_sigmas
from .solvers import Solver
from .stabilizers import Stabilizer, make_stabilizer, registry

__all__ = ["sample"]


def sample(model: Callable[..., torch.Tensor], x: torch.Tensor, sigmas: Sequence[float] | torch.Tensor,
           solver: str | Solver = "euler", *, stabilizer: Stabilizer | str | None = None,
           process: NoiseProcess | None = None, calibration_dir: str | os.PathLike | None = None,
           calibrate: bool = True, calibration_options: dict | None = None, **kwargs: Any) -> SampleResult:
    """Solve the PF-ODE from ``x`` down ``sigmas`` (see :func:`steindiff.sampling.sample` for ``kwargs``).

    ``stabilizer``: an object, ``None``, or a name (``"stein"``, ``"stein-energy"``, ``"auto"``, ...).
    With ``"auto"`` as the calibrated sampler the model must have a ``state_dict`` (its weights key the
    cache); ``process`` gives its noise range and prior (default: the model's own ``process`` when it is a
    :class:`~steindiff.noise.FlowProcess`, as a :class:`~steindiff.models.FlowDenoiser`'s is, else VE from the
    smallest positive sigma to ``sigmas[0]``), ``calibration_dir`` the cache (default
    ``$XDG_CACHE_HOME/steindiff/calibrations``), ``calibrate=False`` uses only what is cached, and
    ``calibration_options`` go to :func:`steindiff.calibration.calibrate` (e.g. ``{"n": 256, "max_seconds":
    30}``).  The calibration batch is drawn like ``x`` (same shape per sample, dtype and ``extra_args``).
    """
    if registry.resolves_to_calibrated(stabilizer):
        sig = validate_sigmas(sigmas)
        if process is None:
            own = getattr(model, "process", None)  # a flow model's prior is x_t ~ N(0, I): its own process
            process = own if isinstance(own, FlowProcess) else VEProcess(float(sig[sig > 0].min()), float(sig[0]))
        name = type(getattr(model, "_orig_mod", model)).__name__
        spec = ModelSpec(name=name, denoiser=model, process=process, sample_shape=tuple(x.shape[1:]))
        solver_name = solver if isinstance(solver, str) else solver.name
        base = SamplingPlan(solver_name, sig, "custom", solver_options=kwargs.get("solver_options") or {})
        extra = kwargs.get("extra_args")
        plan = calibrated_plan(spec, base, cache_dir=calibration_dir, calibrate_missing=calibrate,
                               dtype=x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32,
                               extra_args=extra, conditioning=conditioning_digest(extra), **(calibration_options or {}))
        sigmas, stabilizer = plan.sigmas, plan.stabilizer()
    elif isinstance(stabilizer, str):
        stabilizer = make_stabilizer(stabilizer)
    return run_loop(model, x, sigmas, solver, stabilizer=stabilizer, **kwargs)
