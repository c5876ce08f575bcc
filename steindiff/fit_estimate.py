"""How long a trajectory calibration will take on this machine, measured before it starts.

A trajectory fit (:func:`steindiff.trajectory.fit_trajectory`) is a fixed pattern of two kinds of work:

- the fine reference solve of the whole calibration batch of ``n``: ``ref_steps`` steps of ``ref_solver``,
  then ``ref_steps // 2`` more for its convergence check;
- solves of the plain plan on the fit half (``n_fit``; the validation half is the same size): one for the
  closed form and two to choose where the refinement starts; per refinement (two, each with half the
  budget) one plain solve, then up to ``max_solves // 2`` solves, stopped after ``max_seconds / 2`` (the
  second refinement adds a model pass to each, and one for the reference); four candidates and their
  residual-noise passes on the validation half.

:func:`estimate_fit` times the units on the model itself, at the real batch sizes (a couple of steps of the
reference solver on ``n`` samples, one plain solve and one model pass on ``n_fit``), and adds them up as
above.  The refinements are counted as if they used their whole budget, which they usually do; one that
converges earlier makes the fit shorter than the estimate.  With ``probe_seconds`` the measurement itself is
bounded: model passes on growing batches, stopped once they have taken that long, extended to the real batch
along a line through the two largest batches timed (its slope between no cost per sample and no fixed cost
per pass).

A gradient fit (``fit_method="gradient"``) is counted as the reference solve, then its Adam steps (at most
``max_iters`` per learning rate, each about 2.5 plain solves of a mini-batch, plus 3 model passes of it for a
feature distance and 3 for a residual-noise term; one fit per learning rate and parameter set, all within
``max_seconds``; with ``start="gits"``, GITS's cost matrix first: a model pass of the fit half per level of its
grid, and for a solver that evaluates the model at a step's end, such as ``heun``, one more per jump,
:func:`gits_passes`) and the validation.  Measured at NFE
5 with the L2 distance: within 1.7-1.8x above the real time on the digits U-Net; on a model whose passes cost
almost nothing (``gmm:image64``) the fixed per-step overhead dominates and the estimate is 0.4-0.7x of it.
"""

from __future__ import annotations

import inspect
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .device import exact_float32
from .gradient_fit import DEFAULT_LRS as GRADIENT_LRS
from .gradient_fit import check_param_sets, gradient_fit
from .models.registry import ModelSpec
from .peers.gits import DEFAULT_LEVELS as GITS_LEVELS
from .plan import SamplingPlan
from .sampling import prior_noise, sample, steps
from .schedules import logsnr_sigmas
from .solvers import get_solver
from .trajectory import fit_trajectory

__all__ = ["FitEstimate", "estimate_fit", "fit_seconds", "describe_seconds"]

#: The fraction of the calibration batch that validates (:func:`~steindiff.trajectory.fit_trajectory`'s default).
_VALIDATION = inspect.signature(fit_trajectory).parameters["validation"].default
_GRADIENT_DEFAULTS = inspect.signature(gradient_fit).parameters
GRADIENT_BATCH = _GRADIENT_DEFAULTS["batch_size"].default
GRADIENT_ITERS = _GRADIENT_DEFAULTS["max_iters"].default
#: Repeat a timed unit until it has run this long in total (or 5 times): short units are noisy.
_MIN_TIMED_S = 0.1


@dataclass
class FitEstimate:
    """The estimated wall time of a trajectory fit (``seconds``) and what it was computed from: the time of
    one step of the reference solver on the whole batch of ``n`` (``ref_step_s``), of one plain solve and of
    one model pass on the fit half (``solve_s``, ``pass_s``).  ``measured``: timed at those batch sizes (else
    scaled from model passes on a batch of ``batch``).  ``probe_s``: what the measurement took."""

    seconds: float
    ref_step_s: float
    solve_s: float
    pass_s: float
    n: int
    batch: int
    measured: bool
    probe_s: float

    def __str__(self) -> str:
        return describe_seconds(self.seconds)


def describe_seconds(s: float) -> str:
    """A duration as a person reads it: ``about 40 s``, ``about 9 min``, ``about 2.5 h``."""
    if not math.isfinite(s):
        return "an unknown time"
    if s < 90:
        return f"about {max(s, 1):.0f} s"
    if s < 90 * 60:
        return f"about {s / 60:.0f} min"
    return f"about {s / 3600:.1f} h"


def gits_passes(solver: str, levels: int = GITS_LEVELS) -> float:
    """Model passes per sample of GITS's cost matrix on a grid of ``levels`` noise levels above 0
    (:func:`steindiff.peers.gits.gits_cost_matrix`): one per level, and for a solver with a pass at the step's
    end (``heun``) one more per jump between two levels above 0, ``levels (levels - 1) / 2`` of them."""
    end_passes = get_solver(solver).nfe([2.0, 1.0]) - 1
    return levels + end_passes * levels * (levels - 1) / 2


def fit_seconds(options: dict[str, Any], *, ref_step_s: float, solve_s: float, pass_s: float,
                solver: str = "euler") -> float:
    """The fit's duration from the time of its units (module docstring); ``options`` as resolved by
    :func:`steindiff.calibration.calibration_options`; ``solver``: the solver being fitted (it sets the model
    passes of GITS's cost matrix, :func:`gits_passes`)."""
    ref_steps, max_solves, max_seconds = int(options["ref_steps"]), int(options["max_solves"]), options["max_seconds"]
    reference = (ref_steps + ref_steps // 2) * ref_step_s
    validation = 4 * (solve_s + pass_s) + pass_s
    gradient = options.get("gradient")
    if gradient is not None:
        # Adam steps on mini-batches of the fit half's first half (the rest early-stops): a forward and a
        # backward through the solve, 2.5 solves' work per sample (measured on the digits U-Net and gmm:image64:
        # unipc NFE 5, 30 and 100 steps); one fit per learning rate
        g = gradient.get("gradient_options") or {}
        lrs = g.get("lr", GRADIENT_LRS)
        fits = (1 if isinstance(lrs, (int, float)) else len(lrs)) * len(check_param_sets(gradient["params"]))
        n_fit = max(int(options["n"]) * (1 - _VALIDATION), 1)
        batch = min(int(g.get("batch_size", GRADIENT_BATCH)), n_fit / 2)
        per_iter = 2.5 * solve_s * batch / n_fit
        # a feature distance and the residual-noise term each run a network on the samples, forward and
        # backward: about 3 model passes of the mini-batch per Adam step (a feature function cheaper than the
        # model, which is not timed here, makes this an overestimate)
        extra_passes = 3 * ((gradient.get("loss") == "features") + (float(gradient.get("residual_weight") or 0) > 0))
        per_iter += extra_passes * pass_s * batch / n_fit
        iters = fits * int(g.get("max_iters", GRADIENT_ITERS))
        fit = iters * per_iter * 1.2  # and the held-out solves every few steps
        if max_seconds is not None:
            fit = min(fit, float(max_seconds) + per_iter)
        if gradient.get("start") == "gits":  # GITS's cost matrix, on the fit half as pass_s is
            fit += gits_passes(solver) * pass_s
        return reference + fit + 2 * (solve_s + pass_s) + pass_s
    per_refinement = max(max_solves // 2, 1)
    refine = 0.0
    # on the distance alone; with the residual-noise term (a model pass per solve, and one for the reference)
    for unit, extra in ((solve_s, 0.0), (solve_s + pass_s, pass_s)):
        budget = per_refinement * unit if max_seconds is None else min(per_refinement * unit,
                                                                       float(max_seconds) / 2 + unit)
        refine += solve_s + extra + budget
    closed_form = 3 * solve_s
    return reference + closed_form + refine + validation


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device, min_total: float = _MIN_TIMED_S, max_reps: int = 5) -> float:
    """Mean seconds of one call of ``fn``, repeated until it has run ``min_total`` seconds or ``max_reps`` times."""
    total, reps = 0.0, 0
    while reps == 0 or (total < min_total and reps < max_reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        total += time.perf_counter() - t0
        reps += 1
    return total / reps


def _step_time(model: Callable[..., torch.Tensor], x: torch.Tensor, sigmas: torch.Tensor, solver: Any,
               extra_args: dict, device: torch.device, min_total: float = _MIN_TIMED_S, max_steps: int = 8) -> float:
    """Seconds per step of a solve, from the first steps of one (after its first: set-up is excluded), until
    they have run ``min_total`` seconds (at least 2 steps, at most ``max_steps``)."""
    stamps = []
    for i, _ in enumerate(steps(model, x, sigmas[:max_steps + 2], solver, extra_args=extra_args)):
        _sync(device)
        stamps.append(time.perf_counter())
        if i >= 2 and stamps[-1] - stamps[0] >= min_total or i > max_steps:
            break
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1)


def _rows(extra: dict | None, b: int) -> dict:
    """The first ``b`` rows of per-sample conditioning."""
    return {k: (v[:b] if isinstance(v, torch.Tensor) and v.ndim > 0 else v) for k, v in (extra or {}).items()}


@exact_float32()
def estimate_fit(spec: ModelSpec, base: SamplingPlan, options: dict[str, Any], *, extra_args: dict | None = None,
                 probe_seconds: float | None = None, precise_below: float | None = None) -> FitEstimate:
    """Measure, on ``spec``'s model and device, how long a trajectory calibration of ``base`` with ``options``
    (resolved by :func:`steindiff.calibration.calibration_options`) will take (module docstring).

    ``extra_args``: the calibration batch's conditioning (per-sample tensors with ``n`` rows).  ``probe_seconds``
    bounds the model passes on growing batches (``None``: up to the whole batch; beyond the largest batch timed,
    a pass is extrapolated along a line through the two largest).  The units themselves (steps of the reference
    solver, a plain solve) are then timed, unless the passes stopped short of the whole batch or the estimate from
    them is at least ``precise_below`` (``None``: no such limit): then the estimate from passes is kept."""
    t_start = time.perf_counter()
    n = int(options["n"])
    n_fit = max(int(round(n * (1 - _VALIDATION))), 1)
    dtype = getattr(torch, options["dtype"])
    device = torch.device(spec.device or "cpu")
    sigma_max, sigma_min = float(base.sigmas[0]), float(spec.process.sigma_min)
    noise = prior_noise((n, *spec.sample_shape), sigma_max, spec.process, seed=options["seed"], dtype=dtype,
                        device=device)
    model = spec.denoiser
    ref_sigmas = logsnr_sigmas(int(options["ref_steps"]), sigma_min, sigma_max)
    sigma = float(ref_sigmas[len(ref_sigmas) // 2])

    def one_pass(b: int) -> None:
        with torch.no_grad():
            model(noise[:b], torch.full((b,), sigma, dtype=dtype, device=device), **_rows(extra_args, b))

    one_pass(1)  # warm-up: lazy initialisation, first allocations
    # unbounded, the units are timed below: one pass on the fit half is all that is needed here
    sizes = [n_fit] if probe_seconds is None else \
        sorted({max(1, math.ceil(n / 2 ** k)) for k in range(0, max(n.bit_length() - 2, 1))})
    times: dict[int, float] = {}
    for b in sizes:
        times[b] = _timed(lambda: one_pass(b), device)
        if probe_seconds is not None and time.perf_counter() - t_start > probe_seconds:
            break
    batch = max(times)

    def at(b: int) -> float:
        """A pass on ``b`` samples: timed, else a line through the two largest batches timed, its slope between
        0 (the batch is free) and the largest batch's time per sample (no fixed cost per pass)."""
        if b in times:
            return times[b]
        t2, smaller = times[batch], [k for k in times if k < batch]
        slope = t2 / batch
        if smaller:
            b1 = max(smaller)
            slope = min(max((t2 - times[b1]) / (batch - b1), 0.0), slope)
        return t2 + slope * (b - batch)

    t_full, t_fit = at(n), at(n_fit)
    ref_solver = get_solver(options["ref_solver"])
    passes_per_ref_step = ref_solver.nfe(ref_sigmas) / (len(ref_sigmas) - 1)
    est = FitEstimate(fit_seconds(options, ref_step_s=t_full * passes_per_ref_step, solve_s=t_fit * base.nfe,
                                  pass_s=t_fit, solver=base.solver),
                      t_full * passes_per_ref_step, t_fit * base.nfe, t_fit, n, batch, False, 0.0)
    if (probe_seconds is None or batch == n) and (precise_below is None or est.seconds < precise_below):
        # the units themselves, with the solvers' own overhead: steps of the reference solve, one plain solve;
        # first what the fit imports on first use (seconds on a loaded machine: spent here, not in the fit)
        import scipy.optimize  # noqa: F401
        import scipy.stats  # noqa: F401

        extra_n, extra_fit = _rows(extra_args, n), _rows(extra_args, n_fit)
        ref_step_s = _step_time(model, noise, ref_sigmas, ref_solver, extra_n, device)
        solve_s = _timed(lambda: sample(model, noise[:n_fit], base.sigmas, base.get_solver(), extra_args=extra_fit),
                         device)
        est = FitEstimate(fit_seconds(options, ref_step_s=ref_step_s, solve_s=solve_s, pass_s=t_fit,
                                      solver=base.solver),
                          ref_step_s, solve_s, t_fit, n, n, True, 0.0)
    est.probe_s = time.perf_counter() - t_start
    return est
