"""Calibrate a sampler once, sample for free (:mod:`steindiff.stabilizers.schedule`).

Three objectives:

- ``trajectory`` (default): SteinDiff's closed-form step scale aimed at the probability-flow ODE's own
  solution, refined on the final samples, with the interior noise levels optionally fitted too
  (:mod:`steindiff.trajectory`).  Needs only the model: no data, no training.  ``fit_method="gradient"``
  fits it by backpropagation through the few-step solve instead (:mod:`steindiff.gradient_fit`), with more
  parameters to choose from (the model's own noise levels, history corrections).
- ``variant``: run a stabilizer variant (``stein-energy``, ``stein``, ...) on a calibration batch and
  keep its per-step ``gamma`` (averaged over calibration batches);
- ``reference``: with reference data the user already has (held out from any evaluation data),
  choose ``gamma_k`` by coordinate search to minimize the sliced Wasserstein-2 distance between the
  calibration batch's samples and the reference.  This uses data; it is labelled as such in the file.

:func:`calibrated_plan` is what ``--stabilizer auto`` runs: the shipped or cached trajectory calibration of a
(model, solver, schedule, NFE), fitted on first use when that is quick (:data:`CALIBRATE_WHEN`).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import inspect
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .fingerprint import AmbiguousIdentity, fingerprint
from .fit_estimate import FitEstimate, estimate_fit
from .generate import generate
from .gradient_fit import (
    DEFAULT_PARAMS,
    DEFAULT_START,
    FIT_METHODS,
    LOSSES,
    check_param_sets,
    describe_loss,
    fit_trajectory_gradient,
    params_record,
)
from .io import check_writable
from .metrics import sliced_w2
from .models.registry import ModelSpec
from .plan import SamplingPlan, make_plan
from .sampling import prior_noise
from .stabilizers import make_stabilizer
from .stabilizers.schedule import GammaSchedule, load_gamma_schedule
from .trajectory import DEFAULT_GUARDS, FIT_MODES, ReferenceSolve, check_guards, fit_trajectory

__all__ = ["calibrate", "calibrated_plan", "calibration_key", "calibration_options", "cache_file",
           "conditioning_digest", "default_cache_dir", "default_guards", "GRADIENT_GUARDS", "plan_from_schedule",
           "OBJECTIVES",
           "model_fingerprint", "CALIBRATION_SEED", "CALIBRATION_DEFAULTS", "CALIBRATE_WHEN", "QUICK_FIT_SECONDS",
           "calibrate_when", "stamp_fit", "list_calibrations", "options_summary",
           "gradient_fit_options"]

OBJECTIVES = ("trajectory", "variant", "reference")
#: Default seed of the calibration noise: far from the evaluation seeds (0, 1, 2, ...) of the benchmarks.
CALIBRATION_SEED = 12345
#: The defaults of every way to calibrate (:func:`calibrate`, :func:`calibrated_plan`, ``sample(stabilizer="auto")``,
#: ``steindiff calibrate``, ``--stabilizer auto``, the diffusers and k-diffusion bridges), for the options a model
#: may set for itself in ``spec.info["calibration_defaults"]`` (the shipped models do: the options their shipped
#: calibrations were fitted with).  ``n``: 512 for the trajectory objective (half of it validates), 1000 otherwise;
#: ``guards``: :func:`default_guards`.  Every other option's default is in :func:`calibrate`'s signature.
CALIBRATION_DEFAULTS: dict[str, Any] = {"n": None, "dtype": "float32", "ref_solver": "dpmpp_2m", "ref_steps": 200,
                                        "max_solves": 200, "max_seconds": 60.0, "guards": None}
#: The gradient fit's guards when none are named (:func:`default_guards`): the residual check with no margin over
#: the plain solver's deviation, and the mode histograms within 0.02 total variation of plain's.  Chosen by
#: ``benchmarks/guards_study.py --fit-method gradient`` (docs/guards.md, 238 cells on five models driven as opaque
#: callables): the guard set with the most cells better than plain among those that keep hidden trades to at
#: most 5% of the cells on every model where any set can (all but digits).  The derivative-free fit's guards
#: left 15 trades (7 of 72 ``gmm:image64`` cells); these leave 7 (3 of 72), and 153 cells better than plain
#: instead of 165.  The residual check is waived for a candidate that dominates plain after one more
#: denoising pass (``dominance=4``: its ``denoised`` distance at most a quarter of plain's,
#: :func:`~steindiff.trajectory.passes_guard`): where plain is far off, its residual level can sit near the
#: reference's by chance, and the check kept plain plans with digits-FID 6.6-12.8 against candidates at 0.8-1.2,
#: better on every digits metric (``benchmarks/guard_rejections.py``).  3 and 4 add no hidden trade in the same
#: studies (2 adds 8); on the ``gmm:image64`` bench grid from GITS's levels 3 let two NLL trades of ``euler``
#: through (at ratios 3.0 and 3.4), so 4.  The mode check is not waived: waived too, it let ``heun``'s
#: mode-collapsed two-step plans replace a plain plan that scored better on digits-FID (15 against 27-30).
GRADIENT_GUARDS = ("residual:margin=0:dominance=4", "modes:tolerance=0.02", "distribution", "significance")
#: When a missing calibration is fitted (``calibrated_plan(calibrate_missing=)``, ``sample(calibrate=)``,
#: ``--calibrate``): ``always``; ``if-quick``, the default everywhere: only when estimated to take at most
#: :data:`QUICK_FIT_SECONDS` on this machine (else the plain solver, and the command that fits it); ``never``.
CALIBRATE_WHEN = ("always", "if-quick", "never")
#: The longest fit that ``if-quick`` starts unasked, in seconds (``quick_fit_seconds=``, ``--quick-fit-seconds``).
QUICK_FIT_SECONDS = 30.0
# what calibrate() takes that does not change its result, or that the plan and the key record elsewhere
# the gradient fit's options: one normalised entry in the key, and none for the derivative-free fit
_GRADIENT_OPTIONS = ("fit_method", "params", "loss", "features", "residual_weight", "teacher_ball", "gradient_options")
_NOT_OPTIONS = {"spec", "plan", "solver", "nfe", "schedule", "rho", "coords", "progress", "ref", "extra_args",
                "reference", "batch_size", "jacobian_batch"}


def _hash_value(h: "hashlib._Hash", v: Any) -> None:
    """Feed one conditioning value to a hash: a tensor by dtype, shape and bytes (any dtype), else its repr."""
    if isinstance(v, torch.Tensor):
        t = v.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    else:
        h.update(repr(v).encode())


def conditioning_digest(cond: dict | None) -> str | None:
    """A short hash of conditioning values by name (class labels, prompt embeddings, ...): the part of a
    calibration's cache key that says what the model was conditioned on (``None`` when unconditioned)."""
    if not cond:
        return None
    h = hashlib.sha256()
    for k in sorted(cond):
        h.update(k.encode())
        _hash_value(h, cond[k])
    return h.hexdigest()[:16]


def model_fingerprint(spec: ModelSpec) -> str:
    """What a calibration cache knows a model by: a hash of the model's contents
    (:func:`steindiff.fingerprint.fingerprint`: weights, buffers, attributes, a function's code and closure),
    or of ``spec.fingerprint`` when the user gives one, with its noise process and sample shape.

    Raises :class:`~steindiff.fingerprint.AmbiguousIdentity` (a ``ValueError``) naming ``fingerprint=`` and
    ``--model-name`` when the model's contents cannot be read."""
    if spec.fingerprint is not None:
        ident = f"user:{spec.fingerprint}"
    else:
        try:
            ident = fingerprint(spec.denoiser)
        except AmbiguousIdentity as e:
            raise AmbiguousIdentity(f"cannot fingerprint model {spec.name!r}: {e}; give it an identity of your own "
                                    "(fingerprint= in Python: ModelSpec(..., fingerprint='my-model-v1') or "
                                    "sample(..., fingerprint=...); --model-name on the command line)") from None
    h = hashlib.sha256(ident.encode())
    h.update(fingerprint(spec.process).encode())
    h.update(repr(tuple(spec.sample_shape)).encode())
    return h.hexdigest()[:16]


def _tile_batch(extra: dict | None, n: int) -> dict | None:
    """Per-sample conditioning (tensors with a batch dimension) cycled to the calibration batch of ``n``:
    the calibration sees the user's labels or prompts in the user's proportions."""
    if not extra:
        return extra
    out = {}
    for k, v in extra.items():
        if isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] != n:
            v = v[torch.arange(n, device=v.device) % v.shape[0]]
        out[k] = v
    return out


def calibrate(
    spec: ModelSpec,
    plan: SamplingPlan | None = None,
    *,
    solver: str = "dpmpp_2m",
    nfe: int = 10,
    schedule: str = "karras",
    coords: str = "ve",
    objective: str | None = None,
    fit: str = "both",
    variant: str | None = None,
    n: int | None = None,
    seed: int = CALIBRATION_SEED,
    batch_size: int | None = None,
    reference: torch.Tensor | None = None,
    grid: tuple[float, float, float] = (0.5, 1.5, 0.1),
    sweeps: int = 2,
    probes: int = 5,
    dtype: torch.dtype | str | None = None,
    progress: bool = False,
    rho: float = 7.0,
    ref_solver: str | None = None,
    ref_steps: int | None = None,
    ref: ReferenceSolve | None = None,
    max_solves: int | None = None,
    max_seconds: float | None = None,
    guards: Sequence[str] | None = None,
    extra_args: dict | None = None,
    jacobian_batch: int | None = None,
    jacobian_precision: str = "fp32",
    fit_method: str = "derivative-free",
    params: str | Sequence[str] | None = None,
    loss: str = "l2",
    features: Callable[[torch.Tensor], torch.Tensor] | None = None,
    residual_weight: float = 0.0,
    teacher_ball: float = 0.0,
    gradient_options: dict | None = None,
) -> GammaSchedule:
    """A :class:`GammaSchedule` for the plain ``plan`` (default: :func:`~steindiff.plan.make_plan` of
    ``solver``, ``nfe``, ``schedule``, ``rho``; module docstring).  ``seed`` draws the calibration noise;
    use one not used for evaluation.

    ``objective``: ``trajectory``, ``variant`` or ``reference``.  Default: ``trajectory``, unless
    ``variant`` is given (a stabilizer name: ``variant``; ``"reference"``: ``reference``).  ``n``: calibration batch
    (default 512 for ``trajectory``, half of it validates; 1000 otherwise).  Trajectory options:
    ``fit`` (``gamma``, ``steps`` or ``both``), ``ref_solver``/``ref_steps`` (the fine solve),
    ``ref`` (a reference solve of the same noise to reuse), ``max_solves``/``max_seconds`` (budget of
    the refinement), ``guards`` (the checks a candidate must pass, :data:`~steindiff.trajectory.GUARDS`;
    default :func:`default_guards`), ``extra_args`` (conditioning of the calibration batch, e.g. class labels).
    Options left at ``None`` take :data:`CALIBRATION_DEFAULTS`, or the model's own defaults
    (``spec.info["calibration_defaults"]``): :func:`calibration_options` resolves them, for every entry point.
    ``fit_method``: ``derivative-free`` (default: finite differences of whole solves, any model) or ``gradient``
    (:func:`~steindiff.gradient_fit.fit_trajectory_gradient`, a differentiable model), which takes ``params``
    (from :data:`~steindiff.gradient_fit.PARAMS`, default :data:`~steindiff.gradient_fit.DEFAULT_PARAMS`; several
    sets compete as candidates, :func:`~steindiff.gradient_fit.check_param_sets`), ``loss``
    (``l2``, or ``features`` with a ``features(x) -> tensor`` function), ``residual_weight``, ``teacher_ball`` (soft
    teacher forcing) and ``gradient_options`` (``lr``, ``batch_size``, ``max_iters``, ...); its teacher is
    ``ref_solver``/``ref_steps`` and its time budget ``max_seconds``.
    Runs on the model's device (:meth:`ModelSpec.to`); ``jacobian_batch`` bounds the variant's Jacobian passes and
    ``jacobian_precision`` sets their precision (:class:`~steindiff.stabilizers.GammaStabilizer`).
    The model's identity (:func:`model_fingerprint`) is checked before any work.
    """
    if objective is None:
        objective = "trajectory" if variant is None else ("reference" if variant == "reference" else "variant")
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
    variant = variant or "stein-energy"
    fingerprint_ = model_fingerprint(spec)  # an unidentifiable model is refused before any work
    o = calibration_options(spec, objective=objective, n=n, dtype=dtype, ref_solver=ref_solver, ref_steps=ref_steps,
                            max_solves=max_solves, max_seconds=max_seconds, guards=guards,
                            fit_method=fit_method)
    n, dtype = o["n"], getattr(torch, o["dtype"])
    base = plan if plan is not None else make_plan(spec.process, solver, nfe, schedule, rho=rho)
    if base.coords != coords:  # the coordinates of the rescaled update are part of the plan
        base = dataclasses.replace(base, coords=coords)
    meta: dict[str, Any] = {
        "model": spec.name, "solver": base.solver, "schedule": base.schedule, "nfe": base.nfe,
        "sigmas": [float(s) for s in base.sigmas], "base_sigmas": [float(s) for s in base.sigmas],
        "objective": objective, "variant": variant if objective == "variant" else objective,
        "fingerprint": fingerprint_, "calibration": {"n": n, "seed": seed, "dtype": o["dtype"],
                                                     "uses_reference_data": objective == "reference"},
    }
    if fit_method not in FIT_METHODS:
        raise ValueError(f"fit_method must be one of {', '.join(FIT_METHODS)}, got {fit_method!r}")
    gradient = {"params": params, "loss": loss, "features": features, "residual_weight": residual_weight,
                "teacher_ball": teacher_ball, **(gradient_options or {})}
    if fit_method != "gradient" or objective != "trajectory":
        given = [k for k, v in gradient.items() if v not in (None, "l2", 0.0)]
        if given:
            raise ValueError(f"{', '.join(given)}: options of the gradient fit (objective='trajectory', "
                             f"fit_method='gradient'); this calibration is {objective!r}, {fit_method!r}")
    else:
        gradient["params"] = check_param_sets(DEFAULT_PARAMS if params is None else params)
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    if objective == "trajectory":
        return _calibrate_trajectory(spec, base, meta, n, seed, dtype, fit=fit, progress=progress, ref=ref,
                                     ref_solver=o["ref_solver"], ref_steps=o["ref_steps"], max_solves=o["max_solves"],
                                     max_seconds=o["max_seconds"], guards=o["guards"], extra_args=extra_args,
                                     fit_method=fit_method, gradient=gradient if fit_method == "gradient" else None)
    if objective == "variant":
        return _calibrate_variant(spec, base, meta, n, seed, dtype, variant, probes=probes,
                                  jacobian_batch=jacobian_batch, jacobian_precision=jacobian_precision,
                                  batch_size=batch_size, progress=progress)
    return _calibrate_reference(spec, base, meta, n, seed, dtype, reference, grid=grid, sweeps=sweeps,
                                batch_size=batch_size, progress=progress)


_CALIBRATE_PARAMETERS = inspect.signature(calibrate).parameters


def calibration_options(spec: ModelSpec, **options: Any) -> dict[str, Any]:
    """Every option of :func:`calibrate` that changes its result, resolved the one way all entry points
    resolve them: ``options`` given (not ``None``), else the model's own defaults
    (``spec.info["calibration_defaults"]``), else :data:`CALIBRATION_DEFAULTS`, else :func:`calibrate`'s
    signature.  A model's own ``guards`` are those of its shipped calibrations, all fitted without derivatives:
    the gradient fit takes its own (:func:`default_guards`) unless ``guards`` are given.  Values are normalised
    for a file (a dtype by name, guards as a list); this is the ``options`` part of a calibration's cache key
    (:func:`calibration_key`)."""
    params = _CALIBRATE_PARAMETERS
    options = dict(options)
    resolved_gradient = options.pop("gradient", None)  # already resolved: calibration_options is idempotent
    unknown = sorted(set(options) - set(params))
    if unknown:
        raise ValueError(f"unknown calibration option(s) {', '.join(unknown)}; see steindiff.calibrate")
    out = {k: p.default for k, p in params.items() if p.kind is p.KEYWORD_ONLY and k not in _NOT_OPTIONS}
    out.update(CALIBRATION_DEFAULTS)
    model_defaults = dict((spec.info or {}).get("calibration_defaults") or {})
    if options.get("fit_method") == "gradient":  # a model's pinned guards are its derivative-free calibrations'
        model_defaults.pop("guards", None)
    out.update(model_defaults)
    out.update({k: v for k, v in options.items() if v is not None and k not in _NOT_OPTIONS})
    if out["objective"] is None:
        out["objective"] = "trajectory" if out["variant"] is None else (
            "reference" if out["variant"] == "reference" else "variant")
    if out["n"] is None:
        out["n"] = 512 if out["objective"] == "trajectory" else 1000
    dt = out["dtype"]
    out["dtype"] = str(dt).removeprefix("torch.") if isinstance(dt, torch.dtype) else str(dt)
    if out["dtype"] not in ("float32", "float64"):
        raise ValueError(f"calibration dtype must be float32 or float64, got {dt!r}")
    if out["fit_method"] not in FIT_METHODS:  # before the key: a misspelt method must not read another fit's file
        raise ValueError(f"fit_method must be one of {', '.join(FIT_METHODS)}, got {out['fit_method']!r}")
    guards = default_guards(spec, out["fit_method"]) if out["guards"] is None else out["guards"]
    out["guards"] = list(check_guards(guards))  # canonical: one spelling per guard, one cache key
    # the gradient fit's options, normalised (a feature function by its fingerprint); absent for the
    # derivative-free fit, whose keys stay those of the files made before the gradient fit existed
    gradient = gradient_fit_options(out) or resolved_gradient
    for k in _GRADIENT_OPTIONS:
        out.pop(k, None)
    if gradient is not None:
        out["gradient"] = gradient
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in sorted(out.items())}


def default_guards(spec: ModelSpec, fit_method: str = "derivative-free") -> tuple[str, ...]:
    """The checks a trajectory calibration applies unless told otherwise, the same for every model (``spec``
    is not looked at: a user's model is judged as a built-in one).  The derivative-free fit: ``residual``,
    ``distribution`` and ``significance`` (:data:`~steindiff.trajectory.GUARDS`, :mod:`steindiff.guards`); the
    gradient fit: :data:`GRADIENT_GUARDS`.

    Chosen by ``benchmarks/guards_study.py`` (docs/guards.md), which calibrates three mixtures as opaque
    callables, the digits U-Net and the patches U-Net at NFE 3-6 (70 cells) and counts the cells whose kept
    candidate makes a secondary metric worse than the plain solver's beyond the seed spread (a hidden trade).
    With ``distribution`` and ``significance`` alone: 9 of 70 cells (4 of 16 on digits).  Adding ``residual``
    (a candidate may move under one more denoising pass at most 1.2 times as far from the fine solve's level as
    the plain solver's samples do, :data:`steindiff.guards.MARGINS`): 3 of 70 (2 of 16 on digits), with the
    cells better than plain on the primary metric 53 -> 49.  The ``elbo`` check (the model's likelihood bound)
    made the same choices at 16 model passes per candidate instead of one.
    """
    if fit_method == "gradient":
        return GRADIENT_GUARDS
    return ("residual", *DEFAULT_GUARDS)


def _calibrate_trajectory(spec: ModelSpec, base: SamplingPlan, meta: dict, n: int, seed: int, dtype: torch.dtype, *,
                          fit: str, progress: bool, extra_args: dict | None, fit_method: str = "derivative-free",
                          gradient: dict | None = None, **options: Any) -> GammaSchedule:
    """The ``trajectory`` objective: :func:`~steindiff.trajectory.fit_trajectory` (``options``), or with
    ``fit_method="gradient"`` :func:`~steindiff.gradient_fit.fit_trajectory_gradient` (``options`` but the
    solve budget, and the ``gradient`` options), from the calibration noise, drawn as
    :func:`~steindiff.generate.generate` draws it (from ``seed`` on the CPU, then moved)."""
    if fit not in FIT_MODES:
        raise ValueError(f"fit must be one of {', '.join(FIT_MODES)}, got {fit!r}")
    t0, cpu0 = time.perf_counter(), time.process_time()
    noise = prior_noise((n, *spec.sample_shape), float(base.sigmas[0]), spec.process, seed=seed, dtype=dtype,
                        device=spec.device or "cpu")
    common = {"sigma_min": float(spec.process.sigma_min), "extra_args": _tile_batch(extra_args, n),
              "progress": progress}
    if fit_method == "gradient":
        options.pop("max_solves", None)
        result = fit_trajectory_gradient(spec.denoiser, base, noise, **common, **options, **(gradient or {}))
    else:
        result = fit_trajectory(spec.denoiser, base, noise, fit=fit, **common, **options)
    rec = {**meta["calibration"], "fit_method": fit_method, **result.record, "wall_s": time.perf_counter() - t0,
           "cpu_s": time.process_time() - cpu0, "device": str(noise.device), "torch_threads": torch.get_num_threads()}
    meta.update(name="calibrated:trajectory", calibration=rec)
    return result.schedule(meta)


def _calibrate_variant(spec: ModelSpec, base: SamplingPlan, meta: dict, n: int, seed: int, dtype: torch.dtype,
                       variant: str, *, probes: int, jacobian_batch: int | None, jacobian_precision: str = "fp32",
                       **gen_options: Any) -> GammaSchedule:
    """The ``variant`` objective: the per-step ``gamma`` of the stabilizer ``variant``, averaged over the
    calibration batches (``gen_options``: ``batch_size`` and ``progress`` of :func:`~steindiff.generate.generate`)."""
    stab = make_stabilizer(variant, spec, coords=base.coords, probes=probes, seed=seed, jacobian_batch=jacobian_batch,
                           jacobian_precision=jacobian_precision)
    if stab is None:
        gammas = [1.0] * base.steps
    else:
        gen = generate(spec, base, stabilizer=stab, n=n, seed=seed, dtype=dtype, **gen_options)
        per_step: dict[int, list[float]] = {}
        for r in gen.trace:
            per_step.setdefault(r["step"], []).append(float(r["gamma"]))
        gammas = [float(np.mean(per_step[k])) for k in range(base.steps)]
    meta["name"] = f"calibrated:{variant}"
    if jacobian_precision != "fp32":  # the gammas' divergence estimates were taken in this precision
        meta["calibration"]["jacobian_precision"] = jacobian_precision
    return GammaSchedule(gammas, base.coords, meta)


def _calibrate_reference(spec: ModelSpec, base: SamplingPlan, meta: dict, n: int, seed: int, dtype: torch.dtype,
                         reference: torch.Tensor | None, *, grid: tuple[float, float, float], sweeps: int,
                         batch_size: int | None, progress: bool) -> GammaSchedule:
    """The ``reference`` objective: coordinate search of ``gamma_k`` on ``grid`` minimizing the sliced
    W2 distance between the calibration batch's samples and ``reference``."""
    if reference is None:
        raise ValueError("variant 'reference' needs reference data (held out from evaluation)")
    ref = reference.reshape(reference.shape[0], -1).to(torch.float64)
    if ref.shape[0] < n:
        raise ValueError(f"reference data has {ref.shape[0]} samples, need at least n={n}")
    ref = ref[:n]
    noise = None
    lo, hi, step = grid
    candidates = np.round(np.arange(lo, hi + 1e-9, step), 6)
    gammas = [1.0] * base.steps

    def loss(gs: list[float]) -> float:
        nonlocal noise
        gen = generate(spec, base, stabilizer=GammaSchedule(gs, base.coords), noise=noise, batch_size=batch_size,
                       n=n, seed=seed, dtype=dtype)
        noise = gen.noise
        x = gen.x.reshape(n, -1).to(torch.float64)
        return sliced_w2(x, ref, seed=seed) if torch.isfinite(x).all() else float("inf")

    best = loss(gammas)
    with tqdm(total=sweeps * base.steps, disable=not progress, desc="calibrate", leave=False) as bar:
        for sweep in range(sweeps):
            # first sweep on the coarse grid, later sweeps on a 4x finer grid around the current value
            for k in range(base.steps):
                pts = candidates if sweep == 0 else np.round(gammas[k] + step / 4 * np.arange(-2, 3), 6)
                for c in pts:
                    if not lo <= c <= hi or c == gammas[k]:
                        continue
                    trial = gammas.copy()
                    trial[k] = float(c)
                    val = loss(trial)
                    if val < best - 1e-12:
                        best, gammas = val, trial
                bar.update()
    meta["name"] = "calibrated:reference"
    meta["calibration"]["objective"] = {"sliced_w2": best}
    return GammaSchedule(gammas, base.coords, meta)


# --------------------------------------------------------------------------------------------
# calibrated plans for ``--stabilizer auto``: fitted on first use, cached
# --------------------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/steindiff/calibrations`` (``~/.cache/steindiff/calibrations`` when unset)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "steindiff" / "calibrations"


def calibration_key(spec: ModelSpec, base: SamplingPlan, *, conditioning: str | None = None,
                    options: dict | None = None) -> dict:
    """What a cached calibration is valid for: the model (:func:`model_fingerprint`: its contents, noise process
    and sample shape), the solver and its options, the plain plan's noise levels (schedule, NFE, noise range),
    the coordinates, the conditioning (e.g. a hash of the prompt embeddings and the guidance scale) and every
    option that changes the fit (:func:`calibration_options` of ``options``: batch, seed, dtype, fine solve,
    budget, guards, ...)."""
    return {"fingerprint": model_fingerprint(spec), "model": spec.name, "solver": base.solver,
            "solver_options": dict(sorted(base.solver_options.items())), "schedule": base.schedule, "nfe": base.nfe,
            "base_sigmas": [round(float(s), 12) for s in base.sigmas], "coords": base.coords,
            "conditioning": conditioning, "options": calibration_options(spec, **(options or {}))}


def gradient_fit_options(options: dict) -> dict | None:
    """How a gradient fit was made, normalised for a file and a cache key (``None`` for the derivative-free
    fit): parameters, distance (a feature function by its content fingerprint), soft teacher forcing and the
    optimiser's options, from :func:`calibrate`'s options."""
    if options.get("fit_method", "derivative-free") != "gradient":
        return None
    feats = options.get("features")
    out = {"params": params_record(check_param_sets(options.get("params") or DEFAULT_PARAMS)),
           **describe_loss(options.get("loss") or "l2", feats, float(options.get("residual_weight") or 0),
                           float(options.get("teacher_ball") or 0))}
    if feats is not None:
        try:
            digest = fingerprint(feats)
        except AmbiguousIdentity as e:  # the message names fingerprint=, which is the model's
            raise ValueError(f"the features function {out['features']!r} cannot be identified for the cache key "
                             f"({e}); make it a module or a plain function of the inputs") from None
        out["features"] = f"{out['features']}:{digest}"
    given = dict(options.get("gradient_options") or {})
    out["start"] = given.pop("start", DEFAULT_START)  # always named: a change of default never reuses a file
    out["gradient_options"] = dict(sorted(given.items()))
    return out


def cache_file(root: Path, key: dict) -> Path:
    """Where a calibration for ``key`` (:func:`calibration_key`) lives in the cache folder ``root``."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(key["model"]))[-40:]
    return root / f"{stem}-{key['solver']}-{key['schedule']}-nfe{key['nfe']}-{digest}.json"


def plan_from_schedule(sched: GammaSchedule, base: SamplingPlan) -> SamplingPlan:
    """The plan a calibration file describes: its noise levels, gammas, model noise levels and history
    corrections, with ``base``'s solver."""
    sigmas = sched.meta.get("sigmas", base.sigmas)
    fitted = len(sigmas) == len(base.sigmas) and any(abs(float(a) - float(b)) > 1e-12
                                                     for a, b in zip(sigmas, base.sigmas))
    return SamplingPlan(base.solver, torch.as_tensor(sigmas, dtype=torch.float64),
                        "fitted" if fitted else base.schedule,
                        list(sched.gammas), sched.coords, base.solver_options, {"name": sched.name, **sched.meta},
                        sched.model_sigmas, sched.history)


def calibrate_when(value: bool | str) -> str:
    """``calibrate_missing`` (or ``--calibrate``) as one of :data:`CALIBRATE_WHEN`: ``True`` is ``always``,
    ``False`` ``never``."""
    if value is True or value is False:
        return "always" if value else "never"
    if value not in CALIBRATE_WHEN:
        raise ValueError(f"calibrate must be one of {', '.join(CALIBRATE_WHEN)} (or True/False), got {value!r}")
    return value


def calibrated_plan(spec: ModelSpec, base: SamplingPlan, *, cache_dir: str | os.PathLike | None = None,
                    calibrate_missing: bool | str = "if-quick", quick_fit_seconds: float = QUICK_FIT_SECONDS,
                    conditioning: str | None = None, extra_args: dict | None = None, progress: bool = False,
                    notice: Callable[[str], None] | None = None, fit_command: str | None = None,
                    ref: ReferenceSolve | None = None, **options: Any) -> SamplingPlan:
    """The trajectory-calibrated version of the plain plan ``base`` for ``spec``: shipped with the model
    (``spec.info["calibrations"]``, a folder of calibration files, e.g. the digits model's), else from the
    cache (``cache_dir``, default :func:`default_cache_dir`), else fitted now and cached, if allowed.

    ``calibrate_missing`` says when a missing calibration is fitted (:data:`CALIBRATE_WHEN`): ``"if-quick"``
    (the default) fits only when the fit is estimated to take at most ``quick_fit_seconds`` (default
    :data:`QUICK_FIT_SECONDS`) on this machine (:func:`~steindiff.fit_estimate.estimate_fit`, measured on the model
    in a few seconds at most), and otherwise returns ``base`` (the plain solver) with a notice that says how long
    the fit would take and how to run it (``fit_command``: the ``steindiff calibrate`` command on the command
    line; default: the Python call); ``"always"`` (or ``True``) fits whatever it costs, announcing the estimate;
    ``"never"`` (or ``False``) only reads.

    ``options`` go to :func:`calibrate` (``fit``, ``n``, ``dtype``, ``max_solves``, ...); they are resolved by
    :func:`calibration_options` and are part of the cache key, so a calibration made with other options is
    another file: it is never used in their place.  ``ref``: a reference solve of the calibration noise to
    reuse (it must be the one ``options`` describe).  The model's identity is checked before any work.

    Falls back to ``base`` when the cache cannot be written.  ``notice`` receives one line per event: before a
    fit (what is fitted, the estimated time; the file records the time it took), a fit skipped by ``"if-quick"``,
    a cached file that is unreadable or made with other options (what is wrong, and what happens instead);
    without ``notice`` those lines are warnings, except the one before a fit.
    """
    say = notice if notice is not None else (lambda m: warnings.warn(m, stacklevel=3))
    when = calibrate_when(calibrate_missing)
    opts = calibration_options(spec, objective="trajectory", **options)
    key = calibration_key(spec, base, conditioning=conditioning, options=opts)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache_file(root, key)
    shipped = (spec.info or {}).get("calibrations")  # read-only calibrations shipped with a model
    folders = ([Path(shipped)] if shipped else []) + [root]
    problems: list[str] = []  # said once, with what happens instead, when that is known
    for p in [cache_file(f, key) for f in folders]:
        if not p.exists():
            continue
        try:
            sched = load_gamma_schedule(p)
            if sched.meta.get("key") != key:
                raise ValueError("made for another configuration: " + _key_difference(sched.meta.get("key"), key))
            return plan_from_schedule(sched, base)
        except (OSError, ValueError) as e:  # the reading errors name the file themselves
            problems.append(f"ignoring a cached calibration: {e}" if str(p) in str(e)
                            else f"ignoring the cached calibration {str(p)!r} ({e})")
    problems += [f"the calibration {str(p)!r} is for this model and plan but other options ({diff}); not used"
                 for p, diff in _near_misses(folders, key)]

    def report(instead: str) -> None:
        for m in problems:
            say(f"steindiff: {m}; {instead}")

    if when == "never":
        report("using the plain solver")
        return base
    what = f"{base.solver} / {base.schedule} / NFE {base.nfe} for {spec.name}"
    tiled = _tile_batch(extra_args, int(opts["n"]))
    if when == "if-quick":
        est = estimate_fit(spec, base, opts, extra_args=tiled, probe_seconds=quick_fit_seconds / 10,
                           precise_below=3 * quick_fit_seconds)
        if est.seconds > quick_fit_seconds:
            report("using the plain solver")
            hint = fit_command or "pass calibrate_missing='always' to steindiff.calibrated_plan"
            none = "no usable calibration" if problems else "no calibration"
            say(f"steindiff: {none} of {what} is shipped or cached, and fitting one would take {est} here "
                f"(more than the {quick_fit_seconds:g} s that if-quick allows): sampling with the plain solver. "
                f"To fit it once ({est}): {hint}")
            return base
    try:  # only now: a skipped fit leaves no empty folder behind
        root.mkdir(parents=True, exist_ok=True)
        check_writable(path)
    except OSError as e:
        report("using the plain solver")
        say(f"steindiff: the calibration cache {str(root)!r} is not writable ({e}); using the plain solver")
        return base
    if when == "always":
        est = estimate_fit(spec, base, opts, extra_args=tiled)
    report("fitting it again")
    say_fit = notice if notice is not None else (lambda m: None)  # what is fitted is news, not a warning
    g = opts.get("gradient")
    how = f"gradient fit of {' or '.join('+'.join(ps) for ps in check_param_sets(g['params']))}" if g \
        else f"fit: {opts['fit']}"
    say_fit(f"steindiff: calibrating {what} once ({how}; {est}, measured on this machine); "
            f"cached in {root}")
    call = {k: v for k, v in opts.items() if k != "gradient"}
    call.update((k, options[k]) for k in _GRADIENT_OPTIONS if k in options)
    sched = calibrate(spec, base, coords=base.coords, progress=progress, extra_args=extra_args, ref=ref, **call)
    sched.meta["key"] = key
    stamp_fit(sched, est)
    sched.save(path)
    return plan_from_schedule(sched, base)


def stamp_fit(sched: GammaSchedule, estimate: FitEstimate | None = None) -> None:
    """Record in a calibration when it was fitted (UTC, ISO 8601) and the time announced before it."""
    cal = sched.meta.setdefault("calibration", {})
    cal["fitted_at"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    if estimate is not None:
        cal["estimated_s"] = round(estimate.seconds, 3)


def _key_difference(old: Any, new: dict) -> str:
    """The fields of a cache key that differ, as ``field: file's value, requested value``."""
    if not isinstance(old, dict):
        return "it has no key"
    parts = []
    for k in sorted(set(old) | set(new)):
        if k == "options" and isinstance(old.get(k), dict):
            parts += [f"{o}: {old[k].get(o)!r} in the file, {new[k].get(o)!r} requested"
                      for o in sorted(set(old[k]) | set(new[k])) if old[k].get(o) != new[k].get(o)]
        elif old.get(k) != new.get(k):
            parts.append(f"{k}: {_short(old.get(k))} in the file, {_short(new.get(k))} requested")
    return "; ".join(parts) or "nothing"


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def _near_misses(folders: list[Path], key: dict) -> list[tuple[Path, str]]:
    """Calibration files of the same model, plan and conditioning as ``key`` whose options differ."""
    out = []
    same = {k: v for k, v in key.items() if k != "options"}
    prefix = cache_file(Path("."), key).name.rsplit("-", 1)[0] + "-"
    for folder in folders:
        for p in sorted(folder.glob(prefix + "*.json")) if folder.is_dir() else []:
            try:
                old = json.loads(p.read_text()).get("key")
            except (OSError, ValueError, AttributeError):
                continue
            if isinstance(old, dict) and {k: v for k, v in old.items() if k != "options"} == same \
                    and old.get("options") != key["options"]:
                out.append((p, _key_difference(old, key)))
    return out


#: The options ``steindiff calibrations`` shows in its table (``--json`` has them all).
_LISTED_OPTIONS = ("n", "ref_steps", "max_solves", "max_seconds", "fit", "dtype")


def list_calibrations(folder: str | os.PathLike, where: str) -> list[dict[str, Any]]:
    """One record per calibration file (``*.json`` but ``defaults.json``) in ``folder``, sorted by model,
    solver, schedule and NFE: ``model``, ``solver``, ``schedule``, ``nfe``, ``options`` (the fitting options its
    key records), ``chosen`` (the candidate kept: ``plain`` when nothing beat the plain solver), ``fitted_at``
    (recorded, else the file's time for a cache file, else ``None``), ``wall_s`` (how long the fit took),
    ``path``, ``where`` (e.g. ``shipped`` or ``cache``); an unreadable file gets ``error`` instead."""
    out = []
    root = Path(folder)
    for p in sorted(root.glob("*.json")) if root.is_dir() else []:
        if p.name == "defaults.json":
            continue
        rec: dict[str, Any] = {"where": where, "path": str(p)}
        try:
            sched = load_gamma_schedule(p)
        except (OSError, ValueError) as e:
            out.append({**rec, "error": str(e)})
            continue
        meta, key = sched.meta, sched.meta.get("key") if isinstance(sched.meta.get("key"), dict) else {}
        cal = meta.get("calibration") if isinstance(meta.get("calibration"), dict) else {}
        fitted = cal.get("fitted_at")
        if fitted is None and where != "shipped":  # a cache file is written once, when it is fitted
            fitted = datetime.datetime.fromtimestamp(p.stat().st_mtime, datetime.timezone.utc).isoformat(
                timespec="seconds")
        out.append({**rec, "model": meta.get("model"), "solver": meta.get("solver"), "schedule": meta.get("schedule"),
                    "nfe": meta.get("nfe"), "objective": meta.get("objective"), "options": key.get("options"),
                    "chosen": cal.get("chosen"), "fitted_at": fitted, "wall_s": cal.get("wall_s"),
                    "key": key or None})
    return sorted(out, key=lambda r: (str(r.get("model")), str(r.get("solver")), str(r.get("schedule")),
                                      r.get("nfe") or 0, r["path"]))


def options_summary(options: dict | None) -> str:
    """The main fitting options of a calibration, for a table: ``n=256 ref_steps=100 ...``."""
    if not options:
        return "-"
    return " ".join(f"{k}={options[k]:g}" if isinstance(options.get(k), float) else f"{k}={options[k]}"
                    for k in _LISTED_OPTIONS if k in options)
