"""``steindiff calibrate``: fit a sampler once, then sample with it for free.  The default objective,
``trajectory``, fits each step's scale (and, with ``--fit steps|both``, the noise levels) so that the few-step
solve follows a fine solve of the same model from the same noise: no data, no training.  Its duration is
measured on the model and announced before the fit starts.  A trajectory calibration is written into the
calibration cache (``--calibration-dir``, default ``$XDG_CACHE_HOME/steindiff/calibrations``), where ``sample
--stabilizer auto`` finds it, and to ``--out FILE`` when given (``sample --gamma-schedule FILE``); the command
prints the ``steindiff sample`` commands that use it.  ``--fit-method gradient`` fits by
backpropagation through the solve instead, with the parameters named by ``--params``."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch

from ..calibration import (
    CALIBRATION_SEED,
    GRADIENT_GUARDS,
    OBJECTIVES,
    cache_file,
    calibrate,
    calibration_key,
    calibration_options,
    default_cache_dir,
    stamp_fit,
)
from ..distances import parse_distance
from ..fit_estimate import estimate_fit
from ..gradient_fit import DEFAULT_PARAMS, FIT_METHODS, PARAMS, STARTS, check_param_sets
from ..io import check_writable
from ..plan import make_plan
from ..stabilizers import STABILIZERS
from ..trajectory import DEFAULT_GUARDS, FIT_MODES, GUARDS
from . import UsageError, common, emit, usage_errors


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="fit a sampler's per-step gammas (and noise levels) once", description=__doc__)
    common.add_sampling(p)
    p.add_argument("--objective", default="trajectory", choices=OBJECTIVES,
                   help="trajectory: follow a fine solve of the model (no data); variant: keep the gammas a stabilizer "
                        "(--stabilizer) estimates on the calibration batch; reference: fit to --reference data")
    p.add_argument("--fit", default="both", choices=FIT_MODES,
                   help="trajectory: fit the per-step gammas, the interior noise levels, or both")
    p.add_argument("--fit-method", default="derivative-free", choices=FIT_METHODS,
                   help="trajectory: derivative-free (finite differences of whole solves; any model) or gradient "
                        "(backpropagation through the solve; a differentiable model; fits --params)")
    p.add_argument("--params", default=None,
                   help=f"--fit-method gradient: what to fit, comma-separated from {', '.join(PARAMS)} (default "
                        f"{','.join(DEFAULT_PARAMS)}): interior noise levels, per-step gamma, the noise level given "
                        "to the model at each step, corrections over past denoised outputs; several sets "
                        "separated by / (steps,gamma/steps,history) are each fitted, and the validation keeps the "
                        "best that passes the guards")
    p.add_argument("--teacher-ball", type=float, default=0.0,
                   help="--fit-method gradient: soft teacher forcing, each fit sample's start may move within this "
                        "fraction of its noise's norm (0: off)")
    p.add_argument("--residual-weight", type=float, default=0.0,
                   help="--fit-method gradient: weight of the residual-noise term of the loss (0: off)")
    p.add_argument("--distance", default="l2",
                   help="--fit-method gradient: what the fit minimises to the teacher's samples: l2; "
                        "pyramid:W0/W1/... (a Laplacian pyramid's bands, finest first, weighted); "
                        "denoiser[:S0/S1/...[:PIXEL_WEIGHT]] (images: the model's own network's activations at "
                        "noise levels S, default 0.5, plus PIXEL_WEIGHT, default 10, times the pixel L2)")
    p.add_argument("--ref-solver", default=None,
                   help="trajectory: solver of the fine reference solve (the teacher; default: the model's, else "
                        "dpmpp_2m), e.g. unipc with --ref-steps 20")
    p.add_argument("--max-iters", type=int, default=None,
                   help="--fit-method gradient: Adam steps (default 300)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="--fit-method gradient: teacher pairs per Adam step (default 64)")
    p.add_argument("--start", default=None, choices=STARTS,
                   help="--fit-method gradient: where the fit starts: gits (default: the levels GITS finds on the "
                        "teacher's trajectories, which also compete as a candidate) or plain (the plain schedule's "
                        "noise levels)")
    p.add_argument("--stabilizer", default="stein-energy",
                   help=f"--objective variant: the stabilizer run on the calibration batch "
                        f"({', '.join(k for k in STABILIZERS if k not in ('none', 'auto'))})")
    p.add_argument("--coords", default="ve", choices=["ve", "vp"], help="coordinates of the rescaled update")
    p.add_argument("--reference", default=None,
                   help="--objective reference: reference samples (.npy/.npz, key 'samples' or the first array), held "
                        "out from evaluation; for gmm:* models 'true' draws them from the mixture")
    p.add_argument("--n", type=int, default=None,
                   help="calibration batch size (default: 512 for trajectory, half of it validates; 1000 otherwise)")
    p.add_argument("--ref-steps", type=int, default=None,
                   help="trajectory: steps of the fine reference solve (--ref-solver, log-SNR; default: the "
                        "model's, else 200)")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="trajectory: time budget of the refinement (of the gradient fit with --fit-method gradient; "
                        "default: the model's, else 60)")
    p.add_argument("--max-solves", type=int, default=None,
                   help="trajectory: refinement budget in solves of the fit batch (reproducible; seconds are not; "
                        "default: the model's, else 200)")
    p.add_argument("--guards", default=None,
                   help=f"trajectory: the checks a fitted candidate must pass on the validation half to replace the "
                        f"plain solver, comma-separated from {', '.join(GUARDS)}; a data-free check may carry "
                        "its own thresholds, NAME:tolerance=T:margin=M:dominance=K, e.g. residual:margin=0 "
                        f"(default, for every model: residual,{','.join(DEFAULT_GUARDS)}; with --fit-method gradient: "
                        f"{','.join(GRADIENT_GUARDS)}; docs/guards.md)")
    p.add_argument("--probes", type=int, default=5, help="--objective variant: Hutchinson probes per step")
    p.add_argument("--out", default=None, help="also write the calibration to this JSON file (for sample "
                   "--gamma-schedule; the only destination of the variant and reference objectives)")
    p.add_argument("--calibration-dir", default=None,
                   help="trajectory: the cache folder the calibration is written into, under the name that "
                        "--stabilizer auto, demo and bench look up (default: $XDG_CACHE_HOME/steindiff/calibrations; "
                        "a model's shipped calibrations: <model>/calibrations)")
    common.add_jacobian_batch(p)
    common.add_device(p)
    common.add_common(p)
    # the calibration's dtype, like its other options, defaults to the model's own (float64 for exact mixtures)
    p.set_defaults(func=run, seed=CALIBRATION_SEED, dtype=None)


def _load_reference(arg: str, spec) -> torch.Tensor:
    if arg == "true":
        if spec.gmm is None:
            raise UsageError("--reference true needs a gmm:* model")
        return spec.gmm.sample(100_000 if spec.gmm.dim <= 64 else 20_000, seed=987_654)
    try:
        data = np.load(arg)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read reference data {arg!r}: {e}") from None
    if hasattr(data, "files"):
        if not data.files:
            raise UsageError(f"reference file {arg!r} holds no arrays")
        data = data["samples"] if "samples" in data.files else data[data.files[0]]
    arr = torch.as_tensor(np.asarray(data, dtype=np.float64))
    if tuple(arr.shape[1:]) != tuple(spec.sample_shape) and arr[0].numel() != int(np.prod(spec.sample_shape)):
        raise UsageError(f"reference data {arg!r} has samples of shape {tuple(arr.shape[1:])}, model "
                         f"makes {spec.sample_shape}")
    return arr


def run(args: argparse.Namespace) -> int:
    common.check_sampling(args)
    if args.objective == "variant" and (args.stabilizer not in STABILIZERS or args.stabilizer in ("none", "auto")):
        raise UsageError(f"unknown stabilizer {args.stabilizer!r} for --objective variant; choose one of "
                         f"{', '.join(k for k in STABILIZERS if k not in ('none', 'auto'))}")
    if args.objective != "trajectory":
        if args.calibration_dir is not None:
            raise UsageError(f"--calibration-dir holds trajectory calibrations; --objective {args.objective} "
                             "needs --out FILE")
        if args.out is None:
            raise UsageError(f"--objective {args.objective} needs --out FILE (the cache holds trajectory "
                             "calibrations only)")
    if args.objective == "reference" and args.reference is None:
        raise UsageError("--objective reference needs --reference FILE (or 'true' for gmm:* models)")
    if args.n is not None and args.n < (4 if args.objective == "trajectory" else 2):
        raise UsageError(f"--n must be at least 4 for trajectory (fit and validation halves), got {args.n}")
    for flag, v, ok in (("--ref-steps", args.ref_steps, lambda v: v >= 4), ("--max-seconds", args.max_seconds,
                        lambda v: v > 0), ("--max-solves", args.max_solves, lambda v: v >= 1)):
        if v is not None and not ok(v):
            raise UsageError(f"{flag}: got {v}; --ref-steps must be >= 4, --max-seconds > 0 and --max-solves >= 1")
    gradient = args.fit_method == "gradient"
    if not gradient and (args.params is not None or args.teacher_ball or args.residual_weight
                         or args.max_iters is not None or args.batch_size is not None or args.distance != "l2"
                         or args.start is not None):
        raise UsageError("--params, --teacher-ball, --residual-weight, --distance, --max-iters, --batch-size and "
                         "--start are options of --fit-method gradient")
    if gradient and args.objective != "trajectory":
        raise UsageError(f"--fit-method gradient fits the trajectory objective, not --objective {args.objective}")
    for name, v in (("--max-iters", args.max_iters), ("--batch-size", args.batch_size)):
        if v is not None and v < 1:
            raise UsageError(f"{name} must be >= 1, got {v}")
    if args.teacher_ball < 0 or args.residual_weight < 0:
        raise UsageError(f"--teacher-ball and --residual-weight must be >= 0, got {args.teacher_ball} and "
                         f"{args.residual_weight}")
    fit_options = {}
    if gradient:
        with usage_errors(ValueError):
            params = check_param_sets(args.params) if args.params is not None else (DEFAULT_PARAMS,)
        opts = {k: v for k, v in (("max_iters", args.max_iters), ("batch_size", args.batch_size),
                                  ("start", args.start)) if v is not None}
        fit_options = {"fit_method": "gradient", "params": params, "teacher_ball": args.teacher_ball,
                       "residual_weight": args.residual_weight, "gradient_options": opts or None}
    device = common.device_from_args(args)
    spec = common.model_on_device(common.resolve_model(args), device)
    common.resolve_sampling(args, spec)
    if gradient and args.distance != "l2":
        with usage_errors(ValueError):
            features = parse_distance(args.distance, spec.denoiser)
        fit_options.update(loss="features", features=features)
    with usage_errors(ValueError):
        plain = make_plan(spec.process, args.solver, args.nfe, args.schedule, rho=args.rho)
    base = dataclasses.replace(plain, coords=args.coords)
    options = dict(fit=args.fit, n=args.n, seed=args.seed, dtype=args.dtype, ref_steps=args.ref_steps,
                   max_seconds=args.max_seconds, max_solves=args.max_solves, guards=args.guards,
                   ref_solver=args.ref_solver, **fit_options)
    key, cached = None, None
    if args.objective == "trajectory":  # into the cache's layout (steindiff.calibration.calibrated_plan)
        with usage_errors(ValueError):
            key = calibration_key(spec, base, options=options)
        cache = Path(args.calibration_dir) if args.calibration_dir is not None else default_cache_dir()
        cached = str(cache_file(cache, key))
        what = f"--calibration-dir {str(cache)!r}" if args.calibration_dir is not None else \
            f"the calibration cache {str(cache)!r}"
        try:
            cache.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            problem = f"{what} cannot be a folder: {e.strerror}"
        else:
            try:
                check_writable(Path(cached))
                problem = None
            except OSError as e:
                problem = f"{what} is not writable: {e}"
        if problem is not None:
            if args.calibration_dir is not None or args.out is None:
                raise UsageError(problem)
            print(f"steindiff: {problem}; writing only {args.out}", file=sys.stderr)
            cached = None
    common.check_outputs(*[p for p in (args.out, cached) if p is not None], distinct="--out and the cache file")
    ref = _load_reference(args.reference, spec) if args.objective == "reference" else None
    estimate = None
    if args.objective == "trajectory":
        with usage_errors(ValueError):
            opts = calibration_options(spec, objective="trajectory", **options)
        estimate = estimate_fit(spec, base, opts)
        print(f"steindiff: calibrating {args.solver} / {args.schedule} / NFE {base.nfe} for {spec.name} (fit: "
              f"{opts['fit']}; {estimate}, measured on this machine)", file=sys.stderr, flush=True)
    with usage_errors(ValueError):
        sched = calibrate(spec, base, coords=args.coords, objective=args.objective, variant=args.stabilizer,
                          reference=ref, probes=args.probes, progress=not args.no_progress,
                          jacobian_batch=args.jacobian_batch, jacobian_precision=args.jacobian_precision, **options)
    if key is not None:
        sched.meta["key"] = key
    stamp_fit(sched, estimate)
    written = [p for p in (args.out, cached) if p is not None]
    for path in written:
        sched.save(path)
    file = written[0]
    summary = {"out": file, "written": written, "gammas": sched.gammas, "coords": sched.coords, **sched.meta,
               **{k: getattr(sched, k) for k in sched.requires}}
    lines = [f"wrote {' and '.join(written)}: {sched.meta['objective']} calibration of {args.solver} at NFE "
             f"{sched.meta['nfe']}", "  gammas " + " ".join(f"{g:.3f}" for g in sched.gammas)]
    cal = sched.meta.get("calibration", {})
    if sched.meta["objective"] == "trajectory":
        lines.append("  sigmas " + " ".join(f"{s:.4g}" for s in sched.meta["sigmas"]))
        if sched.model_sigmas is not None:
            lines.append("  model sigmas " + " ".join(f"{s:.4g}" for s in sched.model_sigmas))
        if sched.history is not None:
            lines.append("  history " + " | ".join(" ".join(f"{c:+.3f}" for c in row) or "-" for row in sched.history))
        cand = cal["candidates"]
        lines.append(f"  validation: distance to the fine solve {cand[cal['chosen']]['val_rms']:.4g} vs plain "
                     f"{cand['plain']['val_rms']:.4g} ({cal['chosen']}"
                     + ("" if cal["beats_plain"] else ": nothing beat the plain solver, gammas stay 1") + ")")
        lines.append(f"  reference: {cal['reference']['steps']} {cal['reference']['solver']} steps, converged to "
                     f"{cal['reference']['convergence_rms']:.2g} (RMS, {cal['reference']['steps'] // 2} vs "
                     f"{cal['reference']['steps']} steps); took {cal['wall_s']:.1f} s (estimated "
                     f"{estimate.seconds:.0f} s)")
    summary["use"] = _use_commands(args, spec, plain, key, file)
    lines += [f"  use it: {summary['use'][0]}"] + [f"     or: {c}" for c in summary["use"][1:]]
    emit(args, summary, "\n".join(lines))
    return 0


def _use_commands(args: argparse.Namespace, spec, plain, key: dict | None, file: str) -> list[str]:
    """The ``steindiff sample`` commands that use this calibration: ``--stabilizer auto`` when what it looks up
    (the default options, the cache folder) is what was written, and ``--gamma-schedule FILE`` always."""
    import shlex

    q = shlex.quote
    out = []
    if key is not None and key == calibration_key(spec, plain):
        where = "" if args.calibration_dir is None else f" --calibration-dir {q(args.calibration_dir)}"
        rho = f" --rho {args.rho:g}" if args.schedule == "karras" and args.rho != 7.0 else ""
        out.append(f"steindiff sample --model {q(args.model)} --solver {args.solver} --schedule {args.schedule} "
                   f"--nfe {args.nfe}{rho} --stabilizer auto{where}")
    out.append(f"steindiff sample --model {q(args.model)} --gamma-schedule {q(file)}")
    return out
