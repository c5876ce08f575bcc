"""``steindiff.sample``: the sampling loop (:func:`steindiff.sampling.sample`) with stabilizers by name.

A stabilizer given as a string goes through :func:`steindiff.stabilizers.make_stabilizer`;
``"auto"``, when it is the calibrated sampler (:data:`steindiff.stabilizers.registry.AUTO`), takes the
trajectory calibration of this model, solver and noise levels from the cache, fitting it on first use when the
fit is quick (:func:`steindiff.calibration.calibrated_plan`), and samples with its noise levels and gammas.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import torch

from .calibration import QUICK_FIT_SECONDS, calibrated_plan, conditioning_digest
from .models.registry import ModelSpec
from .noise import NoiseProcess
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
           calibrate: bool | str = "if-quick", quick_fit_seconds: float = QUICK_FIT_SECONDS,
           calibration_options: dict | None = None, fingerprint: str | None = None,
           notice: Callable[[str], None] | None = None, **kwargs: Any) -> SampleResult:
    """Solve the PF-ODE from ``x`` down ``sigmas`` (see :func:`steindiff.sampling.sample` for ``kwargs``).

    ``stabilizer``: an object, ``None``, or a name (``"stein"``, ``"stein-energy"``, ``"auto"``, ...).
    With ``"auto"`` as the calibrated sampler the calibration of this model, solver and noise levels is
    taken from the model's shipped calibrations or the cache, or fitted now and cached
    (:func:`steindiff.calibration.calibrated_plan`).  Then ``process`` is the model's noise process (taken
    from ``model.process`` when it has one, e.g. :class:`~steindiff.models.VPDenoiser`; else required: the
    calibration noise is drawn from it), ``calibration_dir`` the cache (default
    ``$XDG_CACHE_HOME/steindiff/calibrations``), ``calibrate`` says when a missing calibration is fitted:
    ``"if-quick"`` (the default) only when estimated, on this machine, to take at most ``quick_fit_seconds``
    (default :data:`steindiff.calibration.QUICK_FIT_SECONDS`, 30 s), else the plain solver with a notice of how
    long the fit would take; ``"always"`` (or ``True``); ``"never"`` (or ``False``) uses only what is shipped or
    cached; ``calibration_options`` go to :func:`steindiff.calibrate` (e.g. ``{"n": 256, "max_seconds": 30}``; defaults:
    :data:`steindiff.calibration.CALIBRATION_DEFAULTS`, the same as every other entry point), ``fingerprint``
    names the model where its contents cannot be read (:func:`steindiff.calibration.model_fingerprint`), and
    ``notice`` receives the calibration's one-line messages (a fit starting, with its estimated time; a fit not
    started, with the way to start it; a cached file not used; default: warnings, and silence before a fit).
    The calibration batch is drawn like ``x`` (same shape per sample and ``extra_args``).
    """
    if registry.resolves_to_calibrated(stabilizer):
        sig = validate_sigmas(sigmas)
        process = process if process is not None else getattr(model, "process", None)
        if not isinstance(process, NoiseProcess):
            raise ValueError("stabilizer='auto' calibrates the model from its own prior noise, so it needs the model's "
                             "noise process: pass process= (e.g. steindiff.VEProcess(sigma_min, sigma_max) for a "
                             "k-diffusion-style VE denoiser, the DiscreteVPProcess of a VP model)")
        name = type(getattr(model, "_orig_mod", model)).__name__
        spec = ModelSpec(name=name, denoiser=model, process=process, sample_shape=tuple(x.shape[1:]),
                         fingerprint=fingerprint)
        solver_name = solver if isinstance(solver, str) else solver.name
        base = SamplingPlan(solver_name, sig, "custom", solver_options=kwargs.get("solver_options") or {})
        extra = kwargs.get("extra_args")
        plan = calibrated_plan(spec, base, cache_dir=calibration_dir, calibrate_missing=calibrate,
                               quick_fit_seconds=quick_fit_seconds, extra_args=extra,
                               conditioning=conditioning_digest(extra), notice=notice,
                               fit_command="pass calibrate='always' to steindiff.sample",
                               **(calibration_options or {}))
        sigmas, stabilizer = plan.sigmas, plan.stabilizer()
    elif isinstance(stabilizer, str):
        stabilizer = make_stabilizer(stabilizer)
    return run_loop(model, x, sigmas, solver, stabilizer=stabilizer, **kwargs)
