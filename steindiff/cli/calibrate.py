"""``steindiff calibrate``: fit a sampler once and save it as JSON; then ``steindiff sample
--gamma-schedule FILE`` applies it with no extra passes.  The default objective, ``trajectory``, fits
each step's scale (and, with ``--fit steps|both``, the noise levels) so that the few-step solve follows
a fine solve of the same model from the same noise: no data, no training."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import torch

from ..calibration import CALIBRATION_SEED, OBJECTIVES, cache_file, calibrate, calibration_key
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
    p.add_argument("--stabilizer", default="stein-energy",
                   help=f"--objective variant: the stabilizer run on the calibration batch "
                        f"({', '.join(k for k in STABILIZERS if k not in ('none', 'auto'))})")
    p.add_argument("--coords", default="ve", choices=["ve", "vp"], help="coordinates of the rescaled update")
    p.add_argument("--reference", default=None,
                   help="--objective reference: reference samples (.npy/.npz, key 'samples' or the first array), held "
                        "out from evaluation; for gmm:* models 'true' draws them from the mixture")
    p.add_argument("--n", type=int, default=None,
                   help="calibration batch size (default: 512 for trajectory, half of it validates; 1000 otherwise)")
    p.add_argument("--ref-steps", type=int, default=200,
                   help="trajectory: steps of the fine reference solve (dpmpp_2m, log-SNR)")
    p.add_argument("--max-seconds", type=float, default=60.0, help="trajectory: time budget of the refinement")
    p.add_argument("--max-solves", type=int, default=200,
                   help="trajectory: refinement budget in solves of the fit batch (reproducible; seconds are not)")
    p.add_argument("--guards", default=None,
                   help=f"trajectory: the checks a fitted candidate must pass on the validation half to replace the "
                        f"plain solver, comma-separated from {', '.join(GUARDS)} (default, for every model: "
                        f"residual,{','.join(DEFAULT_GUARDS)}; docs/guards.md)")
    p.add_argument("--probes", type=int, default=5, help="--objective variant: Hutchinson probes per step")
    p.add_argument("--out", default=None, help="output JSON file (for sample --gamma-schedule)")
    p.add_argument("--calibration-dir", default=None,
                   help="trajectory: write the calibration into this cache folder instead, under the name that "
                        "--stabilizer auto, demo and bench --calibration-dir look up (a model's shipped "
                        "calibrations: <model>/calibrations)")
    common.add_jacobian_batch(p)
    common.add_device(p)
    common.add_common(p)
    p.set_defaults(func=run, seed=CALIBRATION_SEED)


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
    if (args.out is None) == (args.calibration_dir is None):
        raise UsageError("give one of --out FILE or --calibration-dir DIR")
    if args.calibration_dir is not None and args.objective != "trajectory":
        raise UsageError(f"--calibration-dir holds trajectory calibrations; --objective {args.objective} "
                         "needs --out FILE")
    if args.objective == "reference" and args.reference is None:
        raise UsageError("--objective reference needs --reference FILE (or 'true' for gmm:* models)")
    if args.n is not None and args.n < (4 if args.objective == "trajectory" else 2):
        raise UsageError(f"--n must be at least 4 for trajectory (fit and validation halves), got {args.n}")
    if args.ref_steps < 4 or not args.max_seconds > 0 or args.max_solves < 1:
        raise UsageError(f"--ref-steps must be >= 4, --max-seconds > 0 and --max-solves >= 1, got {args.ref_steps}, "
                         f"{args.max_seconds} and {args.max_solves}")
    device = common.device_from_args(args)
    spec = common.model_on_device(args.model, device)
    with usage_errors(ValueError):
        base = dataclasses.replace(make_plan(spec.process, args.solver, args.nfe, args.schedule, rho=args.rho),
                                   coords=args.coords)
    key = None
    if args.calibration_dir is not None:  # the cache's layout (steindiff.calibration.calibrated_plan)
        key = calibration_key(spec, base, fit=args.fit)
        args.out = str(cache_file(Path(args.calibration_dir), key))
        try:
            Path(args.calibration_dir).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"--calibration-dir {args.calibration_dir!r} cannot be a folder: {e.strerror}") from None
    common.check_outputs(args.out)
    ref = _load_reference(args.reference, spec) if args.objective == "reference" else None
    with usage_errors(ValueError):
        sched = calibrate(spec, base, coords=args.coords, objective=args.objective, fit=args.fit,
                          variant=args.stabilizer, n=args.n, seed=args.seed,
                          reference=ref, probes=args.probes, dtype=common.DTYPES[args.dtype],
                          progress=not args.no_progress, ref_steps=args.ref_steps, max_seconds=args.max_seconds,
                          max_solves=args.max_solves, guards=args.guards, jacobian_batch=args.jacobian_batch,
                          jacobian_precision=args.jacobian_precision)
    if key is not None:
        sched.meta["key"] = key
    sched.save(args.out)
    summary = {"out": args.out, "gammas": sched.gammas, "coords": sched.coords, **sched.meta}
    lines = [f"wrote {args.out}: {sched.meta['objective']} calibration of {args.solver} at NFE {sched.meta['nfe']}",
             "  gammas " + " ".join(f"{g:.3f}" for g in sched.gammas)]
    cal = sched.meta.get("calibration", {})
    if sched.meta["objective"] == "trajectory":
        lines.append("  sigmas " + " ".join(f"{s:.4g}" for s in sched.meta["sigmas"]))
        cand = cal["candidates"]
        lines.append(f"  validation: distance to the fine solve {cand[cal['chosen']]['val_rms']:.4g} vs plain "
                     f"{cand['plain']['val_rms']:.4g} ({cal['chosen']}"
                     + ("" if cal["beats_plain"] else ": nothing beat the plain solver, gammas stay 1") + ")")
        lines.append(f"  reference: {cal['reference']['steps']} {cal['reference']['solver']} steps, converged to "
                     f"{cal['reference']['convergence_rms']:.2g} (RMS, {cal['reference']['steps'] // 2} vs "
                     f"{cal['reference']['steps']} steps); took {cal['wall_s']:.1f} s")
    emit(args, summary, "\n".join(lines))
    return 0
