"""Calibrate a sampler once, sample for free (:mod:`steindiff.stabilizers.schedule`).

Three objectives:

- ``trajectory`` (default): SteinDiff's closed-form step scale aimed at the probability-flow ODE's own
  solution, refined on the final samples, with the interior noise levels optionally fitted too
  (:mod:`steindiff.trajectory`).  Needs only the model: no data, no training.
- ``variant``: run a stabilizer variant (``stein-energy``, ``stein``, ...) on a calibration batch and
  keep its per-step ``gamma`` (averaged over calibration batches);
- ``reference``: with reference data the user already has (held out from any evaluation data),
  choose ``gamma_k`` by coordinate search to minimize the sliced Wasserstein-2 distance between the
  calibration batch's samples and the reference.  This uses data; it is labelled as such in the file.

:func:`calibrated_plan` is what ``--stabilizer auto`` runs: the cached trajectory calibration of a
(model, solver, schedule, NFE), fitted on first use.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .generate import generate
from .io import check_writable
from .metrics import sliced_w2
from .models.registry import ModelSpec
from .plan import SamplingPlan, make_plan
from .sampling import prior_noise
from .stabilizers import make_stabilizer
from .stabilizers.schedule import GammaSchedule, load_gamma_schedule
from .trajectory import DEFAULT_GUARDS, FIT_MODES, ReferenceSolve, fit_trajectory

__all__ = ["calibrate", "calibrated_plan", "calibration_key", "cache_file", "conditioning_digest", "default_cache_dir",
           "default_guards", "plan_from_schedule", "OBJECTIVES", "model_fingerprint", "CALIBRATION_SEED"]

OBJECTIVES = ("trajectory", "variant", "reference")
#: Default seed of the calibration noise: far from the evaluation seeds (0, 1, 2, ...) of the benchmarks.
CALIBRATION_SEED = 12345


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
    """A hash of the model's weights (``state_dict``) or mixture parameters, and its noise range."""
    h = hashlib.sha256()
    den = spec.denoiser
    if spec.gmm is not None:
        g = spec.gmm
        tensors = [("means", g.means), ("weights", g.weights), ("basis", g.basis), ("lam", g.lam), ("s2", g.s2)]
    elif hasattr(den, "state_dict"):
        tensors = sorted(den.state_dict().items())
    else:
        raise ValueError(f"cannot fingerprint model {spec.name!r}: it has no state_dict and is not a mixture")
    for name, t in tensors:
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())  # any dtype, bf16 too
    h.update(f"{spec.process!r}{tuple(spec.sample_shape)}".encode())
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
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
    rho: float = 7.0,
    ref_solver: str = "dpmpp_2m",
    ref_steps: int = 200,
    ref: ReferenceSolve | None = None,
    max_solves: int = 200,
    max_seconds: float = 60.0,
    guards: Sequence[str] | None = None,
    extra_args: dict | None = None,
    jacobian_batch: int | None = None,
    jacobian_precision: str = "fp32",
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
    Runs on the model's device (:meth:`ModelSpec.to`); ``jacobian_batch`` bounds the variant's Jacobian passes and
    ``jacobian_precision`` sets their precision (:class:`~steindiff.stabilizers.GammaStabilizer`).
    """
    if objective is None:
        objective = "trajectory" if variant is None else ("reference" if variant == "reference" else "variant")
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
    variant = variant or "stein-energy"
    base = plan if plan is not None else make_plan(spec.process, solver, nfe, schedule, rho=rho)
    if base.coords != coords:  # the coordinates of the rescaled update are part of the plan
        base = dataclasses.replace(base, coords=coords)
    if n is None:
        n = 512 if objective == "trajectory" else 1000
    meta: dict[str, Any] = {
        "model": spec.name, "solver": base.solver, "schedule": base.schedule, "nfe": base.nfe,
        "sigmas": [float(s) for s in base.sigmas], "base_sigmas": [float(s) for s in base.sigmas],
        "objective": objective, "variant": variant if objective == "variant" else objective,
        "calibration": {"n": n, "seed": seed, "uses_reference_data": objective == "reference"},
    }
    if objective == "trajectory":
        return _calibrate_trajectory(spec, base, meta, n, seed, dtype, fit=fit, progress=progress, ref=ref,
                                     ref_solver=ref_solver, ref_steps=ref_steps, max_solves=max_solves,
                                     max_seconds=max_seconds, guards=default_guards(spec) if guards is None else guards,
                                     extra_args=extra_args)
    if objective == "variant":
        return _calibrate_variant(spec, base, meta, n, seed, dtype, variant, probes=probes,
                                  jacobian_batch=jacobian_batch, jacobian_precision=jacobian_precision,
                                  batch_size=batch_size, progress=progress)
    return _calibrate_reference(spec, base, meta, n, seed, dtype, reference, grid=grid, sweeps=sweeps,
                                batch_size=batch_size, progress=progress)


def default_guards(spec: ModelSpec) -> tuple[str, ...]:
    """The checks a trajectory calibration applies unless told otherwise, the same for every model (``spec``
    is not looked at: a user's model is judged as a built-in one): ``residual``, ``distribution`` and
    ``significance`` (:data:`~steindiff.trajectory.GUARDS`, :mod:`steindiff.guards`).

    Chosen by ``benchmarks/guards_study.py`` (docs/guards.md), which calibrates three mixtures as opaque
    callables, the digits U-Net and the patches U-Net at NFE 3-6 (70 cells) and counts the cells whose kept
    candidate makes a secondary metric worse than the plain solver's beyond the seed spread (a hidden trade).
    With ``distribution`` and ``significance`` alone: 9 of 70 cells (4 of 16 on digits).  Adding ``residual``
    (a candidate may move under one more denoising pass at most 1.2 times as far from the fine solve's level as
    the plain solver's samples do, :data:`steindiff.guards.MARGINS`): 3 of 70 (2 of 16 on digits), with the
    cells better than plain on the primary metric 53 -> 49.  The ``elbo`` check (the model's likelihood bound)
    made the same choices at 16 model passes per candidate instead of one.
    """
    return ("residual", *DEFAULT_GUARDS)


def _calibrate_trajectory(spec: ModelSpec, base: SamplingPlan, meta: dict, n: int, seed: int, dtype: torch.dtype, *,
                          fit: str, progress: bool, extra_args: dict | None, **options: Any) -> GammaSchedule:
    """The ``trajectory`` objective: :func:`~steindiff.trajectory.fit_trajectory` (``options``) from the
    calibration noise, drawn as :func:`~steindiff.generate.generate` draws it (from ``seed`` on the CPU, then moved)."""
    if fit not in FIT_MODES:
        raise ValueError(f"fit must be one of {', '.join(FIT_MODES)}, got {fit!r}")
    t0 = time.perf_counter()
    noise = prior_noise((n, *spec.sample_shape), float(base.sigmas[0]), spec.process, seed=seed, dtype=dtype,
                        device=spec.device or "cpu")
    result = fit_trajectory(spec.denoiser, base, noise, sigma_min=float(spec.process.sigma_min), fit=fit,
                            extra_args=_tile_batch(extra_args, n), progress=progress, **options)
    rec = {**meta["calibration"], **result.record, "wall_s": time.perf_counter() - t0, "device": str(noise.device),
           "torch_threads": torch.get_num_threads()}
    meta.update(name="calibrated:trajectory", fingerprint=model_fingerprint(spec), calibration=rec)
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


def calibration_key(spec: ModelSpec, base: SamplingPlan, *, fit: str = "both", conditioning: str | None = None) -> dict:
    """What a cached calibration is valid for: the model's weights, the solver and its options, the
    plain plan's noise levels (schedule, NFE, noise range), the coordinates, the fit and the
    conditioning (e.g. a hash of the prompt embeddings and the guidance scale)."""
    return {"fingerprint": model_fingerprint(spec), "model": spec.name, "solver": base.solver,
            "solver_options": dict(sorted(base.solver_options.items())), "schedule": base.schedule, "nfe": base.nfe,
            "base_sigmas": [round(float(s), 12) for s in base.sigmas], "coords": base.coords, "fit": fit,
            "conditioning": conditioning}


def cache_file(root: Path, key: dict) -> Path:
    """Where a calibration for ``key`` (:func:`calibration_key`) lives in the cache folder ``root``."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(key["model"]))[-40:]
    return root / f"{stem}-{key['solver']}-{key['schedule']}-nfe{key['nfe']}-{digest}.json"


def plan_from_schedule(sched: GammaSchedule, base: SamplingPlan) -> SamplingPlan:
    """The plan a calibration file describes: its noise levels and gammas, with ``base``'s solver."""
    sigmas = sched.meta.get("sigmas", base.sigmas)
    fitted = len(sigmas) == len(base.sigmas) and any(abs(float(a) - float(b)) > 1e-12
                                                     for a, b in zip(sigmas, base.sigmas))
    return SamplingPlan(base.solver, torch.as_tensor(sigmas, dtype=torch.float64),
                        "fitted" if fitted else base.schedule,
                        list(sched.gammas), sched.coords, base.solver_options, {"name": sched.name, **sched.meta})


def calibrated_plan(spec: ModelSpec, base: SamplingPlan, *, cache_dir: str | os.PathLike | None = None,
                    calibrate_missing: bool = True, fit: str = "both", conditioning: str | None = None,
                    extra_args: dict | None = None, dtype: torch.dtype | None = None, progress: bool = False,
                    notice: Callable[[str], None] | None = None, **options: Any) -> SamplingPlan:
    """The trajectory-calibrated version of the plain plan ``base`` for ``spec``: shipped with the model
    (``spec.info["calibrations"]``, a folder of calibration files, e.g. the digits model's), else from the
    cache (``cache_dir``, default :func:`default_cache_dir`), else fitted now and cached.

    Falls back to ``base`` (the plain solver) with a warning when the cache cannot be written, and
    without one when ``calibrate_missing`` is false.  ``notice`` receives a one-line message before
    a calibration starts (what is fitted, about how long).  A cached file that is corrupt or made for
    another configuration is ignored with a warning and fitted again.  ``options`` go to :func:`calibrate`.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = calibration_key(spec, base, fit=fit, conditioning=conditioning)
    path = cache_file(root, key)
    shipped = (spec.info or {}).get("calibrations")  # read-only calibrations shipped with a model
    for p in ([cache_file(Path(shipped), key)] if shipped else []) + [path]:
        if not p.exists():
            continue
        try:
            sched = load_gamma_schedule(p)
            if sched.meta.get("key") != key:
                raise ValueError("it was made for another configuration")
            return plan_from_schedule(sched, base)
        except (OSError, ValueError) as e:
            warnings.warn(f"ignoring the cached calibration {str(p)!r} ({e}); calibrating again", stacklevel=2)
    if not calibrate_missing:
        return base
    try:
        root.mkdir(parents=True, exist_ok=True)
        check_writable(path)
    except OSError as e:
        warnings.warn(f"calibration cache {str(root)!r} is not writable ({e}); using the plain solver", stacklevel=2)
        return base
    if dtype is None:
        dtype = torch.float64 if spec.gmm is not None else torch.float32
    if notice is not None:
        notice(f"steindiff: calibrating {base.solver} at NFE {base.nfe} ({base.schedule}) for {spec.name} once "
               f"(fit: {fit}; {_eta(spec, base, dtype, options, extra_args)}); cached in {root}")
    sched = calibrate(spec, base, coords=base.coords, fit=fit, dtype=dtype, progress=progress, extra_args=extra_args,
                      objective="trajectory", **options)
    sched.meta["key"] = key
    sched.save(path)
    return plan_from_schedule(sched, base)


def _eta(spec: ModelSpec, base: SamplingPlan, dtype: torch.dtype, options: dict, extra_args: dict | None) -> str:
    """A rough duration: one timed model pass on a few samples, scaled to the calibration batch and
    times the passes of the reference solve, plus the refinement's time budget."""
    n = int(options.get("n") or 512)
    steps = int(options.get("ref_steps", 200))
    m = min(n, 8)
    device = spec.device or "cpu"
    x = torch.zeros((m, *spec.sample_shape), dtype=dtype, device=device)
    s = torch.full((m,), float(base.sigmas[1]), dtype=dtype, device=device)
    t0 = time.perf_counter()
    with torch.no_grad():
        spec.denoiser(x, s, **(_tile_batch(extra_args, m) or {}))
    t_pass = (time.perf_counter() - t0) * n / m
    refine_s = min(float(options.get("max_seconds", 60.0)), t_pass / 2 * base.nfe * int(options.get("max_solves", 200)))
    return f"about {t_pass * 1.5 * steps + refine_s:.0f} s or less"
