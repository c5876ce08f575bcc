"""``steindiff sample``: draw samples, save them, print a summary (metrics for mixtures)."""

from __future__ import annotations

import argparse
import sys

from ..generate import generate
from ..io import save_json, save_npz
from ..metrics import mixture_metrics
from ..stabilizers.registry import resolves_to_calibrated
from . import UsageError, common, emit, usage_errors

GRID_MAX = 64  # samples shown by --grid (8 per row)
DEFAULT_N = 2000  # samples drawn when neither --n nor the model (sampling_defaults.json) says


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="draw samples with a solver", description=__doc__)
    common.add_sampling(p)
    common.add_stabilizer(p)
    p.add_argument("--n", type=int, default=None,
                   help=f"number of samples (default: the model's, e.g. 64 for digits and patches; else {DEFAULT_N})")
    p.add_argument("--batch-size", type=int, default=None, help="samples per model call (default: all)")
    p.add_argument("--out", default=None, metavar="FILE.npz",
                   help="write samples, sigmas and gammas to this .npz file (default: not saved)")
    p.add_argument("--grid", default=None, metavar="FILE.png",
                   help=f"image models: write the first {GRID_MAX} samples as an image grid to this PNG file")
    p.add_argument("--trace", default=None, metavar="FILE.json",
                   help="write the stabilizer's per-step trace to this JSON file")
    p.add_argument("--gamma-schedule", default=None,
                   help="apply a calibration file from `steindiff calibrate` (its gammas and, if fitted, its noise "
                        "levels): no extra passes; the run takes the model, solver, schedule and NFE the file was made "
                        "for (flags may repeat them, not contradict them)")
    common.add_calibration(p)
    common.add_device(p)
    common.add_common(p)
    p.set_defaults(func=run)


def _read_schedule(path: str):
    """The calibration file of ``--gamma-schedule`` (a ``UsageError`` when unreadable)."""
    from ..stabilizers.schedule import load_gamma_schedule

    with usage_errors(OSError, ValueError):
        return load_gamma_schedule(path)


def _schedule_plan(args: argparse.Namespace, spec, sched, base):
    """The plan of a calibration file, refused (naming the mismatch) when made for another configuration."""
    from ..calibration import model_fingerprint, plan_from_schedule

    with usage_errors(ValueError):
        sched.check_matches(model=spec.name, solver=args.solver, schedule=args.schedule, nfe=base.nfe)
        base_sigmas = sched.meta.get("base_sigmas", sched.meta["sigmas"])
        if len(base_sigmas) != len(base.sigmas) or any(
                abs(a - float(b)) > 1e-9 * max(1.0, abs(a)) for a, b in zip(base_sigmas, base.sigmas)):
            raise ValueError("gamma schedule does not match this run (sigmas differ: other rho or noise range)")
        if "fingerprint" in sched.meta and sched.meta["fingerprint"] != model_fingerprint(spec):
            raise ValueError(f"gamma schedule was calibrated for other weights of {spec.name!r} (fingerprint "
                             f"{sched.meta['fingerprint']} vs {model_fingerprint(spec)})")
        return plan_from_schedule(sched, base)


def sampling_plan(args: argparse.Namespace, spec, sched=None):
    """The plan of this run and whether its gammas are what runs (instead of ``--stabilizer``): plain,
    from the ``--gamma-schedule`` file ``sched``, or (``--stabilizer auto`` when ``auto`` is the calibrated
    sampler) the shipped or cached calibration, fitted now when ``--calibrate`` allows."""
    from ..plan import make_plan
    from ..stabilizers.registry import resolves_to_calibrated

    base = make_plan(spec.process, args.solver, args.nfe, args.schedule, rho=args.rho)
    if sched is not None:
        return _schedule_plan(args, spec, sched, base), True
    if resolves_to_calibrated(args.stabilizer):
        return common.auto_plan(args, spec, base), True
    return base, False


def run(args: argparse.Namespace) -> int:
    common.check_sampling(args)
    common.check_extension(args.out, "--out", ".npz")
    common.check_extension(args.grid, "--grid", ".png")
    common.check_extension(args.trace, "--trace", ".json")
    common.check_outputs(args.out, args.grid, args.trace, distinct="--out, --grid and --trace")
    if args.gamma_schedule is not None and args.stabilizer != "none":
        raise UsageError("give either --stabilizer or --gamma-schedule, not both")
    if resolves_to_calibrated(args.stabilizer):
        common.calibrate_mode(args)
    device = common.device_from_args(args)
    # a calibration file fixes the model, solver, schedule and NFE it was made for; flags may only repeat them
    sched = _read_schedule(args.gamma_schedule) if args.gamma_schedule is not None else None
    fixed = {k: sched.meta.get(k) for k in ("model", "solver", "schedule", "nfe")} if sched is not None else None
    source = f"the calibration file {args.gamma_schedule!r}"
    given_model = args.model
    spec = common.model_on_device(common.resolve_model(args, fixed and fixed["model"]), device)
    if fixed is not None and given_model is not None and fixed["model"] is not None and spec.name != fixed["model"]:
        raise UsageError(f"--model {given_model} contradicts {source}, which was made for model {fixed['model']!r}; "
                         "leave --model out to take it from the file")
    common.resolve_sampling(args, spec, fixed, source)
    if args.n is None:
        args.n = int(((spec.info or {}).get("sampling_defaults") or {}).get("n", DEFAULT_N))
    if args.grid is not None and len(spec.sample_shape) != 3:
        raise UsageError(f"--grid needs an image model (samples C x H x W); {spec.name} makes samples of "
                         f"shape {spec.sample_shape}")
    plan, by_plan = sampling_plan(args, spec, sched)
    stabilizer = plan.stabilizer() if by_plan else common.stabilizer_from_args(args, spec)
    common.check_batch_statistics(stabilizer, args.n, args.batch_size)
    with usage_errors(ValueError):
        gen = generate(spec, plan, n=args.n, seed=args.seed, batch_size=args.batch_size, device=device,
                       dtype=common.DTYPES[args.dtype], progress=not args.no_progress,
                       stabilizer=None if by_plan else stabilizer)
    label = args.stabilizer if args.gamma_schedule is None else f"gamma-schedule:{args.gamma_schedule}"
    if args.stabilizer == "auto":
        label = "auto (calibrated)" if plan.gammas is not None else "auto (plain solver)"
    summary = {
        "model": spec.name, "solver": args.solver, "schedule": args.schedule, "stabilizer": label,
        "coords": args.coords if stabilizer is not None else None, "nfe": gen.nfe, "nfe_budget": args.nfe,
        "per_sample": bool(getattr(stabilizer, "per_sample", False)), "extra_passes": gen.extra_passes,
        "steps": len(gen.sigmas) - 1, "n": args.n, "seed": args.seed, "device": str(device),
        "sigmas": [float(s) for s in gen.sigmas], "wall_s_per_sample": gen.wall_s / args.n,
        "gammas": [r.get("gamma") for r in gen.trace] if gen.trace else [1.0] * (len(gen.sigmas) - 1),
    }
    warning = common.gamma_warning(summary["gammas"]) if stabilizer is not None and not by_plan else None
    if warning:
        summary["warnings"] = [warning]
        print(f"steindiff sample: {warning}", file=sys.stderr)
    if spec.gmm is not None:
        summary["metrics"] = mixture_metrics(gen.x, spec.gmm, seed=args.seed)
    if args.out is not None:
        save_npz(args.out, samples=gen.x, sigmas=gen.sigmas, gammas=[r.get("gamma", 1.0) for r in gen.trace])
        summary["out"] = args.out
    if args.grid is not None:
        _save_grid(gen.x, args.grid)
        summary["grid"] = args.grid
    if args.trace is not None:
        config = {k: summary[k] for k in ("model", "solver", "schedule", "stabilizer", "coords", "nfe")}
        save_json(args.trace, {"schema": "steindiff.trace/1", "config": config, "steps": gen.trace})
        summary["trace"] = args.trace
    budget = "" if gen.nfe == args.nfe else f" of --nfe {args.nfe}"
    lines = [f"{spec.name}: {args.solver} / {args.schedule} / stabilizer {summary['stabilizer']}, NFE {gen.nfe}{budget}"
             f" ({summary['steps']} steps, +{gen.extra_passes} Jacobian passes), {args.n} samples"]
    if gen.trace:
        lines.append("  gammas     " + " ".join(f"{r.get('gamma', 1.0):.3g}" for r in gen.trace))
    lines += [f"  {k:10s} {v:.5g}" for k, v in summary.get("metrics", {}).items()]
    lines += [f"  wrote {path}" for path in (args.out, args.grid, args.trace) if path is not None]
    emit(args, summary, "\n".join(lines))
    return 0


def _save_grid(x, path: str) -> None:
    """The first samples as a PNG image grid (values in [-1, 1]; small images enlarged to >= 32 pixels)."""
    from ..plotting import save_image_grid

    x = x[:GRID_MAX].float().clamp(-1, 1)
    scale = max(1, 32 // max(x.shape[-2:]))
    save_image_grid(x, path, nrow=min(8, x.shape[0]), scale=scale, padding=scale)
