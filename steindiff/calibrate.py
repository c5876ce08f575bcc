"""Estimate a gamma schedule once, apply it for free (:mod:`steindiff.stabilizers.schedule`).

Two modes:

- reference-free (default): run a stabilizer variant (``stein-energy``, ``stein``, ...) on a
  calibration batch and keep its per-step ``gamma`` (averaged over calibration batches);
- ``reference``: with reference data the user already has (held out from any evaluation data),
  choose ``gamma_k`` by coordinate search to minimize the sliced Wasserstein-2 distance between the
  calibration batch's samples and the reference.  This uses data; it is labelled as such in the file.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .generate import generate
from .metrics import sliced_w2
from .models.registry import ModelSpec
from .schedules import get_sigmas
from .solvers import get_solver, steps_for_nfe
from .stabilizers import make_stabilizer
from .stabilizers.schedule import GammaSchedule

__all__ = ["calibrate"]


def calibrate(
    spec: ModelSpec,
    *,
    solver: str = "dpmpp_2m",
    nfe: int = 10,
    schedule: str = "karras",
    coords: str = "ve",
    variant: str = "stein-energy",
    n: int = 1000,
    seed: int = 12345,
    batch_size: int | None = None,
    reference: torch.Tensor | None = None,
    grid: tuple[float, float, float] = (0.5, 1.5, 0.1),
    sweeps: int = 2,
    probes: int = 5,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
    rho: float = 7.0,
    sigmas: torch.Tensor | None = None,
    jacobian_batch: int | None = None,
) -> GammaSchedule:
    """A :class:`GammaSchedule` for this configuration (module docstring).  ``seed`` draws the
    calibration noise; use one not used for evaluation.  ``sigmas`` overrides ``nfe``/``schedule``.
    Runs on the model's device (:meth:`ModelSpec.to`); ``jacobian_batch`` bounds the variant's Jacobian passes."""
    if sigmas is None:
        sigmas = get_sigmas(schedule, steps_for_nfe(get_solver(solver), nfe), spec.process, rho=rho)
    steps = len(sigmas) - 1
    meta: dict[str, Any] = {
        "model": spec.name, "solver": solver, "schedule": schedule, "nfe": get_solver(solver).nfe(sigmas),
        "sigmas": [float(s) for s in sigmas], "variant": variant,
        "calibration": {"n": n, "seed": seed, "uses_reference_data": variant == "reference"},
    }
    common = dict(solver=solver, sigmas=sigmas, n=n, seed=seed, dtype=dtype)
    if variant != "reference":
        stab = make_stabilizer(variant, spec, coords=coords, probes=probes, seed=seed, jacobian_batch=jacobian_batch)
        if stab is None:
            gammas = [1.0] * steps
        else:
            gen = generate(spec, stabilizer=stab, batch_size=batch_size, progress=progress, **common)
            per_step: dict[int, list[float]] = {}
            for r in gen.trace:
                per_step.setdefault(r["step"], []).append(float(r["gamma"]))
            gammas = [float(np.mean(per_step[k])) for k in range(steps)]
        meta["name"] = f"calibrated:{variant}"
        return GammaSchedule(gammas, coords, meta)
    if reference is None:
        raise ValueError("variant 'reference' needs reference data (held out from evaluation)")
    ref = reference.reshape(reference.shape[0], -1).to(torch.float64)
    if ref.shape[0] < n:
        raise ValueError(f"reference data has {ref.shape[0]} samples, need at least n={n}")
    ref = ref[:n]
    noise = None
    lo, hi, step = grid
    candidates = np.round(np.arange(lo, hi + 1e-9, step), 6)
    gammas = [1.0] * steps

    def loss(gs: list[float]) -> float:
        nonlocal noise
        gen = generate(spec, stabilizer=GammaSchedule(gs, coords), noise=noise, batch_size=batch_size, **common)
        noise = gen.noise
        x = gen.x.reshape(n, -1).to(torch.float64)
        return sliced_w2(x, ref, seed=seed) if torch.isfinite(x).all() else float("inf")

    best = loss(gammas)
    bar = tqdm(total=sweeps * steps, disable=not progress, desc="calibrate", leave=False)
    for sweep in range(sweeps):
        # first sweep on the coarse grid, later sweeps on a 4x finer grid around the current value
        for k in range(steps):
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
    bar.close()
    meta["name"] = "calibrated:reference"
    meta["calibration"]["objective"] = {"sliced_w2": best}
    return GammaSchedule(gammas, coords, meta)
