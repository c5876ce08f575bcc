"""The peer row of issue 9: diffusers' own schedulers and steindiff's plain and calibrated solvers, side by
side, on the same exact mixture seen as an epsilon-prediction network on a discrete VP schedule, from the same
noise.

    python benchmarks/diffusers_peers.py --json-out docs/results/peers-image64.json \\
        --markdown docs/results/peers-image64.md

The model.  ``gmm:image64`` (:func:`steindiff.models.get_gmm`) has an exact denoiser ``D(x, sigma)``
in VE coordinates.  As an epsilon network on a discrete VP process with 1000 training steps it is
``eps(x_vp, t) = (x_ve - D(x_ve, sigma(t))) / sigma(t)`` with ``x_ve = x_vp sqrt(1 + sigma(t)^2)``
(:meth:`steindiff.models.gmm.GaussianMixture.epsilon_net`; Ho et al. 2020, Eq. 4, with
``sigma = sqrt((1 - abar) / abar)``), where ``sigma(t)`` is the process's table at integer ``t`` and is
interpolated linearly in ``log sigma`` between entries at fractional ``t`` (k-diffusion's and steindiff's
convention; diffusers' Euler scheduler passes fractional timesteps).  The betas are Stable Diffusion's
(``scaled_linear``, 0.00085 to 0.012: ``sigma`` in [0.0292, 14.61]) by default, or DDPM's (``--betas
linear``, 1e-4 to 0.02: ``sigma`` in [0.0100, 157.4]).

The runs.  Every configuration of one seed starts from the same standard normal draws ``eps``: those of
steindiff's benchmark grid for that seed (``steindiff.sampling.prior_noise`` with the same seed; the grid's
VE noise at ``sigma_max = 80`` is ``80 eps``).  diffusers gets ``eps`` as its latents and scales them by
its scheduler's ``init_noise_sigma`` as its pipelines do; steindiff starts from the VE state at the
process's ``sigma_max``, ``eps sqrt(1 + sigma_max^2)`` (the VP prior, ``x_vp = eps``).  diffusers'
schedulers run their own loop (``set_timesteps``, ``scale_model_input``, ``step``) with their defaults
except the betas, ``solver_order`` (2M/3M), the spacing (``timestep_spacing`` or ``use_karras_sigmas``)
and, for DDIM, ``clip_sample=False`` (the mixture's data leave [-1, 1]; Stable Diffusion's setting).
steindiff's plain solvers run over the same process's ``karras`` and ``logsnr`` noise levels through
:class:`steindiff.models.VPDenoiser` (fractional timesteps; also with timesteps rounded to integers,
as diffusers' multistep schedulers do with Karras sigmas, labelled ``none[t-round]``).

The calibrated sampler (``cal:trajectory``, skipped with ``--no-calibrated``).  Each steindiff solver and
schedule with fractional timesteps, at each NFE, is calibrated once (not per seed) by
:func:`steindiff.calibration.calibrate` (objective ``trajectory``) of its plain plan
(:func:`steindiff.plan.make_plan` over the process's noise levels) for the same model (the ``VPDenoiser``
over the mixture's epsilon network), on calibration noise disjoint from the evaluation seeds, with the
bench's options for mixtures (:func:`steindiff.bench.runner.calibration_options`: n 512, seed 12345, a
200-step reference solve shared by every cell, 200 solves) except ``max_seconds``, set high
(:data:`CAL_MAX_SECONDS`): the refinement stops at its solve budget or when it converges, never on the clock,
so the fit does not depend on the machine's speed.
Every seed is then sampled with the fitted plan (its noise levels and per-step gammas) from the same noise as
the plain rows, with the same counted model passes; the calibration's time is recorded in the row
(``calibration``), not in its sampling time.

The metrics are the protocol's (:func:`steindiff.metrics.mixture_metrics`, floors of an independent true
sample set as in ``steindiff/bench/runner.py``; excess as :func:`steindiff.bench.runner.excess`, NLL
two-sided), plus ``traj_err`` against a reference solve of the same model from the same noise
(``dpmpp_3m``, 1000 Karras steps, as the grid's).  Model passes are counted.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from steindiff.bench.runner import (
    SCHEMA,
    _calibration_reference,
    _calibration_summary,
    calibration_options,
    excess,
    machine_info,
)
from steindiff.calibration import calibrate, plan_from_schedule
from steindiff.metrics import mixture_metrics
from steindiff.models import VPDenoiser, get_gmm
from steindiff.models.registry import ModelSpec
from steindiff.noise import DiscreteVPProcess
from steindiff.plan import SamplingPlan, make_plan
from steindiff.sampling import prior_noise, sample
from steindiff.schedules import get_sigmas

MODEL = "gmm:image64"
#: Beta schedules of the discrete VP process: Stable Diffusion's and DDPM's.
BETAS = {"scaled_linear": ("scaled_linear", 0.00085, 0.012), "linear": ("linear", 0.0001, 0.02)}
NFES = (3, 4, 5, 6, 8, 10)
SEEDS = (0, 1, 2)
STEINDIFF_SOLVERS = ("euler", "dpmpp_2m", "dpmpp_3m", "unipc")
STEINDIFF_SCHEDULES = ("karras", "logsnr", "time")
#: Cross-checks: a diffusers configuration and the steindiff one that runs the same solver over the same
#: noise levels with the same network time (diffusers' multistep schedulers round the timesteps of Karras
#: and log-SNR sigmas; Euler passes fractional ones but starts from ``eps * sigma_max``).
PAIRS = (("diffusers:DPMSolverMultistepScheduler/2M-karras", "steindiff dpmpp_2m karras t-round"),
         ("diffusers:DPMSolverMultistepScheduler/3M-karras", "steindiff dpmpp_3m karras t-round"),
         ("diffusers:DPMSolverMultistepScheduler/2M-lu", "steindiff dpmpp_2m logsnr t-round"),
         ("diffusers:DPMSolverMultistepScheduler/3M-lu", "steindiff dpmpp_3m logsnr t-round"),
         ("diffusers:UniPCMultistepScheduler-karras", "steindiff unipc karras t-round"),
         ("diffusers:EulerDiscreteScheduler-karras", "steindiff euler karras"))
REF_SOLVER, REF_STEPS = "dpmpp_3m", 1000
#: The calibrated sampler's label (as in steindiff's bench) and its refinement's time budget: high, so that the
#: refinement stops at the bench's budget of solves (``max_solves``) or on convergence, and is reproducible.
CALIBRATED, CAL_MAX_SECONDS = "cal:trajectory", 3600.0
METRICS = ("sw2", "nll", "mode_tv", "traj_err")


#: Spacings named in a peer's label (the scheduler's default spacing is not).
LABELLED_SPACINGS = ("karras", "trailing", "lu")


@dataclass(frozen=True)
class Peer:
    """One diffusers configuration: scheduler class, the label of its solver, the spacing and the
    config overrides (besides the betas)."""

    cls: str
    solver: str
    spacing: str
    overrides: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        suffix = "" if self.spacing not in LABELLED_SPACINGS else f"-{self.spacing}"
        return f"diffusers:{self.solver}{suffix}"


def peers() -> list[Peer]:
    """diffusers' DPM-Solver++ 2M and 3M, UniPC (bh2), DDIM and Euler; each with its default spacing,
    ``trailing``, and Karras sigmas where the scheduler offers them (DDIM does not); DPM-Solver++ also with
    ``use_lu_lambdas`` (uniform log-SNR steps, Lu et al. 2022: the noise levels of steindiff's ``logsnr``),
    labelled ``-lu``."""
    out = []
    for cls, solver, extra, default in (
            ("DPMSolverMultistepScheduler", "DPMSolverMultistepScheduler/2M", {"solver_order": 2}, "linspace"),
            ("DPMSolverMultistepScheduler", "DPMSolverMultistepScheduler/3M", {"solver_order": 3}, "linspace"),
            ("UniPCMultistepScheduler", "UniPCMultistepScheduler", {}, "linspace"),
            ("DDIMScheduler", "DDIMScheduler", {"clip_sample": False}, "leading"),
            ("EulerDiscreteScheduler", "EulerDiscreteScheduler", {}, "linspace")):
        out.append(Peer(cls, solver, default, {**extra, "timestep_spacing": default}))
        out.append(Peer(cls, solver, "trailing", {**extra, "timestep_spacing": "trailing"}))
        if cls != "DDIMScheduler":
            out.append(Peer(cls, solver, "karras", {**extra, "use_karras_sigmas": True}))
        if cls == "DPMSolverMultistepScheduler":
            out.append(Peer(cls, solver, "lu", {**extra, "use_lu_lambdas": True}))
    return out


@dataclass(frozen=True)
class Plain:
    """One steindiff plain solver configuration (``timestep``: how the VP network's time is given)."""

    solver: str
    schedule: str
    timestep: str = "interp"

    @property
    def label(self) -> str:
        return "none" if self.timestep == "interp" else f"none[t-{self.timestep}]"


def plains() -> list[Plain]:
    """Every solver on every schedule with fractional timesteps, and on ``karras`` and ``logsnr`` with
    rounded ones (the cross-checks, :data:`PAIRS`)."""
    return [Plain(s, sch, t) for t in ("interp", "round") for s in STEINDIFF_SOLVERS for sch in STEINDIFF_SCHEDULES
            if t == "interp" or sch != "time"]


class CountingNet:
    """``eps(x_vp, t)`` of the mixture on the VP process, counting calls (one call = one model pass of the batch)."""

    def __init__(self, gmm, process: DiscreteVPProcess):
        self.eps = gmm.epsilon_net(process)
        self.calls = 0

    def __call__(self, x_vp: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        t = torch.as_tensor(t, dtype=torch.float64)
        if t.ndim == 0:
            t = t.expand(x_vp.shape[0])
        return self.eps(x_vp.to(torch.float64), t)


def scheduler_config(betas: str) -> dict:
    kind, b0, b1 = BETAS[betas]
    return {"num_train_timesteps": 1000, "beta_schedule": kind, "beta_start": b0, "beta_end": b1,
            "prediction_type": "epsilon"}


def make_scheduler(peer: Peer, betas: str):
    import diffusers

    return getattr(diffusers, peer.cls)(**scheduler_config(betas), **peer.overrides)


def run_diffusers(peer: Peer, betas: str, gmm, process: DiscreteVPProcess, latents: torch.Tensor, nfe: int) -> dict:
    """diffusers' own loop with ``nfe`` inference steps (each of these schedulers makes one model pass per
    step); the final samples (clean: every configuration here ends at ``sigma = 0``), the VE noise
    levels it visited, its timesteps and the counted passes."""
    sch = make_scheduler(peer, betas)
    sch.set_timesteps(nfe)
    net = CountingNet(gmm, process)
    x = latents.to(torch.float32) * sch.init_noise_sigma
    t0 = time.perf_counter()
    with torch.no_grad():
        for t in sch.timesteps:
            eps = net(sch.scale_model_input(x, t), t)
            x = sch.step(eps.to(x.dtype), t, x).prev_sample
    wall = time.perf_counter() - t0
    ts = [float(t) for t in sch.timesteps]
    if hasattr(sch, "sigmas") and sch.sigmas is not None and len(sch.sigmas) == len(ts) + 1:
        sigmas = [float(s) for s in sch.sigmas]
    else:  # DDIM: the table at its timesteps, then its final alpha (1 with set_alpha_to_one: sigma 0)
        sigmas = [float(process.t_to_sigma(t)) for t in ts]
        sigmas += [0.0 if sch.config.set_alpha_to_one else process.sigma_min]
    return {"x": x.to(torch.float64), "nfe": net.calls, "steps": len(ts), "timesteps": ts, "sigmas": sigmas,
            "wall_s": wall, "init_noise_sigma": float(sch.init_noise_sigma)}


def vp_denoiser(gmm, process: DiscreteVPProcess, timestep: str) -> tuple[VPDenoiser, CountingNet]:
    net = CountingNet(gmm, process)
    return VPDenoiser(net, process, "epsilon", timestep=timestep), net


def run_plan(plan: SamplingPlan, gmm, process: DiscreteVPProcess, noise_ve: torch.Tensor,
             timestep: str = "interp") -> dict:
    """steindiff's ``plan`` (its solver over its noise levels, with its per-step gammas if any) from ``noise_ve``."""
    den, net = vp_denoiser(gmm, process, timestep)
    res = sample(den, noise_ve, plan.sigmas, plan.get_solver(), stabilizer=plan.stabilizer(), dtype=torch.float64)
    return {"x": res.x, "nfe": net.calls, "steps": plan.steps, "sigmas": [float(s) for s in plan.sigmas],
            "wall_s": res.wall_s}


def run_plain(cfg: Plain, gmm, process: DiscreteVPProcess, noise_ve: torch.Tensor, nfe: int) -> dict:
    """steindiff's plain solver over the process's ``cfg.schedule`` noise levels within ``nfe`` passes."""
    return run_plan(make_plan(process, cfg.solver, nfe, cfg.schedule), gmm, process, noise_ve, cfg.timestep)


def vp_spec(gmm, process: DiscreteVPProcess, name: str) -> ModelSpec:
    """The model the calibration sees: the same ``VPDenoiser`` over the mixture's epsilon network."""
    return ModelSpec(name, vp_denoiser(gmm, process, "interp")[0], process, (gmm.dim,), gmm=gmm)


def calibration_budget(spec: ModelSpec, overrides: dict | None = None) -> dict:
    """The bench's calibration options for mixtures, ``max_seconds`` = :data:`CAL_MAX_SECONDS`, then ``overrides``."""
    return {**calibration_options(spec), "max_seconds": CAL_MAX_SECONDS, **(overrides or {})}


def fit_calibrated(cfg: Plain, spec: ModelSpec, nfe: int, options: dict, ref=None) -> tuple[SamplingPlan, SamplingPlan]:
    """The plain plan of ``cfg`` within ``nfe`` passes and its trajectory calibration (``options``:
    :func:`calibration_budget`; ``ref``: a reference solve of the calibration noise to share)."""
    base = make_plan(spec.process, cfg.solver, nfe, cfg.schedule)
    sched = calibrate(spec, base, objective="trajectory", dtype=torch.float64, ref=ref, **options)
    return base, plan_from_schedule(sched, base)


def run_calibrated(base: SamplingPlan, plan: SamplingPlan, gmm, process: DiscreteVPProcess,
                   noise_ve: torch.Tensor) -> dict:
    """The calibrated ``plan`` from ``noise_ve``; its counted model passes must be the plain ``base``'s."""
    out = run_plan(plan, gmm, process, noise_ve)
    if out["nfe"] != base.nfe:
        raise AssertionError(f"calibrated {base.solver} made {out['nfe']} model passes, the plain solver {base.nfe}")
    return {**out, "calibration": _calibration_summary(plan.meta), "calibrated_gammas": list(plan.gammas)}


def _calibrated_job(fitted, gmm, process: DiscreteVPProcess, noise_ve: torch.Tensor) -> dict:
    if isinstance(fitted, Exception):
        raise fitted
    return run_calibrated(*fitted, gmm, process, noise_ve)


def _floors(gmm, n: int, seed: int) -> dict[str, float]:
    """``mode_tv`` and ``nll`` of an independent true sample set of the same size (seed ``30000 + seed``),
    the floors of steindiff's grid (``steindiff/bench/runner.py``)."""
    m = mixture_metrics(gmm.sample(n, seed=30_000 + seed), gmm, seed=seed)
    return {"mode_tv_floor": m["mode_tv"], "nll_floor": m["nll"]}


def run_peers(*, betas: str = "scaled_linear", nfes: Sequence[int] = NFES, seeds: Sequence[int] = SEEDS, n: int = 1000,
              peer_list: Sequence[Peer] | None = None, plain_list: Sequence[Plain] | None = None,
              ref_steps: int = REF_STEPS, calibrated: bool = True, calibration: dict | None = None,
              progress: bool = True) -> dict:
    """Every configuration x NFE x seed; the ``steindiff.bench/1``-like result (``machine``, ``config``, ``rows``).

    ``calibrated``: also the calibrated sampler of each configuration of ``plain_list`` with fractional
    timesteps, fitted once per NFE before the seeds (``calibration``: overrides of :func:`calibration_budget`)."""
    if betas not in BETAS:
        raise ValueError(f"unknown betas {betas!r}; choose one of {', '.join(BETAS)}")
    if n < 2 or not nfes or not seeds or any(int(k) < 1 for k in nfes):
        raise ValueError(f"need n >= 2, at least one NFE >= 1 and one seed (got n={n}, nfe={list(nfes)}, "
                         f"seeds={list(seeds)})")
    from tqdm.auto import tqdm

    gmm = get_gmm(MODEL)
    kind, b0, b1 = BETAS[betas]
    process = DiscreteVPProcess(beta_schedule=kind, beta_start=b0, beta_end=b1, num_train_timesteps=1000)
    model = f"{MODEL}@vp-{betas}"
    peer_list = list(peers() if peer_list is None else peer_list)
    plain_list = list(plains() if plain_list is None else plain_list)
    machine = machine_info()
    machine["started"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    rows: list[dict] = []
    t_start = time.perf_counter()
    cal_list = [c for c in plain_list if c.timestep == "interp"] if calibrated else []
    spec = vp_spec(gmm, process, model)
    cal_opts = calibration_budget(spec, calibration)
    cal_plans: dict[tuple[Plain, int], Any] = {}
    cal_ref = None
    if cal_list:  # one reference solve of the calibration noise, shared by every cell (it depends on the noise only)
        cal_ref = _calibration_reference(spec, cal_opts)
    for c in tqdm(cal_list, disable=not progress, desc="calibrate", leave=False):
        for nfe in nfes:
            try:
                cal_plans[c, nfe] = fit_calibrated(c, spec, nfe, cal_opts, cal_ref)
            except Exception as e:  # a calibration that fails is a result: its rows say so
                cal_plans[c, nfe] = e
    bar = tqdm(total=len(seeds) * len(nfes) * (len(peer_list) + len(plain_list) + len(cal_list)),
               disable=not progress, desc="peers", leave=False)
    for seed in seeds:
        # the grid's standard normal draws for this seed: VE state at the process's sigma_max, and the VP latents
        noise_ve = prior_noise((n, gmm.dim), process.sigma_max, process, seed=seed, dtype=torch.float64)
        latents = noise_ve / math.sqrt(1.0 + process.sigma_max**2)
        den, _ = vp_denoiser(gmm, process, "interp")
        ref = sample(den, noise_ve, get_sigmas("karras", ref_steps, process), REF_SOLVER, dtype=torch.float64).x
        floors = _floors(gmm, n, seed)
        # the reference solve's own metrics: how far the best this process allows is from the data
        rmet = mixture_metrics(ref, gmm, seed=seed, ref=ref)
        rmet.update(floors)
        rows.append({"model": model, "seed": seed, "coords": "-", "n": n, "reused": False, "solver": REF_SOLVER,
                     "schedule": "karras", "stabilizer": "reference", "nfe_budget": ref_steps, "framework": "reference",
                     "nfe": ref_steps, "steps": ref_steps, "metrics": rmet, "status": "ok", "extra_passes": 0})
        jobs: list[tuple[dict, Callable[[], dict]]] = []
        for nfe in nfes:
            for p in peer_list:
                jobs.append(({"solver": p.solver, "schedule": p.spacing, "stabilizer": p.label, "nfe_budget": nfe,
                              "framework": "diffusers", "scheduler": p.cls, "scheduler_overrides": dict(p.overrides)},
                             lambda p=p, nfe=nfe: run_diffusers(p, betas, gmm, process, latents, nfe)))
            for c in plain_list:
                jobs.append(({"solver": c.solver, "schedule": c.schedule, "stabilizer": c.label, "nfe_budget": nfe,
                              "framework": "steindiff", "timestep": c.timestep},
                             lambda c=c, nfe=nfe: run_plain(c, gmm, process, noise_ve, nfe)))
            for c in cal_list:
                jobs.append(({"solver": c.solver, "schedule": c.schedule, "stabilizer": CALIBRATED, "nfe_budget": nfe,
                              "framework": "steindiff", "timestep": c.timestep},
                             lambda c=c, nfe=nfe: _calibrated_job(cal_plans[c, nfe], gmm, process, noise_ve)))
        for base, job in jobs:
            row = {"model": model, "seed": seed, "coords": "-", "n": n, "reused": False, **base}
            try:
                out = job()
                metrics = mixture_metrics(out["x"], gmm, seed=seed, ref=ref)
                metrics.update(floors)
                row.update(nfe=out["nfe"], steps=out["steps"], sigmas=out["sigmas"], metrics=metrics, status="ok",
                           wall_s_per_sample=out["wall_s"] / n, extra_passes=0)
                for k in ("timesteps", "init_noise_sigma", "calibration", "calibrated_gammas"):
                    if k in out:
                        row[k] = out[k]
            except Exception as e:  # a configuration that fails is a result
                row.update(nfe=None, steps=None, metrics={}, status=f"failed: {type(e).__name__}: {e}")
            rows.append(row)
            bar.update(1)
    bar.close()
    machine["wall_s_total"] = time.perf_counter() - t_start
    import diffusers

    config = {"models": [model], "base_model": MODEL, "nfe": list(nfes), "seeds": list(seeds), "n": n,
              "process": {"kind": "vp-discrete", "betas": kind, "beta_start": b0, "beta_end": b1,
                          "num_train_timesteps": 1000, "sigma_min": process.sigma_min, "sigma_max": process.sigma_max},
              "noise": "latents eps = the grid's standard normal draws of the seed (steindiff.sampling.prior_noise); "
                       "diffusers: eps * init_noise_sigma; steindiff: VE state eps * sqrt(1 + sigma_max^2)",
              "network": "eps(x_vp, t) of the exact mixture; fractional t: log-sigma interpolation of the table",
              "peers": [{"label": p.label, "scheduler": p.cls, "solver": p.solver, "spacing": p.spacing,
                         "overrides": dict(p.overrides)} for p in peer_list],
              "steindiff": [{"label": c.label, "solver": c.solver, "schedule": c.schedule, "timestep": c.timestep}
                            for c in plain_list],
              "reference": {"solver": REF_SOLVER, "steps": ref_steps, "schedule": "karras"},
              "calibration": None if not cal_list else {
                  **cal_opts, "objective": "trajectory", "configs": [f"{c.solver} {c.schedule}" for c in cal_list],
                  "reference": {"solver": cal_ref.solver, "steps": cal_ref.steps, "schedule": "logsnr",
                                "convergence_rms": cal_ref.convergence, "wall_s": cal_ref.wall_s}},
              "diffusers_version": diffusers.__version__, "torch_version": torch.__version__}
    return {"schema": SCHEMA, "machine": machine, "config": config, "rows": rows}


# ------------------------------------------------------------------------------------------------
# summary and Markdown
# ------------------------------------------------------------------------------------------------
#: The groups compared per NFE: diffusers' schedulers, steindiff's plain solvers, steindiff's calibrated sampler.
GROUPS = ("diffusers", "steindiff", "calibrated")


def group(row: dict) -> str:
    """``diffusers``, ``steindiff`` (plain), ``calibrated`` or ``reference``."""
    return "calibrated" if row["stabilizer"] == CALIBRATED else row["framework"]


def cell_label(row: dict) -> str:
    """One configuration's name in the tables: ``diffusers:<scheduler>[-karras|-trailing]`` (default spacing
    named when it is not in the label), or ``steindiff <solver> <schedule>[ t-round| cal:trajectory]``."""
    if row["framework"] == "diffusers":
        return row["stabilizer"] if row["schedule"] in LABELLED_SPACINGS else f"{row['stabilizer']} ({row['schedule']})"
    if row["framework"] == "reference":
        return f"reference ({row['solver']}, {row['steps']} {row['schedule']} steps)"
    t = {"none": "", CALIBRATED: f" {CALIBRATED}"}.get(row["stabilizer"], " t-round")
    return f"steindiff {row['solver']} {row['schedule']}{t}"


def summarize(result: dict) -> dict:
    """Per configuration and NFE: mean and seed spread (sample std) of each excess metric, the failures;
    per NFE the best configuration of each group (:data:`GROUPS`) by mean excess ``sw2``, with the best
    calibrated one's per-seed comparison with the best diffusers one (``below_diffusers``: on how many
    seeds its excess sw2 is lower, of how many); the calibrations' cost and choices (``calibration``)."""
    cells: dict[tuple[str, int], dict] = {}
    cal: dict[tuple, dict] = {}
    for r in result["rows"]:
        c = cells.setdefault((cell_label(r), r["nfe_budget"]), {"group": group(r), "values": {}, "failed": 0,
                                                                 "nfe": set(), "sw2_by_seed": {}})
        if r.get("calibration"):
            cal.setdefault((r["solver"], r["schedule"], r["nfe_budget"]), r["calibration"])
        if r["status"] != "ok":
            c["failed"] += 1
            continue
        c["nfe"].add(r["nfe"])
        for m in METRICS:
            v = excess(r["metrics"], m)
            if v is not None:
                c["values"].setdefault(m, []).append(v)
        c["sw2_by_seed"][r["seed"]] = excess(r["metrics"], "sw2")
    out: dict[str, Any] = {"cells": {}, "best": {}}
    for (label, nfe), c in cells.items():
        stats = {m: {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0}
                 for m, v in c["values"].items()}
        out["cells"].setdefault(label, {"group": c["group"], "by_nfe": {}})["by_nfe"][nfe] = {
            "excess": stats, "failed": c["failed"], "nfe": sorted(c["nfe"]), "sw2_by_seed": c["sw2_by_seed"]}
    for nfe in sorted({k[1] for k in cells}):
        for g in GROUPS:
            cand = [(v["by_nfe"][nfe]["excess"]["sw2"]["mean"], label) for label, v in out["cells"].items()
                    if v["group"] == g and nfe in v["by_nfe"] and "sw2" in v["by_nfe"][nfe]["excess"]
                    and not v["by_nfe"][nfe]["failed"]]
            if cand:
                best = min(cand)
                out["best"].setdefault(nfe, {})[g] = {"label": best[1], "excess_sw2": best[0]}
        b = out["best"].get(nfe, {})
        if "calibrated" in b and "diffusers" in b:
            sc, sd = (out["cells"][b[g]["label"]]["by_nfe"][nfe]["sw2_by_seed"] for g in ("calibrated", "diffusers"))
            seeds = sorted(set(sc) & set(sd))
            b["calibrated"]["below_diffusers"] = [sum(sc[k] < sd[k] for k in seeds), len(seeds)]
    if cal:
        def spread(v: list[float]) -> dict:
            return {"median": statistics.median(v), "min": min(v), "max": max(v), "total": sum(v)} if v else {}

        chosen: dict[str, int] = {}
        for c in cal.values():
            chosen[c["chosen"]] = chosen.get(c["chosen"], 0) + 1
        # each calibrated cell against the same plain solver, schedule and NFE on the evaluation seeds
        pairs = []
        for label, cell in out["cells"].items():
            plain = out["cells"].get(label.removesuffix(f" {CALIBRATED}"), {}).get("by_nfe", {})
            if cell["group"] == "calibrated":
                pairs += [(c["excess"], plain[k]["excess"]) for k, c in cell["by_nfe"].items()
                          if k in plain and not c["failed"] and not plain[k]["failed"]]
        out["calibration"] = {
            "cells": len(cal), "chosen": dict(sorted(chosen.items())),
            **{k: spread([c[k] for c in cal.values() if c.get(k) is not None]) for k in ("wall_s", "solves",
                                                                                          "val_ratio")},
            "traj_err_ratio": spread([a["traj_err"]["mean"] / b["traj_err"]["mean"] for a, b in pairs
                                      if b["traj_err"]["mean"] > 0]),
            "sw2_higher_than_plain": sum(a["sw2"]["mean"] > b["sw2"]["mean"] for a, b in pairs)}
    return out


def _fmt(s: dict | None, digits: int = 4) -> str:
    if s is None:
        return "-"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def _reference_line(summ: dict, process: dict) -> str:
    ref = [v for v in summ["cells"].values() if v["group"] == "reference"]
    if not ref:
        return ""
    (cell,) = ref[0]["by_nfe"].values()
    ex = cell["excess"]
    return ("**The reference solve itself** (same model, same noise) has excess sw2 "
            f"{_fmt(ex.get('sw2'))}, NLL {_fmt(ex.get('nll'), 3)}, mode TV {_fmt(ex.get('mode_tv'), 3)}: every solve "
            "on this process ends with a jump from its smallest sigma to 0 (one denoising step), from the table's "
            f"smallest sigma, {process['sigma_min']:.4f}, at best, which is not small beside the mixture's isotropic "
            "spread (std 0.03): that last denoising step shrinks it. Few-step solvers cannot be expected to go below "
            "these numbers by much.")


def _calibration_setup(cal: dict) -> str:
    return ("- **steindiff calibrated** (`cal:trajectory`). Each of steindiff's configurations with fractional "
            "timesteps, at each NFE, calibrated once (not per seed) by `steindiff.calibration.calibrate` (objective "
            "`trajectory`: per-step gammas and interior noise levels fitted towards the ODE's solution, kept only "
            "where they beat the plain solver on the validation half) of its plain plan, for the same `VPDenoiser`, on "
            f"calibration noise of seed {cal['seed']} (disjoint from the evaluation seeds), n = {cal['n']}, a "
            f"{cal['reference']['steps']}-step `{cal['reference']['solver']}` reference solve of that noise shared by "
            f"every cell, a budget of {cal['max_solves']} solves (`max_seconds` {cal['max_seconds']:g}: the "
            "refinement stops at the solve budget or on convergence, never on the clock): the bench's options for "
            "mixtures. Every seed is then sampled with the fitted plan from the same "
            "noise as the plain rows, with the same counted model passes (checked); the calibration's time is not "
            "in the sampling time.")


def _calibration_line(stats: dict, cal: dict) -> str:
    ch = ", ".join(f"{k} {v}" for k, v in stats["chosen"].items())
    w, s, v, t = stats["wall_s"], stats["solves"], stats["val_ratio"], stats["traj_err_ratio"]
    return (f"**The calibrations** ({stats['cells']} cells; candidate kept on validation: {ch}): fit time per cell "
            f"median {w['median']:.1f} s, max {w['max']:.1f} s ({w['total']:.0f} s in all), plus the shared reference "
            f"solve's {cal['reference']['wall_s']:.1f} s once (its convergence: RMS "
            f"{cal['reference']['convergence_rms']:.1e}); {s['median']:.0f} solves per cell (median; min "
            f"{s['min']:.0f}, max {s['max']:.0f}). Distance to the reference solve, calibrated / plain: on the "
            f"validation noise median {v['median']:.2f} (best {v['min']:.2f}); on the evaluation seeds (traj_err) "
            f"median {t['median']:.2f} (best {t['min']:.2f}, worst {t['max']:.2f}). Mean excess sw2 above the same "
            f"plain solver's in {stats['sw2_higher_than_plain']} of {stats['cells']} cells.")


def _init_sigmas(result: dict) -> str:
    seen: dict[str, set] = {}
    for r in result["rows"]:
        if r.get("init_noise_sigma") is not None:
            seen.setdefault(r["scheduler"], set()).add(round(r["init_noise_sigma"], 4))
    return "; ".join(f"{k}: {', '.join(f'{v:g}' for v in sorted(vs))}" for k, vs in sorted(seen.items()))


def markdown(result: dict, command: str) -> str:
    cfg, mach = result["config"], result["machine"]
    cal = cfg.get("calibration")
    summ = summarize(result)
    nfes = sorted(cfg["nfe"])
    p = cfg["process"]
    lines = [
        f"# Peer row: diffusers' schedulers and steindiff's plain and calibrated solvers on `{cfg['base_model']}` "
        "as a VP epsilon network",
        "",
        f"Regenerate: `{command}` (the Markdown alone, from the JSON: `python benchmarks/diffusers_peers.py "
        "--from-json FILE.json --markdown FILE.md`).",
        "",
        f"{len(result['rows'])} runs; {len(cfg['seeds'])} seeds ({', '.join(map(str, cfg['seeds']))}), N = {cfg['n']} "
        f"samples each; wall time {mach['wall_s_total']:.0f} s on {mach.get('cpu_count', '?')} CPU cores "
        f"(torch threads: {mach.get('torch_threads', '?')}); diffusers {cfg['diffusers_version']}, "
        f"torch {cfg['torch_version']}.",
        "",
        "## Setup",
        "",
        f"- **Model.** The exact mixture `{cfg['base_model']}` as an epsilon-prediction network on a discrete VP "
        f"process: 1000 timesteps, `{p['betas']}` betas from {p['beta_start']} to {p['beta_end']} "
        f"({'Stable Diffusion' if p['betas'] == 'scaled_linear' else 'DDPM'}'s), so VE noise levels "
        f"sigma in [{p['sigma_min']:.4f}, {p['sigma_max']:.2f}]. `eps(x_vp, t) = (x_ve - D(x_ve, sigma_t)) / sigma_t`, "
        "`x_ve = x_vp sqrt(1 + sigma_t^2)`; at a fractional timestep sigma_t is interpolated linearly in log sigma.",
        "- **Noise.** Per seed, every configuration starts from the same standard normal draws `eps`, those of "
        "steindiff's benchmark grid for the seed (its VE noise at sigma_max = 80 is `80 eps`). diffusers: latents "
        "`eps`, scaled by the scheduler's `init_noise_sigma` as its pipelines do "
        f"({_init_sigmas(result)}). steindiff: the VE state `eps sqrt(1 + sigma_max^2)` at "
        f"sigma_max = {p['sigma_max']:.4f} (= {math.sqrt(1 + p['sigma_max'] ** 2):.4f} eps).",
        "- **diffusers.** Each scheduler's own loop (`set_timesteps`, `scale_model_input`, `step`), one model pass per "
        "step (counted), diffusers' defaults except the betas, `solver_order` (2M/3M), the spacing "
        "(`timestep_spacing`, or `use_karras_sigmas=True`) and `clip_sample=False` for DDIM. Defaults that matter: "
        "`algorithm_type=dpmsolver++`, `lower_order_final=True`, `final_sigmas_type=zero` (DPM-Solver, UniPC bh2), "
        "`set_alpha_to_one=True` (DDIM), `steps_offset=0`. Default spacings: `linspace` (DDIM: `leading`, which starts "
        "below sigma_max). With Karras sigmas DPM-Solver and UniPC pass the network *rounded* timesteps while "
        "their update uses the unrounded sigma; Euler passes fractional timesteps.",
        "- **steindiff.** The plain solvers `euler`, `dpmpp_2m`, `dpmpp_3m`, `unipc` (bh2) on the process's `karras`, "
        "`logsnr` and `time` (uniform in the timestep) noise levels, through `VPDenoiser` (fractional timesteps); "
        "`t-round` rows give the network rounded timesteps as diffusers' multistep schedulers do. diffusers' "
        "`-lu` rows (`use_lu_lambdas=True`) are uniform log-SNR steps, the noise levels of steindiff's `logsnr`.",
        *([_calibration_setup(cal)] if cal else []),
        f"- **Metrics.** `steindiff.metrics.mixture_metrics` against the mixture; excess = metric - floor "
        f"(NLL two-sided, |nll - floor|), floors as in steindiff's grid; `traj_err` against a "
        f"`{cfg['reference']['solver']}` solve of {cfg['reference']['steps']} Karras steps of the same model from "
        "the same noise. Mean ± seed std. "
        "Most of the seed spread of excess sw2 is the floor's (sw2 between two true sample sets), which every row of "
        "a seed shares: rows are paired (same noise, same floor), so their means compare more finely than the spread "
        "suggests.",
        "",
        "**Not comparable with the committed VE grid** (`docs/results/image64.md`): there the mixture is sampled "
        "on its VE process, sigma in [0.002, 80]; here through the discrete VP process, sigma in "
        f"[{p['sigma_min']:.4f}, {p['sigma_max']:.2f}], so every solve starts at another noise level and its last "
        "step jumps to 0 from a larger sigma. Compare rows within this file only.",
        "",
        _reference_line(summ, p),
        "",
        "## Best per NFE (excess sliced W2)",
        "",
        "The best configuration of each group at each NFE by mean excess sw2; a ratio below 1: steindiff's best "
        "(plain, or calibrated) is ahead of diffusers' best at that NFE. Last column: on how many seeds the best "
        "calibrated configuration's excess sw2 is below the best diffusers one's (paired: same noise, same floor).",
        "",
        "| NFE | best diffusers | excess sw2 | best steindiff plain | excess sw2 | plain / diffusers "
        "| best steindiff calibrated | excess sw2 | calibrated / diffusers | calibrated below diffusers (seeds) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for nfe in nfes:
        b = summ["best"].get(nfe, {})
        d = b.get("diffusers")
        cols = [f"{d['label']} | {d['excess_sw2']:.4f}" if d else "- | -"]
        for g in ("steindiff", "calibrated"):
            s = b.get(g)
            ratio = f"{s['excess_sw2'] / d['excess_sw2']:.2f}" if d and s and d["excess_sw2"] > 0 else "-"
            cols.append(f"{s['label']} | {s['excess_sw2']:.4f} | {ratio}" if s else "- | - | -")
        below = b.get("calibrated", {}).get("below_diffusers")
        cols.append(f"{below[0]} of {below[1]}" if below else "-")
        lines.append(f"| {nfe} | " + " | ".join(cols) + " |")
    if cal and summ.get("calibration"):
        lines += ["", _calibration_line(summ["calibration"], cal)]
    for metric, title in (("sw2", "Excess sliced W2"), ("nll", "Excess NLL (|nll - floor|)"),
                          ("mode_tv", "Excess mode TV"), ("traj_err", "Distance to the reference solve (traj_err)")):
        lines += ["", f"## {title}, mean ± seed std", "",
                  "| configuration | " + " | ".join(f"NFE {k}" for k in nfes) + " |",
                  "|---|" + "---|" * len(nfes)]
        order = sorted((lab for lab in summ["cells"] if summ["cells"][lab]["group"] != "reference"),
                       key=lambda lab: (summ["cells"][lab]["group"] != "diffusers", lab))
        for label in order:
            cells = summ["cells"][label]["by_nfe"]
            vals = []
            for k in nfes:
                c = cells.get(k)
                if c is None:
                    vals.append("-")
                elif c["failed"]:
                    vals.append(f"failed ({c['failed']})")
                else:
                    v = _fmt(c["excess"].get(metric), 3 if metric in ("nll", "mode_tv") else 4)
                    best = summ["best"].get(k, {}).get(summ["cells"][label]["group"], {})
                    if metric == "sw2" and best.get("label") == label:
                        v = f"**{v}**"
                    vals.append(v)
            lines.append(f"| {label} | " + " | ".join(vals) + " |")
    lines += ["", "Bold: the best configuration of its group (diffusers, steindiff plain, steindiff calibrated) at "
              "that NFE (lowest mean excess sw2).", ""]
    checks = []
    for a, b in PAIRS:
        ca, cb = summ["cells"].get(a), summ["cells"].get(b)
        if ca and cb:
            diffs = [abs(ca["by_nfe"][k]["excess"]["sw2"]["mean"] - cb["by_nfe"][k]["excess"]["sw2"]["mean"])
                     for k in nfes if k in ca["by_nfe"] and k in cb["by_nfe"]
                     and "sw2" in ca["by_nfe"][k]["excess"] and "sw2" in cb["by_nfe"][k]["excess"]]
            if diffs:
                checks.append(f"| {a} | {b} | {max(diffs):.5f} |")
    if checks:
        lines += ["## Cross-check: the same solver on the same noise levels in both frameworks", "",
                  "| diffusers | steindiff | max over NFE of the difference in mean excess sw2 |", "|---|---|---|",
                  *checks, "", "Differences between the frameworks elsewhere come from the noise levels (spacings), "
                  "not from the solvers.", ""]
    odd = sorted({(cell_label(r), r["nfe_budget"], r["nfe"]) for r in result["rows"]
                  if r["status"] == "ok" and r["nfe"] != r["nfe_budget"]})
    if odd:
        lines += ["Model passes other than the budget: " + "; ".join(f"{a} at {b}: {c}" for a, b, c in odd), ""]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--betas", choices=sorted(BETAS), default="scaled_linear",
                   help="beta schedule of the discrete VP process (default: scaled_linear, Stable Diffusion's)")
    p.add_argument("--nfe", type=int, nargs="+", default=list(NFES), help="model-pass budgets (default: 3 4 5 6 8 10)")
    p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS), help="noise seeds (default: 0 1 2)")
    p.add_argument("--n", type=int, default=1000, help="samples per run (default: 1000)")
    p.add_argument("--ref-steps", type=int, default=REF_STEPS,
                   help=f"steps of the reference solve (default: {REF_STEPS})")
    p.add_argument("--json-out", metavar="FILE", help="write the rows (steindiff.bench/1 schema) as JSON")
    p.add_argument("--markdown", metavar="FILE", help="write the tables as Markdown")
    p.add_argument("--no-calibrated", action="store_true",
                   help="skip steindiff's calibrated sampler (cal:trajectory rows and their calibration)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    p.add_argument("--from-json", metavar="FILE",
                   help="do not run: write the Markdown (--markdown, else standard output) of saved results")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import diffusers  # noqa: F401
    except ImportError:
        print("diffusers_peers: error: diffusers is not installed (pip install diffusers)", file=sys.stderr)
        return 2
    torch.set_num_threads(max(1, args.threads))
    if args.from_json:
        try:
            saved = json.loads(Path(args.from_json).read_text())
            md = markdown(saved, saved["config"]["command"])
        except (OSError, ValueError, KeyError) as e:
            print(f"diffusers_peers: error: cannot read results {args.from_json!r}: {e}", file=sys.stderr)
            return 2
        if args.markdown:
            Path(args.markdown).write_text(md + "\n")
        else:
            print(md)
        return 0
    argv_list = list(sys.argv[1:] if argv is None else argv)
    command = "python benchmarks/diffusers_peers.py " + " ".join(shlex.quote(a) for a in argv_list)
    try:
        result = run_peers(betas=args.betas, nfes=args.nfe, seeds=args.seeds, n=args.n, ref_steps=args.ref_steps,
                           calibrated=not args.no_calibrated, progress=not args.no_progress)
    except ValueError as e:
        print(f"diffusers_peers: error: {e}", file=sys.stderr)
        return 2
    result["config"]["command"] = command.strip()
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(result, indent=1) + "\n")
    md = markdown(result, command.strip())
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(md + "\n")
    if not args.json_out and not args.markdown:
        print(md)
    else:
        print(f"diffusers_peers: {len(result['rows'])} runs in {result['machine']['wall_s_total']:.0f} s",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
