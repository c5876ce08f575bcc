"""The benchmark grid of the protocol (``/work/shared/benchmark-protocol.md``) on the mixture suite
and on image models with reference images (``digits``).

:func:`run_grid` samples every configuration ``model x seed x solver x schedule x NFE x
stabilizer x coords`` and returns the ``steindiff.bench/1`` object: ``machine``, ``config`` and one
row per configuration.  :func:`summarize` turns rows into per-cell means and spreads over seeds,
the protocol's verdicts (:func:`verdict`), the best vanilla configuration per NFE and cost ratios.
:func:`run_cost` measures wall-clock ratios ``stabilizer / none`` side by side (``--cost``).

Conventions (documented here once, used by the report and the CLI):

- Equal-NFE rule: every configuration of one ``(model, seed)`` starts from the same initial noise
  (drawn once at ``sigma_max``, which all schedules share).  States are float64 for mixtures,
  float32 for image models.
- Two kinds of model (:func:`model_kind`): an exact-score mixture (``spec.gmm``; metrics
  :func:`~steindiff.metrics.mixture_metrics`, primary metric ``sw2``) or an image model carrying
  reference images (``spec.info["heldout"]``, e.g. ``digits``, ``patches``; metrics
  :func:`~steindiff.metrics.image_model_metrics` of the samples clamped to [-1, 1], each with its
  floor, primary metric ``digits_fid``, or ``patch_fd`` for photo patches).  :func:`primary_metric` is
  the one place that says which metric ranks vanilla configurations and headlines the summary.
- ``none`` rows do not depend on the stabilizer's coordinates: they are run once per
  ``(model, seed, solver, schedule, nfe)`` and labelled ``coords = "-"``; every ``ve``/``vp``
  stabilizer cell is compared with that one vanilla cell.
- ``nfe`` in a row is the actual number of model passes per sample of the solve (Heun at a budget of
  4 makes 3; the look-ahead ``stein-sc`` adds one pass per step); ``nfe_budget`` is the requested
  grid value.  Cells are keyed by ``nfe_budget``.  A configuration whose schedule equals one already
  run (same steps) reuses that row (``reused: true``) instead of sampling it again.
- ``traj_err`` is measured against a reference solve (``ref_solver``, ``ref_steps`` steps, Karras
  schedule from the same ``sigma_max``) from the same initial noise, cached per ``(model, seed, n)``.
  Image models use at most ``IMAGE_REF_STEPS`` reference steps (``config.reference.image_model_steps``).
- A configuration that raises (non-finite statistics, non-finite samples, ...) is a result: its row
  has ``status = "failed: <reason>"`` and empty metrics; the grid goes on.
- Vanilla rows carry ``gammas = [1.0] * steps`` and empty ``gamma_raw`` and ``rho``.
- Peers (:mod:`steindiff.bench.peers`, e.g. ``peer:gits``) are fitted once per cell from the calibration noise
  and its fine solve, the ones ``cal:trajectory`` uses, and sampled like vanilla rows (``coords = "-"``: their
  plans carry no gamma); each row records its fit (``peer``: the distance it minimised, its wall time).
"""

from __future__ import annotations

import collections
import datetime as _dt
import itertools
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..calibration import CALIBRATION_SEED, calibrate, calibrated_plan
from ..diagnostics import RhoRecorder
from ..generate import generate
from ..metrics import image_model_metrics, mixture_metrics, traj_err
from ..models.registry import ModelSpec, load_model
from ..plan import SamplingPlan, make_plan
from ..sampling import prior_noise
from ..schedules import SCHEDULES, get_sigmas
from ..solvers import SOLVERS, get_solver, steps_for_nfe
from ..stabilizers import STABILIZERS, make_stabilizer
from ..stabilizers.registry import resolves_to_calibrated
from .peers import PEERS, PREFIX, fit_peer, peer_name

__all__ = ["SCHEMA", "COORDS", "METRICS", "validate_grid", "run_grid", "run_cost", "summarize", "verdict", "above_fine",
           "worse_than", "excess", "machine_info", "row_key", "label_of", "model_kind", "primary_metric",
           "IMAGE_METRICS", "DIGITS_METRICS", "IMAGE_REF_STEPS"]

SCHEMA = "steindiff.bench/1"
#: The calibrated sampler's label: trajectory calibration (:mod:`steindiff.trajectory`) fitted once per
#: cell on calibration noise (seed :data:`~steindiff.calibration.CALIBRATION_SEED`), applied to every seed.
TRAJECTORY = "cal:trajectory"
COORDS = ("ve", "vp")
#: Metrics of the summary, each as an "excess" over its floor (see :func:`excess`).
METRICS = ("sw2", "mode_tv", "nll", "traj_err", "mmd")
#: The same for image models (``traj_err`` is in :data:`METRICS`): digits, and photo patches.
DIGITS_METRICS = ("digits_fid", "digits_kid", "class_tv", "precision", "recall", "memorization")
IMAGE_METRICS = DIGITS_METRICS + ("patch_fd", "spectrum", "pixel_sw2")
#: Primary metrics, in the order :func:`primary_metric` looks for them in rows.
PRIMARY = ("patch_fd", "digits_fid", "sw2")
#: At most this many reference steps for image models (a U-Net pass costs far more than a mixture's).
IMAGE_REF_STEPS = 100
#: Stabilizers whose rows record their Hutchinson probe count.
PROBED = ("stein", "stein-tr", "stein-energy")
#: Stabilizers whose grid rows on mixtures record ``rho`` per step (:class:`~steindiff.diagnostics.RhoRecorder`).
RHO = ("stein", "stein-tr", "stein-exact", "stein-oracle")
_IMAGE_KEYS = ("heldout", "heldout_labels", "train")


def model_kind(spec: ModelSpec) -> str | None:
    """``"mixture"`` (exact score, ``spec.gmm``), ``"image"`` (reference images in ``spec.info``) or ``None``."""
    if spec.gmm is not None:
        return "mixture"
    info = spec.info or {}
    if all(info.get(k) is not None for k in _IMAGE_KEYS):
        return "image"
    return None


def primary_metric(obj: Any) -> str:
    """The primary metric: ``"sw2"`` for mixtures, ``"digits_fid"`` for image models, ``"patch_fd"`` for
    models of photo patches.

    ``obj``: a :class:`ModelSpec`, a row or cell (dict with ``metrics`` or ``excess``), or an iterable
    of rows or cells of one model (the first that has metrics decides; ``"sw2"`` when none has).
    """
    if isinstance(obj, ModelSpec):
        if model_kind(obj) != "image":
            return "sw2"
        return "patch_fd" if obj.info.get("metrics") == "patches" else "digits_fid"
    for r in ([obj] if isinstance(obj, dict) else obj):
        m = r.get("metrics") or r.get("excess") or {}
        found = next((p for p in PRIMARY if p in m), None)
        if found:
            return found
    return "sw2"


# -- validation -----------------------------------------------------------------------------------
def validate_grid(models: Sequence[str], solvers: Sequence[str], nfes: Sequence[int], schedules: Sequence[str],
                  coords: Sequence[str], stabilizers: Sequence[str], seeds: Sequence[int], n: int,
                  probes: int = 5, device: str | torch.device | None = None,
                  jacobian_batch: int | None = None, jacobian_precision: str = "fp32") -> dict[str, ModelSpec]:
    """Check every name and value of a grid before any work; return the loaded models (moved to
    ``device`` when given).

    Raises ``ValueError`` naming the first bad entry.  The benchmark needs exact-score mixtures
    (``gmm:...``) or image models with reference images (``digits``): its metrics compare with the
    true distribution or with held-out images.  Stabilizers that need the mixture (``stein-oracle``,
    ``stein-exact``) are rejected for image models.
    """
    stabilizers = resolve_auto(stabilizers)
    for name, xs in (("models", models), ("solvers", solvers), ("nfe", nfes), ("schedules", schedules),
                     ("coords", coords), ("stabilizers", stabilizers), ("seeds", seeds)):
        if not list(xs):
            raise ValueError(f"{name}: need at least one value")
        if len(set(xs)) != len(xs):
            raise ValueError(f"{name}: duplicate values in {list(xs)}")
    for what, xs, known in (("solver", solvers, SOLVERS), ("schedule", schedules, SCHEDULES),
                            ("coords", coords, COORDS)):
        for x in xs:
            if x not in known:
                raise ValueError(f"unknown {what} {x!r}; choose from {', '.join(known)}")
    for s in stabilizers:
        if s.startswith(PREFIX):
            peer_name(s)  # raises for an unknown peer
        elif s != TRAJECTORY and (s.removeprefix("cal:") not in STABILIZERS or s == "cal:none"):
            raise ValueError(f"unknown stabilizer {s!r}; choose from {', '.join(STABILIZERS)}, {TRAJECTORY} (the "
                             "calibrated sampler), cal:<stabilizer> (its gamma schedule calibrated on another "
                             f"batch, then applied), or a peer {', '.join(PREFIX + p for p in PEERS)}")
    whole = [(v, 1, "NFE values must be positive integers") for v in nfes]
    whole += [(v, 0, "seeds must be non-negative integers") for v in seeds]
    whole += [(n, 2, "n must be an integer >= 2 (Stein statistics are batch means)"),
              (probes, 1, "probes must be a positive integer")]
    for v, least, msg in whole:
        if isinstance(v, bool) or not isinstance(v, int) or v < least:
            raise ValueError(f"{msg}, got {v!r}")
    for s in solvers:
        for v in nfes:
            steps_for_nfe(get_solver(s), v)  # raises when one step does not fit
    specs = {}
    for m in models:
        spec = load_model(m)
        if model_kind(spec) is None:
            note = (spec.info or {}).get("data_note")
            raise ValueError(f"the benchmark needs an exact-score mixture model (gmm:...) or an image model with "
                             f"reference images (digits, patches), got {m!r}" + (f": {note}" if note else ""))
        specs[m] = spec if device is None else spec.to(device)
        for sch in schedules:  # the shared initial noise is drawn at sigma_max: every schedule must start there
            first = float(get_sigmas(sch, 2, spec.process)[0])
            if not math.isclose(first, spec.process.sigma_max, rel_tol=1e-9):
                raise ValueError(f"schedule {sch!r} of {m!r} starts at sigma {first:.6g}, not at the process's "
                                 f"sigma_max {spec.process.sigma_max:.6g}, where the benchmark draws every "
                                 "configuration's shared initial noise")
        for s in stabilizers:  # needs-mixture checks and option errors, before any work
            if s != TRAJECTORY and not s.startswith(PREFIX):
                make_stabilizer(s.removeprefix("cal:"), spec, coords=coords[0], probes=probes,
                                jacobian_batch=jacobian_batch, jacobian_precision=jacobian_precision)
    return specs


def resolve_auto(stabilizers: Sequence[str]) -> list[str]:
    """The grid's stabilizers with ``auto`` spelled as what it runs: :data:`TRAJECTORY` while ``auto`` is the
    calibrated sampler (the calibration ``sample --stabilizer auto`` uses: shipped with the model, else
    fitted once per cell), else the stabilizer it names."""
    from ..stabilizers.registry import AUTO

    return [TRAJECTORY if resolves_to_calibrated(s) else (AUTO if s == "auto" else s) for s in stabilizers]


# -- the grid -------------------------------------------------------------------------------------
def machine_info(device: str | torch.device | None = None) -> dict[str, Any]:
    """Where and with what the numbers were measured (absolute times are only comparable within a run);
    on CUDA also the card's name and the CUDA version (:func:`steindiff.device.describe_device`)."""
    from .._version import __version__
    from ..device import describe_device

    return {
        "platform": platform.platform(), "machine": platform.machine(), "processor": platform.processor(),
        "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
        "steindiff": __version__, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        **describe_device(device or "cpu"), "dtype": "float64",
        "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def row_key(row: dict) -> tuple:
    """The configuration a row belongs to (its cell plus its seed)."""
    return (row["model"], row["solver"], row["schedule"], row["coords"], row["nfe_budget"], row["stabilizer"],
            row["seed"])


def merge_results(shards: Sequence[dict]) -> dict:
    """One ``steindiff.bench/1`` result from shards of a grid run apart (e.g. one process per solver):
    rows concatenated, the grid's lists united, every other setting the same in all shards; the wall
    time is the longest shard's (they ran side by side) and the command lists every shard's."""
    if not shards:
        raise ValueError("no results to merge")
    if len(shards) == 1:
        return shards[0]
    config = dict(shards[0]["config"])
    for sh in shards[1:]:
        for k, v in sh["config"].items():
            if isinstance(v, list) and isinstance(config.get(k), list):
                config[k] = config[k] + [x for x in v if x not in config[k]]
            elif k == "calibration" and isinstance(v, dict):  # shards without a calibrated cell have none
                config[k] = merged = dict(config.get(k) or {})
                for m, opts in v.items():
                    if merged.setdefault(m, opts) != opts:
                        raise ValueError(f"the shards calibrated {m} with different options")
            elif config.get(k) != v:
                raise ValueError(f"the shards differ in {k!r}: {config.get(k)!r} and {v!r}")
    rows = [r for sh in shards for r in sh["rows"]]
    keys = [row_key(r) for r in rows]
    if len(set(keys)) != len(keys):
        raise ValueError("the shards overlap (a configuration appears in more than one)")
    machine = {**shards[0]["machine"], "wall_s_total": max(sh["machine"].get("wall_s_total") or 0 for sh in shards),
               "shards": len(shards)}
    command = "\n".join(c for c in (sh.get("command") for sh in shards) if c) or None
    return {**shards[0], "config": config, "machine": machine, "rows": rows, "command": command}


def label_of(cell: dict) -> str:
    """The stabilizer label of a row or cell: ``stein/ve``, ``stein-sc/vp``, ``none``."""
    return cell["stabilizer"] + ("" if cell["coords"] == "-" else f"/{cell['coords']}")


def _dtype(spec: ModelSpec) -> torch.dtype:
    return torch.float64 if model_kind(spec) == "mixture" else torch.float32


def _noise(spec: ModelSpec, n: int, seed: int) -> torch.Tensor:
    """The initial noise of ``n`` samples at ``sigma_max`` (shared by every configuration of a seed)."""
    return prior_noise((n, *spec.sample_shape), float(spec.process.sigma_max), spec.process, seed=seed,
                       dtype=_dtype(spec), device=spec.device or "cpu")


def _reference(spec: ModelSpec, noise: torch.Tensor, solver: str, steps: int) -> torch.Tensor:
    """The trajectory reference: ``steps`` Karras steps of ``solver``, at most :data:`IMAGE_REF_STEPS` for images."""
    sigmas = get_sigmas("karras", steps if model_kind(spec) == "mixture" else min(steps, IMAGE_REF_STEPS), spec.process)
    return generate(spec, solver=solver, sigmas=sigmas, noise=noise, n=noise.shape[0], dtype=_dtype(spec)).x


#: The gradient fit's budget per kind of model, in Adam steps per learning rate (and parameter set), with a time
#: cap: the gradient-fit study's (300 steps of 64 teacher pairs on mixtures, 150 of 32 on image models).  A time
#: budget alone made the fits depend on the machine's load: the bench's 40 s cut digits fits short and left more
#: hidden trades (benchmarks/guards_study.py --fit-method gradient, docs/guards.md).
GRADIENT_BUDGET: dict[str, dict[str, Any]] = {
    "mixture": {"max_seconds": 600.0, "gradient_options": {"max_iters": 300, "batch_size": 64}},
    "image": {"max_seconds": 600.0, "gradient_options": {"max_iters": 150, "batch_size": 32}},
}


def calibration_options(spec: ModelSpec, fit_method: str | None = None) -> dict[str, Any]:
    """Defaults of the ``cal:trajectory`` calibration per kind of model: batch ``n`` (half validates),
    calibration seed (disjoint from evaluation seeds), fine-solve steps and the refinement's budget; for the
    gradient fit its own budget (:data:`GRADIENT_BUDGET`)."""
    kind = "mixture" if model_kind(spec) == "mixture" else "image"
    if kind == "mixture":
        opts = {"n": 512, "seed": CALIBRATION_SEED, "ref_steps": 200, "max_solves": 200, "max_seconds": 45.0}
    else:
        opts = {"n": 256, "seed": CALIBRATION_SEED, "ref_steps": 100, "max_solves": 120, "max_seconds": 40.0}
    return {**opts, **GRADIENT_BUDGET[kind]} if fit_method == "gradient" else opts


def cell_calibration(spec: ModelSpec, calibration: dict | None) -> dict[str, Any]:
    """The ``cal:trajectory`` options of a grid's cells: :func:`calibration_options` overridden by the bench's
    ``calibration`` (the command line's), ``gradient_options`` merged key by key (a start given keeps the budget)."""
    given = dict(calibration or {})
    opts = calibration_options(spec, given.get("fit_method"))
    if "gradient_options" in given:
        given["gradient_options"] = {**opts.get("gradient_options", {}), **(given["gradient_options"] or {})}
    return {**opts, **given}


def _calibration_reference(spec: ModelSpec, opts: dict):
    """The fine solve of a model's calibration noise, shared by every ``cal:trajectory`` cell of a grid
    (it depends only on the model and the noise); its states are kept for the fit half of the batch."""
    from ..trajectory import reference_solve

    return reference_solve(spec.denoiser, _noise(spec, opts["n"], opts["seed"]), float(spec.process.sigma_max),
                           float(spec.process.sigma_min), steps=opts["ref_steps"])


def _floors(spec: ModelSpec, n: int, seed: int) -> dict[str, float]:
    """``mode_tv`` and ``nll`` of an independent true sample set of the same size: their floors
    (image models: none here, :func:`~steindiff.metrics.image_model_metrics` gives its own)."""
    if model_kind(spec) != "mixture":
        return {}
    m = mixture_metrics(spec.gmm.sample(n, seed=30_000 + seed), spec.gmm, seed=seed)
    return {"mode_tv_floor": m["mode_tv"], "nll_floor": m["nll"]}


def _calibration_summary(meta: dict) -> dict:
    """What a ``cal:trajectory`` row records of its calibration (the full record is in its file)."""
    c = meta.get("calibration", {})
    cand = c.get("candidates", {})
    ref_s = c.get("reference", {}).get("wall_s")
    # the grid shares one reference solve per model; a calibration on its own also pays for it
    return {"chosen": c.get("chosen"), "val_ratio": c.get("val_ratio"), "wall_s": c.get("wall_s"),
            "reference_wall_s": ref_s, "standalone_s": (c.get("wall_s") or 0.0) + (ref_s or 0.0),
            "reference_convergence_rms": c.get("reference", {}).get("convergence_rms"),
            "val_rms": {k: v.get("val_rms") for k, v in cand.items()}, "n": c.get("n"), "seed": c.get("seed"),
            "solves": sum(v.get("solves", 0) for v in c.get("refine", {}).values()), "fit": c.get("fit"),
            "device": c.get("device", "cpu"), "fit_method": c.get("fit_method", "derivative-free"),
            "guards": c.get("guards"),
            **({"params": c["params"], "iters": c.get("gradient", {}).get("iters"),
                "start": c.get("start", {}).get("name", "plain")} if "params" in c else {})}


def _reason(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    return f"failed: {type(e).__name__}: {msg[:300]}"


def _peer_summary(meta: dict) -> dict:
    """What a ``peer:<name>`` row records of its fit: the peer, its distance, its fit time and its own record."""
    info = dict(meta.get("peer", {}))
    return {**info, "record": meta.get(info.get("name"))}


def _run_one(spec, noise, plan, stab_name, coords, probes, seed, ref, floors, mmd, jacobian_batch=None,
             calibrated=None, jacobian_precision="fp32", peer=None) -> dict:
    row: dict[str, Any] = {"steps": plan.steps}
    try:
        if stab_name.startswith(PREFIX):
            # fitted once per cell from the calibration teacher (``peer(label, plan)``), applied here as is
            plan, stab = peer(stab_name, plan), None
            row.update(peer_sigmas=plan.sigmas.tolist(), peer=_peer_summary(plan.meta))
        elif stab_name == TRAJECTORY:
            # fitted once per cell on calibration noise (``calibrated(plan)``), applied here with no extra pass
            plan, stab = calibrated(plan), None  # generate() applies the plan's gammas
            row.update(calibrated_gammas=plan.gammas, calibrated_sigmas=plan.sigmas.tolist(),
                       calibration=_calibration_summary(plan.meta))
        elif stab_name.startswith("cal:"):
            # calibrated once on a separate batch (other noise), applied with no extra passes;
            # the calibration's own cost is not in wall_s_per_sample
            stab = calibrate(spec, plan, coords=coords, variant=stab_name[4:], n=noise.shape[0], seed=50_000 + seed,
                             probes=probes, dtype=_dtype(spec), jacobian_batch=jacobian_batch,
                             jacobian_precision=jacobian_precision)
            row["calibrated_gammas"] = stab.gammas
        else:
            stab = make_stabilizer(stab_name, spec, coords=coords, probes=probes, seed=seed,
                                   jacobian_batch=jacobian_batch, jacobian_precision=jacobian_precision)
            if stab_name in RHO and model_kind(spec) == "mixture":
                stab = RhoRecorder(stab, spec.gmm.divergence)
        gen = generate(spec, plan, noise=noise, n=noise.shape[0], stabilizer=stab, dtype=_dtype(spec))
    except Exception as e:  # a stabilizer that blows up is a result
        return {**row, "nfe": None, "extra_passes": None, "metrics": {}, "wall_s_per_sample": None,
                "gammas": [], "gamma_raw": [], "rho": [], "status": _reason(e)}
    row.update(nfe=gen.nfe, extra_passes=gen.extra_passes, wall_s_per_sample=gen.wall_s / noise.shape[0])
    if not gen.trace:  # the plain solver
        row.update(gammas=[1.0] * row["steps"], gamma_raw=[], rho=[])
    else:
        row.update(gammas=[r.get("gamma") for r in gen.trace], gamma_raw=[r.get("gamma_raw") for r in gen.trace],
                   rho=[r.get("rho") for r in gen.trace])
    try:
        if model_kind(spec) == "mixture":
            metrics = mixture_metrics(gen.x, spec.gmm, seed=seed, ref=ref, mmd=mmd)
        else:
            metrics = image_model_metrics(gen.x.clamp(-1, 1), spec, seed=seed)
            metrics["traj_err"] = traj_err(gen.x, ref)
    except Exception as e:
        return {**row, "metrics": {}, "status": _reason(e)}
    metrics.update(floors)
    row.update(metrics=metrics, status="ok")
    return row


def run_grid(models: Sequence[str], solvers: Sequence[str], nfes: Sequence[int], schedules: Sequence[str],
             coords: Sequence[str], stabilizers: Sequence[str], seeds: Sequence[int], n: int, probes: int = 5,
             progress: bool = True, *, mmd: bool = False, ref_solver: str = "dpmpp_3m", ref_steps: int = 1000,
             calibration: dict | None = None, calibration_dir: str | None = None,
             device: str | torch.device | None = None, jacobian_batch: int | None = None,
             jacobian_precision: str = "fp32") -> dict:
    """Run the benchmark grid; return the ``steindiff.bench/1`` object (module docstring).

    ``calibration``: options of the ``cal:trajectory`` cells' calibration (:func:`calibration_options`
    gives the defaults per kind of model); one reference solve of the calibration noise per model is
    shared by all its cells, and each cell is fitted once and applied to every seed.  ``calibration_dir``:
    where the fitted calibrations are cached (the format of ``--stabilizer auto``'s cache; a cell found
    there is not fitted again, and its recorded calibration time is the original one); default: a
    temporary folder, removed afterwards.

    Rows are produced in the order ``model, seed, solver, schedule, nfe``, and within that the vanilla
    solve first, then every stabilizer and coordinate system, so their wall-clock times are measured
    side by side.  ``device``: where to sample (models moved there; noise drawn on the CPU then moved).
    ``jacobian_batch``, ``jacobian_precision``: of the stabilizers (:class:`~steindiff.stabilizers.GammaStabilizer`).
    """
    stabilizers = resolve_auto(stabilizers)
    specs = validate_grid(models, solvers, nfes, schedules, coords, stabilizers, seeds, n, probes, device,
                          jacobian_batch, jacobian_precision)
    if ref_solver not in SOLVERS or ref_steps < 1:
        raise ValueError(f"bad reference solve: solver {ref_solver!r}, {ref_steps} steps")
    # the plain solver and the peers (plans without a gamma) do not depend on the coordinates
    configs = [(s, c) for s in stabilizers for c in (["-"] if s == "none" or s.startswith(PREFIX) else coords)]
    total = len(models) * len(seeds) * len(solvers) * len(schedules) * len(nfes) * len(configs)
    rows: list[dict] = []
    cal_config: dict[str, dict] = {}
    machine = machine_info(device)
    kinds = {model_kind(s) for s in specs.values()}
    if "image" in kinds:
        machine["dtype"] = "float32" if kinds == {"image"} else "float64 (mixtures), float32 (image models)"
    t_start = time.perf_counter()
    with (tempfile.TemporaryDirectory(prefix="steindiff-cal-") as tmp,
          tqdm(total=total, disable=not progress, desc="bench", unit="run", mininterval=2.0) as bar):
        cal_dir = tmp if calibration_dir is None else calibration_dir  # default: a temporary folder
        for m in models:
            spec = specs[m]
            cal_opts = cell_calibration(spec, calibration)
            cal_cache: dict[tuple, Any] = {}
            cal_ref: list = []
            cal_config[spec.name] = cal_opts

            def calibrated(base: SamplingPlan, spec=spec, cal_opts=cal_opts, cal_cache=cal_cache, cal_ref=cal_ref):
                key = (base.solver, tuple(base.sigmas.tolist()))
                if key not in cal_cache:
                    try:
                        # a silent look first: what is wrong with a cached file is said once, by the fit below
                        plan = calibrated_plan(spec, base, cache_dir=cal_dir, calibrate_missing=False,
                                               notice=lambda m: None, dtype=_dtype(spec), **cal_opts)
                        if plan is base:  # not cached: fit, with the model's shared reference solve
                            if not cal_ref:
                                cal_ref.append(_calibration_reference(spec, cal_opts))
                            plan = calibrated_plan(spec, base, cache_dir=cal_dir, dtype=_dtype(spec), ref=cal_ref[0],
                                                   calibrate_missing="always",
                                                   notice=lambda m: bar.write(m, file=sys.stderr), **cal_opts)
                        cal_cache[key] = plan
                    except Exception as e:
                        cal_cache[key] = e
                if isinstance(cal_cache[key], Exception):
                    raise cal_cache[key]
                return cal_cache[key]

            def peer(label: str, base: SamplingPlan, spec=spec, cal_opts=cal_opts, cal_cache=cal_cache,
                     cal_ref=cal_ref):
                key = (label, base.solver, tuple(base.sigmas.tolist()))
                if key not in cal_cache:
                    try:
                        if not cal_ref:
                            cal_ref.append(_calibration_reference(spec, cal_opts))
                        cal_cache[key] = fit_peer(label, spec.denoiser, base, _noise(spec, cal_opts["n"],
                                                                                     cal_opts["seed"]),
                                                  cal_ref[0], sigma_min=float(spec.process.sigma_min))
                    except Exception as e:
                        cal_cache[key] = e
                if isinstance(cal_cache[key], Exception):
                    raise cal_cache[key]
                return cal_cache[key]

            for seed in seeds:
                noise = _noise(spec, n, seed)
                ref = _reference(spec, noise, ref_solver, ref_steps)
                floors = _floors(spec, n, seed)
                done: dict[tuple, dict] = {}
                for solver, schedule, nfe in itertools.product(solvers, schedules, nfes):
                    plan = make_plan(spec.process, solver, nfe, schedule)
                    for stab, c in configs:
                        key = (solver, tuple(plan.sigmas.tolist()), stab, c)
                        base = {"model": spec.name, "seed": seed, "solver": solver, "schedule": schedule, "coords": c,
                                "stabilizer": stab, "nfe_budget": nfe, "n": n,
                                "probes": probes if stab.removeprefix("cal:") in PROBED else None, "reused": False}
                        if key in done:
                            row = {**done[key], **base, "reused": True}
                        else:
                            row = {**base, **_run_one(spec, noise, plan, stab, "ve" if c == "-" else c, probes, seed,
                                                      ref, floors, mmd, jacobian_batch, calibrated,
                                                      jacobian_precision, peer)}
                            done[key] = row
                        rows.append(row)
                        bar.update(1)
    machine["wall_s_total"] = time.perf_counter() - t_start
    config = {"models": list(models), "solvers": list(solvers), "nfe": list(nfes), "schedules": list(schedules),
              "coords": list(coords), "stabilizers": list(stabilizers), "seeds": list(seeds), "n": n,
              "probes": probes, "mmd": mmd, "jacobian_precision": jacobian_precision,
              "reference": {"solver": ref_solver, "steps": ref_steps, "schedule": "karras"}}
    peers = [peer_name(s) for s in stabilizers if s.startswith(PREFIX)]
    if TRAJECTORY in stabilizers or peers:  # the calibration noise and its teacher, shared by both
        config["calibration"] = cal_config
    if peers:
        config["peers"] = {p: {"paper": PEERS[p].paper, "distance": PEERS[p].distance} for p in peers}
    if "image" in kinds:
        config["reference"]["image_model_steps"] = min(ref_steps, IMAGE_REF_STEPS)
    return {"schema": SCHEMA, "machine": machine, "config": config, "rows": rows}


# -- cost, side by side ---------------------------------------------------------------------------
def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> int | None:
    """``torch.cuda.max_memory_allocated`` since :func:`_reset_peak`; ``None`` off CUDA (not measured)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device))


def run_cost(models: Sequence[str], solvers: Sequence[str], nfes: Sequence[int], schedule: str = "karras",
             stabilizers: Sequence[str] = ("none", "stein"), probes_list: Sequence[int] = (1, 5), n: int = 1000,
             repeats: int = 5, coords: str = "ve", seed: int = 0, progress: bool = True,
             device: str | torch.device | None = None, jacobian_batch: int | None = None,
             jacobian_precision: str = "fp32", calibration: dict | None = None) -> list[dict]:
    """Wall-clock seconds per sample of ``none`` and each stabilizer at equal NFE, measured in one
    process with the repeats interleaved (``none, stein P=1, stein P=5, ...`` then again), medians,
    after one untimed warm-up round.  ``calibration``: options of the ``cal:trajectory`` fit, as in
    :func:`run_grid` (fitted before the timing).

    Peak memory: on CUDA each entry has ``peak_mem_bytes``, the largest
    ``torch.cuda.max_memory_allocated`` of its timed runs (statistics reset before each), and
    ``mem_ratio`` to ``none``'s; on the CPU both are ``None`` (not measured).

    The ``rho`` diagnostic of the grid (an exact divergence of the mixture's denoiser per step) is not
    measured here; the grid's own timings include it.
    ``stein`` is measured once per probe count in ``probes_list``; other stabilizers once.  Each
    entry has ``ratio`` = median time / median time of ``none`` in the same (model, solver, nfe).
    """
    stabilizers = list(dict.fromkeys(["none", *resolve_auto(stabilizers)]))
    specs = validate_grid(models, solvers, nfes, [schedule], [coords], stabilizers, [seed], n, max(probes_list), device,
                          jacobian_batch, jacobian_precision)
    if repeats < 1 or any(p < 1 for p in probes_list):
        raise ValueError("repeats and probe counts must be >= 1")
    variants = [(s, p) for s in stabilizers for p in (probes_list if s == "stein" else [None])]
    out: list[dict] = []
    with tqdm(total=len(models) * len(solvers) * len(nfes) * (repeats + 1) * len(variants), disable=not progress,
              desc="cost", unit="run", mininterval=2.0) as bar:
        for m in models:
            spec = specs[m]
            noise = _noise(spec, n, seed)
            for solver, nfe in itertools.product(solvers, nfes):
                base_plan = make_plan(spec.process, solver, nfe, schedule)
                times: dict[tuple, list[float]] = {v: [] for v in variants}
                peaks: dict[tuple, list[int]] = {v: [] for v in variants}
                info: dict[tuple, dict] = {}
                fitted: dict[str, SamplingPlan] = {}  # fitted before the timing: calibration is a one-off cost
                if TRAJECTORY in stabilizers:
                    with tempfile.TemporaryDirectory(prefix="steindiff-cal-") as tmp:
                        fitted[TRAJECTORY] = calibrated_plan(spec, base_plan, cache_dir=tmp, dtype=_dtype(spec),
                                                             calibrate_missing="always", notice=lambda m: None,
                                                             **cell_calibration(spec, calibration))
                for label in (s for s in stabilizers if s.startswith(PREFIX)):
                    opts = calibration_options(spec)
                    fitted[label] = fit_peer(label, spec.denoiser, base_plan, _noise(spec, opts["n"], opts["seed"]),
                                             _calibration_reference(spec, opts),
                                             sigma_min=float(spec.process.sigma_min))
                for rep in range(repeats + 1):  # round 0: untimed warm-up
                    for v in variants:
                        if v[0] in fitted:
                            stab, run_plan = None, fitted[v[0]]  # the fitted plan (noise levels, gammas)
                        else:
                            stab, run_plan = make_stabilizer(v[0], spec, coords=coords, probes=v[1] or 1, seed=seed,
                                                             jacobian_batch=jacobian_batch,
                                                             jacobian_precision=jacobian_precision), base_plan
                        try:
                            _reset_peak(noise.device)
                            gen = generate(spec, run_plan, noise=noise, n=n, stabilizer=stab, dtype=_dtype(spec))
                            if rep > 0:
                                times[v].append(gen.wall_s / n)
                                peak = _peak(noise.device)
                                if peak is not None:
                                    peaks[v].append(peak)
                            info[v] = {"nfe": gen.nfe, "extra_passes": gen.extra_passes, "status": "ok"}
                        except Exception as e:
                            info[v] = {"nfe": None, "extra_passes": None, "status": _reason(e)}
                        bar.update(1)
                med = {v: statistics.median(times[v]) if times[v] else None for v in variants}
                top = {v: max(peaks[v]) if peaks[v] else None for v in variants}
                t_none, p_none = med[("none", None)], top[("none", None)]
                for v in variants:
                    t, pk = med[v], top[v]
                    out.append({"model": spec.name, "solver": solver, "schedule": schedule,
                                "coords": "-" if v[0] == "none" or v[0].startswith(PREFIX) else coords,
                                "nfe_budget": nfe, "stabilizer": v[0],
                                "probes": v[1], "n": n, "repeats": len(times[v]), **info[v], "wall_s_per_sample": t,
                                "ratio": (t / t_none) if (t is not None and t_none) else None,
                                "device": str(noise.device), "jacobian_batch": jacobian_batch,
                                "jacobian_precision": jacobian_precision, "peak_mem_bytes": pk,
                                "mem_ratio": (pk / p_none) if (pk is not None and p_none) else None})
    return out


# -- summary --------------------------------------------------------------------------------------
def excess(metrics: dict, name: str) -> float | None:
    """A row's excess of metric ``name`` over its floor (``None`` when not measured).

    ``sw2``, ``mmd``, ``mode_tv``: metric minus its floor (the same statistic of an independent true
    sample set of size N).  ``nll``: ``|nll - nll_floor|``, two-sided, because samples can also be
    *more* likely than true data (over-concentrated, the isotropic spread lost), which is no better.
    ``traj_err``: itself (floor 0).  Image metrics: ``digits_fid``, ``digits_kid``, ``class_tv``,
    ``memorization``, ``patch_fd``, ``spectrum``, ``pixel_sw2``: metric minus its floor (real training images
    of the same count); ``precision`` and ``recall`` (higher is better): floor minus metric.
    """
    if name not in metrics or metrics[name] is None:
        return None
    v = float(metrics[name])
    if name == "traj_err":
        return v
    floor = metrics.get(f"{name}_floor")
    if floor is None:
        return None
    if name == "nll":
        return abs(v - floor)
    return floor - v if name in ("precision", "recall") else v - floor


def _stats(values: list[float]) -> dict[str, float]:
    """Mean, seed spread (sample standard deviation, 0 for one seed), min and max."""
    a = np.asarray(values, dtype=float)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
            "min": float(a.min()), "max": float(a.max())}


def verdict(vanilla: dict | None, stabilized: dict | None) -> dict:
    """The protocol's verdict of a stabilizer against vanilla in one cell, for one excess metric.

    ``vanilla`` and ``stabilized`` are ``{"mean", "std"}`` of the excess metric over seeds (same
    seeds, so same initial noise), or ``None`` when a seed failed.  The protocol
    (``benchmark-protocol.md``, "Comparison rules"):

        A stabilizer "helps" in a cell when its excess metric is lower by more than the seed spread;
        it "hurts" when higher by more than 2% of the vanilla value plus the spread.
        A cell where vanilla is already at the floor (its excess within the seed spread) cannot be
        improved: it counts as a tie, neither help nor hurt, and is left out of any "better in X% of
        cells" rule. Such rules count only the cells that have room.

    Implemented as follows.  ``the seed spread`` is read as the same quantity in all three sentences:
    vanilla's seed standard deviation ``std_v`` in the cell (the noise level of the cell's baseline,
    which the at-floor test names explicitly).  The stabilizer's own spread does not widen it: a
    stabilizer that blows up on one seed of three would otherwise turn its own erratic excess into a
    tie.  ``2% of the vanilla value``: of the vanilla mean excess, in absolute value.

    - vanilla failed: ``"n/a"`` (no room);
    - vanilla at the floor, ``mean_v <= std_v``: ``"tie"`` with ``room = False``, whatever the
      stabilizer does (``worse_at_floor`` flags a stabilizer past the hurt threshold, for the report);
    - stabilizer failed (error or non-finite samples on any seed): ``"failed"`` (counted apart);
    - ``mean_s < mean_v - std_v``: ``"helps"``;
    - ``mean_s > mean_v + 0.02 |mean_v| + std_v``: ``"hurts"``;
    - otherwise ``"tie"``.

    Returns ``{"verdict", "room", "worse_at_floor"}``.
    """
    if vanilla is None:
        return {"verdict": "n/a", "room": False, "worse_at_floor": False}
    mv, sv = vanilla["mean"], vanilla["std"]
    at_floor = mv <= sv
    if stabilized is None:
        return {"verdict": "tie" if at_floor else "failed", "room": not at_floor, "worse_at_floor": at_floor}
    ms = stabilized["mean"]
    worse = ms > mv + 0.02 * abs(mv) + sv
    if at_floor:
        return {"verdict": "tie", "room": False, "worse_at_floor": bool(worse)}
    if ms < mv - sv:
        v = "helps"
    elif worse:
        v = "hurts"
    else:
        v = "tie"
    return {"verdict": v, "room": True, "worse_at_floor": False}


def above_fine(st: dict | None, fine: dict) -> bool:
    """Is an excess (``{"mean", "std"}`` over seeds) above the fine solve's beyond both seed spreads: the rule by
    which a cell has room for the gap closed (``benchmark-protocol.md``)?  A failed configuration (``None``)
    counts as above."""
    return st is None or st["mean"] - fine["mean"] > st["std"] + fine["std"]


def worse_than(reference: dict | None, other: dict | None) -> bool:
    """Is ``other`` worse than ``reference`` beyond ``reference``'s seed spread: :func:`verdict`'s ``hurts``
    or ``failed``, or past the hurt threshold where ``reference`` sits at its floor?"""
    v = verdict(reference, other)
    return v["verdict"] in ("hurts", "failed") or v["worse_at_floor"]


def _cells(rows: Iterable[dict]) -> dict[tuple, dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(row_key(r)[:-1], []).append(r)
    cells = {}
    for key, rs in groups.items():
        ok = [r for r in rs if r["status"] == "ok"]
        failed = [r for r in rs if r["status"] != "ok"]
        cell: dict[str, Any] = dict(zip(("model", "solver", "schedule", "coords", "nfe_budget", "stabilizer"), key))
        nfes = sorted({r["nfe"] for r in rs if r.get("nfe") is not None})
        extra = [r["extra_passes"] for r in rs if r.get("extra_passes") is not None]
        cell.update(seeds=sorted(r["seed"] for r in rs), n_failed=len(failed),
                    failures=sorted({r["status"] for r in failed}),
                    nfe=nfes[-1] if nfes else None, extra_passes=max(extra) if extra else None,
                    wall_s_per_sample=float(np.mean([r["wall_s_per_sample"] for r in ok])) if ok else None)
        metrics = {}
        for name in METRICS + IMAGE_METRICS:
            vals = [excess(r["metrics"], name) for r in ok]
            if vals and all(v is not None for v in vals) and not failed:
                metrics[name] = _stats(vals)
        cell["excess"] = metrics
        g = [np.asarray(r["gammas"], dtype=float) for r in ok if r["gammas"]]
        if g and len({len(x) for x in g}) == 1:
            cell["gamma_mean"] = np.mean(g, axis=0).tolist()
        cells[key] = cell
    return cells


def summarize(result: dict) -> dict:
    """Per-cell summary of a ``steindiff.bench/1`` object.

    ``cells``: one per ``(model, solver, schedule, coords, nfe_budget, stabilizer)`` with mean, std,
    min and max over seeds of each excess metric (:func:`excess`), and for stabilizers the verdict of
    each metric against vanilla (:func:`verdict`) and the verdict of the model's primary metric
    (:func:`primary_metric`: ``sw2`` for mixtures, ``digits_fid`` / ``patch_fd`` for image models) against the best
    vanilla configuration whose actual NFE is at most the cell's.  ``primary``: per model, that metric.
    ``best_vanilla``: per model and NFE budget, the vanilla solver and schedule with the lowest mean
    excess of the primary metric (``metric``, ``excess_<metric>``).  ``counts``: per model,
    stabilizer and coords, the verdict counts of each metric (``helps_pct`` among cells with room).
    ``cost``: median wall-clock ratio stabilizer/none over the paired rows of the grid, plus the
    side-by-side measurements of ``result["cost"]`` when present.  ``gammas``: per model,
    stabilizer and coords, the distribution of per-step gammas.
    """
    rows = result.get("rows", [])
    cells = _cells(rows)
    primary = {m: primary_metric([r for r in rows if r["model"] == m]) for m in dict.fromkeys(r["model"] for r in rows)}
    vanilla = {(k[0], k[1], k[2], k[4]): c for k, c in cells.items() if k[5] == "none"}
    # best vanilla per (model, nfe budget), over all solvers and schedules
    best: dict[tuple, dict] = {}
    for (model, solver, schedule, nfe_b), c in vanilla.items():
        p = primary[model]
        e = c["excess"].get(p)
        if e is None:
            continue
        k = (model, nfe_b)
        if k not in best or e["mean"] < best[k]["excess"][p]["mean"]:
            best[k] = c
    for k, c in cells.items():
        if k[5] == "none":
            continue
        p = primary[k[0]]
        v = vanilla.get((k[0], k[1], k[2], k[4]))
        c["verdicts"] = {name: verdict(v["excess"].get(name) if v else None, c["excess"].get(name))
                         for name in METRICS + IMAGE_METRICS
                         if v is not None and (name in v["excess"] or name in c["excess"])}
        # against the best vanilla configuration at no more actual NFE
        cands = [b for (m, _), b in best.items() if m == k[0] and c["nfe"] is not None and b["nfe"] <= c["nfe"]]
        if cands:
            b = min(cands, key=lambda x: x["excess"][p]["mean"])
            c["vs_best_vanilla"] = {"solver": b["solver"], "schedule": b["schedule"], "nfe": b["nfe"],
                                    **verdict(b["excess"][p], c["excess"].get(p))}
    counts: dict[str, dict] = {}
    for c in cells.values():
        for name, v in c.get("verdicts", {}).items():
            d = counts.setdefault(c["model"], {}).setdefault(label_of(c), {}).setdefault(
                name, {"helps": 0, "hurts": 0, "tie": 0, "failed": 0, "n/a": 0, "at_floor": 0, "room": 0})
            d[v["verdict"]] += 1
            d["room"] += int(v["room"])
            d["at_floor"] += int(not v["room"] and v["verdict"] == "tie")
    for per_model in counts.values():
        for per_label in per_model.values():
            for d in per_label.values():
                d["helps_pct"] = 100.0 * d["helps"] / d["room"] if d["room"] else None
                d["hurts_pct"] = 100.0 * (d["hurts"] + d["failed"]) / d["room"] if d["room"] else None
    return {"cells": list(cells.values()), "primary": primary,
            "calibration": _calibration_stats(rows, cells, primary, best), "peers": _peer_stats(rows, cells, primary),
            "best_vanilla": [{"model": m, "nfe_budget": nb, "solver": b["solver"], "schedule": b["schedule"],
                              "nfe": b["nfe"], "metric": primary[m], f"excess_{primary[m]}": b["excess"][primary[m]]}
                             for (m, nb), b in sorted(best.items())],
            "counts": counts, "cost": _cost_summary(result), "gammas": _gamma_summary(rows)}


def _calibration_stats(rows: Sequence[dict], cells: dict, primary: dict, best: dict) -> list[dict]:
    """Per model, for the ``cal:trajectory`` cells: the calibration's own cost and choices, the distance to the
    reference solve against vanilla's (``traj_err`` ratio, median over cells), and per NFE budget the best
    calibrated configuration's excess primary metric against the best vanilla configuration's."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        cal = {}
        for r in rows:
            if r["model"] == model and r["stabilizer"] == TRAJECTORY and r.get("calibration") and not r.get("reused"):
                cal.setdefault((r["solver"], r["schedule"], r["nfe_budget"]), r["calibration"])
        if not cal:
            continue
        p = primary[model]
        standalone = [c["standalone_s"] for c in cal.values() if c.get("standalone_s") is not None]
        chosen = dict(collections.Counter(c["chosen"] for c in cal.values()))
        ratios, per_nfe = [], []
        for k, c in cells.items():
            if k[0] != model or k[5] != TRAJECTORY:
                continue
            v = cells.get((k[0], k[1], k[2], "-", k[4], "none"))
            te, tv = c["excess"].get("traj_err"), (v or {}).get("excess", {}).get("traj_err")
            if te and tv and tv["mean"] > 0:
                ratios.append(te["mean"] / tv["mean"])
        for (m, nfe_b), b in sorted(best.items()):
            if m != model:
                continue
            cands = [c for k, c in cells.items() if k[0] == model and k[5] == TRAJECTORY and k[4] == nfe_b
                     and p in c["excess"]]
            if cands:
                bc = min(cands, key=lambda c: c["excess"][p]["mean"])
                bv = b["excess"][p]["mean"]
                per_nfe.append({"nfe_budget": nfe_b, "best_vanilla": {"solver": b["solver"], "schedule": b["schedule"],
                                                                      "excess": bv},
                                "best_calibrated": {"solver": bc["solver"], "schedule": bc["schedule"],
                                                    "excess": bc["excess"][p]["mean"]},
                                "ratio": bc["excess"][p]["mean"] / bv if bv > 0 else None})
        out.append({"model": model, "metric": p, "cells": len(cal), "chosen": chosen,
                    "standalone_s": {"median": float(np.median(standalone)), "max": float(np.max(standalone))}
                    if standalone else None,
                    "val_ratio_median": float(np.median([c["val_ratio"] for c in cal.values() if c.get("val_ratio")])),
                    "traj_err_ratio_median": float(np.median(ratios)) if ratios else None, "best_per_nfe": per_nfe})
    return out


def _peer_stats(rows: Sequence[dict], cells: dict, primary: dict) -> list[dict]:
    """Per model and peer: the distance its fit minimised, its fit time, its best configuration per NFE budget,
    and the calibrated sampler's verdict against it cell by cell (``cal:trajectory`` in ``ve`` coordinates
    against the peer at the same solver, schedule and NFE, the peer's seed spread as the spread)."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        p = primary[model]
        for label in dict.fromkeys(r["stabilizer"] for r in rows if r["model"] == model
                                   and r["stabilizer"].startswith(PREFIX)):
            fits = {}
            for r in rows:
                if r["model"] == model and r["stabilizer"] == label and r.get("peer") and not r.get("reused"):
                    fits.setdefault((r["solver"], r["schedule"], r["nfe_budget"]), r["peer"])
            mine = {k: c for k, c in cells.items() if k[0] == model and k[5] == label and p in c["excess"]}
            best = {}
            for k, c in mine.items():
                if k[4] not in best or c["excess"][p]["mean"] < best[k[4]]["excess"][p]["mean"]:
                    best[k[4]] = c
            versus = {"helps": 0, "tie": 0, "hurts": 0, "failed": 0, "n/a": 0, "room": 0}
            for k, c in mine.items():
                cal = cells.get((*k[:3], "ve", k[4], TRAJECTORY))
                if cal is not None:
                    v = verdict(c["excess"][p], cal["excess"].get(p))
                    versus[v["verdict"]] += 1
                    versus["room"] += int(v["room"])
            wall = [f["wall_s"] for f in fits.values() if f.get("wall_s") is not None]
            first = next(iter(fits.values()), {})
            out.append({"model": model, "peer": label, "metric": p, "distance": first.get("distance"),
                        "cells": len(fits), "fit_s": {"median": float(np.median(wall)), "max": float(np.max(wall))}
                        if wall else None,
                        "best_per_nfe": [{"nfe_budget": nb, "solver": c["solver"], "schedule": c["schedule"],
                                          "excess": c["excess"][p]["mean"]} for nb, c in sorted(best.items())],
                        "calibrated_vs_peer": versus})
    return out


def _cost_summary(result: dict) -> dict:
    """Wall-clock ratios stabilizer/none: from the grid's paired rows, and from ``--cost`` runs."""
    rows = result.get("rows", [])
    none = {(r["model"], r["seed"], r["solver"], r["schedule"], r["nfe_budget"]): r
            for r in rows if r["stabilizer"] == "none" and r["status"] == "ok" and not r.get("reused")}
    ratios: dict[tuple, list[float]] = {}
    for r in rows:
        if r["stabilizer"] == "none" or r["status"] != "ok" or r.get("reused"):
            continue
        v = none.get((r["model"], r["seed"], r["solver"], r["schedule"], r["nfe_budget"]))
        if v is not None and v["wall_s_per_sample"]:
            ratios.setdefault((r["model"], r["stabilizer"], r["probes"]),
                              []).append(r["wall_s_per_sample"] / v["wall_s_per_sample"])
    grid = [{"model": m, "stabilizer": s, "probes": p, "median_ratio": float(np.median(v)),
             "min_ratio": float(np.min(v)), "max_ratio": float(np.max(v)), "pairs": len(v)}
            for (m, s, p), v in sorted(ratios.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] or 0))]
    out: dict[str, Any] = {"grid": grid}
    if result.get("cost"):
        out["side_by_side"] = result["cost"]
        out["model"] = cost_model(result["cost"])
    return out


def cost_model(entries: Sequence[dict]) -> list[dict]:
    """Fit ``ratio(P) = a + b P`` per (model, solver, nfe) from the side-by-side ``stein`` ratios at
    two or more probe counts ``P``: ``a`` is the fixed overhead of the differentiable step (graph and
    first backward), ``b`` the cost of one more probe, both in units of a vanilla solve."""
    groups: dict[tuple, list[tuple[int, float]]] = {}
    for e in entries:
        if e["stabilizer"] == "stein" and e.get("ratio") is not None:
            groups.setdefault((e["model"], e["solver"], e["nfe_budget"]), []).append((e["probes"], e["ratio"]))
    out = []
    for (m, s, nfe), pts in sorted(groups.items()):
        if len({p for p, _ in pts}) < 2:
            continue
        P, R = np.array([p for p, _ in pts], float), np.array([r for _, r in pts], float)
        b, a = np.polyfit(P, R, 1)
        out.append({"model": m, "solver": s, "nfe_budget": nfe, "a": float(a), "b": float(b)})
    return out


def _gamma_summary(rows: Sequence[dict]) -> list[dict]:
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        if r["stabilizer"] == "none" or r["status"] != "ok" or r.get("reused"):
            continue
        g = [x for x in r["gammas"] if x is not None and math.isfinite(x)]
        groups.setdefault((r["model"], r["stabilizer"], r["coords"]), []).extend(g)
    out = []
    for (m, s, c), g in sorted(groups.items()):
        if not g:
            continue
        a = np.asarray(g)
        out.append({"model": m, "stabilizer": s, "coords": c, "steps": len(a), "median": float(np.median(a)),
                    "p10": float(np.quantile(a, 0.1)), "p90": float(np.quantile(a, 0.9)), "min": float(a.min()),
                    "max": float(a.max()), "frac_outside_0.5_1.5": float(((a < 0.5) | (a > 1.5)).mean())})
    return out
