"""``steindiff sample``: draw samples, save them, print a summary (metrics for mixtures)."""

from __future__ import annotations

import argparse

from ..generate import generate
from ..io import check_writable, save_json, save_npz
from ..metrics import mixture_metrics
from . import UsageError, emit
from .common import (DTYPES, add_common, add_device, add_sampling, add_stabilizer, check_sampling, device_from_args,
                     model_on_device, stabilizer_from_args)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="draw samples with a solver", description=__doc__)
    add_sampling(p)
    add_stabilizer(p)
    p.add_argument("--n", type=int, default=2000, help="number of samples")
    p.add_argument("--batch-size", type=int, default=None, help="samples per model call (default: all)")
    p.add_argument("--out", default=None, help="write samples (and the per-step trace) to this .npz file")
    p.add_argument("--trace", default=None, help="write the stabilizer's per-step trace to this JSON file")
    p.add_argument("--gamma-schedule", default=None,
                   help="apply a calibrated gamma schedule (from `steindiff calibrate`): no extra passes")
    add_device(p)
    add_common(p)
    p.set_defaults(func=run)


def _load_schedule(args: argparse.Namespace, spec):
    from ..schedules import get_sigmas
    from ..solvers import get_solver, steps_for_nfe
    from ..stabilizers.schedule import load_gamma_schedule

    try:
        sched = load_gamma_schedule(args.gamma_schedule)
        solver = get_solver(args.solver)
        sigmas = get_sigmas(args.schedule, steps_for_nfe(solver, args.nfe), spec.process, rho=args.rho)
        sched.check_matches(model=spec.name, solver=args.solver, schedule=args.schedule, nfe=solver.nfe(sigmas))
        if len(sched.meta["sigmas"]) != len(sigmas) or any(
                abs(a - float(b)) > 1e-9 * max(1.0, abs(a)) for a, b in zip(sched.meta["sigmas"], sigmas)):
            raise ValueError("gamma schedule does not match this run (sigmas differ: other rho or noise range)")
    except (OSError, ValueError) as e:
        raise UsageError(str(e)) from None
    return sched


def run(args: argparse.Namespace) -> int:
    check_sampling(args)
    device = device_from_args(args)
    spec = model_on_device(args.model, device)
    if args.gamma_schedule is not None:
        if args.stabilizer != "none":
            raise UsageError("give either --stabilizer or --gamma-schedule, not both")
        stabilizer = _load_schedule(args, spec)
    else:
        stabilizer = stabilizer_from_args(args, spec)
    for path in (args.out, args.trace):
        if path is not None:
            try:
                check_writable(path)
            except OSError as e:
                raise UsageError(str(e)) from None
    try:
        gen = generate(
            spec, solver=args.solver, nfe=args.nfe, schedule=args.schedule, n=args.n, seed=args.seed,
            batch_size=args.batch_size, dtype=DTYPES[args.dtype], progress=not args.no_progress, rho=args.rho,
            stabilizer=stabilizer, device=device,
        )
    except ValueError as e:
        raise UsageError(str(e)) from None
    summary = {
        "model": spec.name, "solver": args.solver, "schedule": args.schedule, "stabilizer": args.stabilizer if args.gamma_schedule is None else f"gamma-schedule:{args.gamma_schedule}",
        "coords": args.coords if stabilizer is not None else None, "nfe": gen.nfe,
        "extra_passes": gen.extra_passes, "steps": len(gen.sigmas) - 1, "n": args.n, "seed": args.seed,
        "device": str(device),
        "sigmas": [float(s) for s in gen.sigmas], "wall_s_per_sample": gen.wall_s / args.n,
        "gammas": [r.get("gamma") for r in gen.trace],
    }
    if spec.gmm is not None:
        summary["metrics"] = mixture_metrics(gen.x, spec.gmm, seed=args.seed)
    if args.out is not None:
        save_npz(args.out, samples=gen.x, sigmas=gen.sigmas, gammas=[r.get("gamma", 1.0) for r in gen.trace])
        summary["out"] = args.out
    if args.trace is not None:
        save_json(args.trace, {"schema": "steindiff.trace/1", "config": {k: summary[k] for k in ("model", "solver", "schedule", "stabilizer", "coords", "nfe")}, "steps": gen.trace})
        summary["trace"] = args.trace
    lines = [f"{spec.name}: {args.solver} / {args.schedule} / stabilizer {summary['stabilizer']}, NFE {gen.nfe}"
             f" (+{gen.extra_passes} Jacobian passes), {args.n} samples"]
    if gen.trace:
        lines.append("  gammas     " + " ".join(f"{r.get('gamma', 1.0):.3g}" for r in gen.trace))
    for k, v in summary.get("metrics", {}).items():
        lines.append(f"  {k:10s} {v:.5g}")
    if args.out:
        lines.append(f"  wrote {args.out}")
    emit(args, summary, "\n".join(lines))
    return 0
