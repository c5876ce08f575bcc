"""``steindiff calibrate``: estimate a gamma schedule once and save it as JSON; then
``steindiff sample --gamma-schedule FILE`` applies it with no extra passes."""

from __future__ import annotations

import argparse

import numpy as np
import torch

from ..calibrate import calibrate
from ..io import check_writable
from ..stabilizers import STABILIZERS
from . import UsageError, emit
from .common import (DTYPES, add_common, add_device, add_jacobian_batch, add_sampling, check_sampling, device_from_args,
                     model_on_device)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="estimate a per-step gamma schedule", description=__doc__)
    add_sampling(p)
    p.add_argument("--coords", default="ve", choices=["ve", "vp"])
    p.add_argument("--variant", default="stein-energy",
                   help=f"a stabilizer ({', '.join(k for k in STABILIZERS if k != 'none')}) run on the calibration batch, "
                        "or 'reference' (fit to --reference data)")
    p.add_argument("--reference", default=None,
                   help="reference samples (.npy/.npz, key 'samples' or the first array), held out from evaluation; "
                        "for gmm:* models 'true' draws them from the mixture")
    p.add_argument("--n", type=int, default=1000, help="calibration batch size")
    p.add_argument("--probes", type=int, default=5)
    p.add_argument("--out", required=True, help="output JSON file")
    add_jacobian_batch(p)
    add_device(p)
    add_common(p)
    p.set_defaults(func=run, seed=12345)


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
        raise UsageError(f"reference data {arg!r} has samples of shape {tuple(arr.shape[1:])}, model makes {spec.sample_shape}")
    return arr


def run(args: argparse.Namespace) -> int:
    check_sampling(args)
    if args.variant != "reference" and args.variant not in STABILIZERS:
        raise UsageError(f"unknown variant {args.variant!r}; choose 'reference' or one of {', '.join(STABILIZERS)}")
    if args.variant == "reference" and args.reference is None:
        raise UsageError("--variant reference needs --reference FILE (or 'true' for gmm:* models)")
    device = device_from_args(args)
    spec = model_on_device(args.model, device)
    try:
        check_writable(args.out)
    except OSError as e:
        raise UsageError(str(e)) from None
    ref = _load_reference(args.reference, spec) if args.variant == "reference" else None
    try:
        sched = calibrate(spec, solver=args.solver, nfe=args.nfe, schedule=args.schedule, coords=args.coords,
                          variant=args.variant, n=args.n, seed=args.seed, reference=ref, probes=args.probes,
                          dtype=DTYPES[args.dtype], progress=not args.no_progress, rho=args.rho,
                          jacobian_batch=args.jacobian_batch)
    except ValueError as e:
        raise UsageError(str(e)) from None
    sched.save(args.out)
    summary = {"out": args.out, "gammas": sched.gammas, "coords": sched.coords, **sched.meta}
    emit(args, summary, f"wrote {args.out}: gammas " + " ".join(f"{g:.3f}" for g in sched.gammas))
    return 0
