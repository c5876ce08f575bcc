"""``steindiff sample-dist`` (multi-process sampling, run under torchrun) and ``steindiff merge``.

    torchrun --standalone --nproc_per_node 4 -m steindiff sample-dist --model gmm:image64 --num-samples 50000 \\
        --stabilizer stein --out-dir runs/x
    steindiff merge runs/x --out samples.npz

Every rank samples its shard of the global batch (noise from ``--seed`` for all ``--num-samples``) and
writes ``shard-{rank:05d}.npz``; rank 0 writes ``manifest.json`` and prints the summary.  Without
torchrun it runs as a single process (world size 1).  See :mod:`steindiff.distributed`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
from pathlib import Path

from . import UsageError, common, emit, usage_errors


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample-dist", help="sample a global batch sharded over torchrun processes",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_sampling(p)
    common.add_stabilizer(p)
    p.add_argument("--num-samples", "--n", dest="n", type=int, default=2000,
                   help="number of samples of the global batch (under torchrun spell it --num-samples: torchrun "
                        "takes --n for an abbreviation of its own options)")
    p.add_argument("--out-dir", required=True, help="directory for the shards and manifest.json (created if missing)")
    p.add_argument("--probe-mode", default="global", choices=["global", "per-sample"],
                   help="Hutchinson probes: slice of the global batch's (equals `steindiff sample`; memory "
                        "probes*n*dim per rank) or per-sample generators (memory probes*shard*dim)")
    p.add_argument("--backend", default="auto", choices=["auto", "gloo", "nccl"],
                   help="auto: nccl with CUDA, else gloo")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds before a collective waiting for a dead or stalled rank fails")
    common.add_calibration(p)
    common.add_device(p, help="auto (the default: under nccl each rank on its own GPU, cuda:LOCAL_RANK, statistics "
                      "all-reduced on the GPU; else CUDA when available, else the CPU), cpu, cuda (cuda:LOCAL_RANK) or "
                      "cuda:N")
    common.add_common(p)
    p.set_defaults(func=run_sample)

    m = sub.add_parser("merge", help="merge the shards of a sample-dist run into one .npz",
                       description="Merge the shards of a `steindiff sample-dist` directory into one .npz (samples in "
                                   "global order, sigmas, gammas, config). Refuses, naming them, if shards are missing "
                                   "or stale (exit code 2).")
    m.add_argument("dir", help="the --out-dir of a sample-dist run")
    m.add_argument("--out", required=True, metavar="FILE.npz", help="merged .npz file")
    m.add_argument("--metrics", action="store_true", help="also compute mixture metrics (gmm models only)")
    common.add_common(m)
    m.set_defaults(func=run_merge)


class Terminated(Exception):
    pass


@contextlib.contextmanager
def _sigterm_as_error(rank: str):
    """torchrun stops the other ranks with SIGTERM when one fails: say so instead of dying silently."""
    def handler(signum, frame):
        raise Terminated(f"rank {rank}: terminated by SIGTERM from the launcher (another rank probably failed; "
                          "see its error). Finished shards are kept; `steindiff merge` lists the missing ones")

    try:
        prev = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, prev)


def run_sample(args: argparse.Namespace) -> int:
    from ..distributed import sample_distributed, shard_name

    common.check_sampling(args)
    if args.timeout <= 0:
        raise UsageError(f"--timeout must be positive, got {args.timeout}")
    common.device_from_args(args)  # a device missing here: exit 2 before any work (each rank resolves its own)
    if args.backend == "nccl":
        import torch

        if not torch.cuda.is_available():
            raise UsageError("--backend nccl needs CUDA, which is not available here; use --backend gloo or auto")
    from ..stabilizers.registry import resolves_to_calibrated

    if resolves_to_calibrated(args.stabilizer):
        common.calibrate_mode(args)
    spec = common.load_model_or_usage(common.resolve_model(args))
    common.resolve_sampling(args, spec)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    plan, name = _auto_plan(args, spec, world) if resolves_to_calibrated(args.stabilizer) else (None, args.stabilizer)
    stabilizer = common.stabilizer_from_args(args, spec) if name != "none" else None
    if args.n < world:
        raise UsageError(f"--num-samples {args.n} cannot be sharded over {world} ranks (at least one sample per rank)")
    if stabilizer is not None and not getattr(stabilizer, "per_sample", False) and args.n // world < 2:
        raise UsageError(f"the stabilizer's batch statistics need at least 2 samples per rank; --num-samples {args.n} "
                         f"over {world} ranks (pass --per-sample for one gamma per sample)")
    common.check_output_dir(args.out_dir, "--out-dir")
    with _sigterm_as_error(os.environ.get("RANK", "0")):
        res = sample_distributed(spec, Path(args.out_dir), plan, n=args.n, solver=args.solver, nfe=args.nfe,
                                 schedule=args.schedule, rho=args.rho, seed=args.seed, stabilizer_name=name,
                                 stabilizer_options=common.stabilizer_options(args) if stabilizer is not None else {},
                                 probe_mode=args.probe_mode, dtype=common.DTYPES[args.dtype], backend=args.backend,
                                 timeout_s=args.timeout, progress=not args.no_progress, device=args.device)
    if res.rank != 0:
        return 0
    summary = {
        "out_dir": res.out_dir, "manifest": str(Path(res.out_dir) / "manifest.json"), "run_id": res.run_id,
        "world_size": res.world_size, "device_rank0": res.device, "n": args.n, "model": spec.name,
        "solver": args.solver, "schedule": args.schedule, "stabilizer": args.stabilizer, "probe_mode": args.probe_mode,
        "nfe": res.nfe, "extra_passes": res.extra_passes, "steps": len(res.config["sigmas"]) - 1, "seed": args.seed,
        "gammas": res.gammas, "shards": [shard_name(r) for r in range(res.world_size)], "wall_s_rank0": res.wall_s,
    }
    if name != args.stabilizer:
        summary["stabilizer"] = "auto (calibrated)" if plan.gammas is not None else "auto (plain solver)"
    lines = [f"{spec.name}: {args.solver} / {args.schedule} / stabilizer {summary['stabilizer']}, NFE {res.nfe} "
             f"(+{res.extra_passes} Jacobian passes), {args.n} samples over {res.world_size} rank(s)"]
    if args.stabilizer != "none":
        lines.append("  gammas     " + " ".join(f"{g:.3g}" for g in res.gammas))
    lines.append(f"  wrote {res.world_size} shard(s) and manifest.json to {res.out_dir}; merge with `steindiff merge "
                 f"{res.out_dir} --out FILE`")
    emit(args, summary, "\n".join(lines))
    return 0


def _auto_plan(args: argparse.Namespace, spec, world: int):
    """``--stabilizer auto`` as the calibrated sampler: the shipped or cached calibration (fitted now on a
    single process; under torchrun every rank loads the same file, so it must exist before the launch)."""
    from ..plan import make_plan

    base = make_plan(spec.process, args.solver, args.nfe, args.schedule, rho=args.rho)
    mode = common.calibrate_mode(args)
    plan = common.auto_plan(args, spec, base, calibrate_missing=mode if world == 1 else "never")
    if plan is base and world > 1 and mode != "never":
        raise UsageError(f"--stabilizer auto: no calibration of {spec.name} {args.solver} / {args.schedule} / NFE "
                         f"{args.nfe} in the model's or the cache's folder, and {world} ranks would each fit it; fit "
                         f"it once first ({common.calibrate_command(args)}), or pass --calibrate never for the plain "
                         f"solver")
    return plan, "none"


def run_merge(args: argparse.Namespace) -> int:
    from ..distributed import MissingShardsError, merge_shards

    common.check_extension(args.out, "--out", ".npz")
    common.check_outputs(args.out)
    if args.metrics:
        from ..distributed import _read_manifest

        with usage_errors(FileNotFoundError, ValueError):
            model = str(_read_manifest(Path(args.dir))["config"].get("model"))
        if not model.startswith("gmm:"):
            raise UsageError(f"--metrics needs a gmm model, the run used {model!r}")
    with usage_errors(FileNotFoundError, MissingShardsError):
        summary = merge_shards(args.dir, args.out)
    if args.metrics:
        summary["metrics"] = _metrics(summary)
    cfg = summary["config"]
    lines = [f"merged {summary['shards']} shard(s), {summary['n']} samples ({cfg.get('model')}, {cfg.get('solver')}, "
             f"stabilizer {cfg.get('stabilizer')}) into {summary['out']}"]
    lines += [f"  {k:10s} {v:.5g}" for k, v in summary.get("metrics", {}).items()]
    emit(args, summary, "\n".join(lines))
    return 0


def _metrics(summary: dict) -> dict:
    import numpy as np
    import torch

    from ..metrics import mixture_metrics

    spec = common.load_model_or_usage(summary["config"]["model"])
    with np.load(summary["out"]) as z:
        x = torch.from_numpy(z["samples"])
    return mixture_metrics(x, spec.gmm, seed=int(summary["config"].get("seed", 0)))
