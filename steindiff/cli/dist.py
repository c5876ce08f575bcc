"""``steindiff sample-dist`` (multi-process sampling, run under torchrun) and ``steindiff merge``.

    steindiff sample-dist --nproc-per-node 4 --model gmm:image64 --num-samples 50000 --out-dir runs/x
    steindiff merge runs/x --out samples.npz

Every rank samples its shard of the global batch (noise from ``--seed`` for all ``--num-samples``) and
writes ``shard-{rank:05d}.npz``; rank 0 writes ``manifest.json`` and prints the summary.
``--nproc-per-node N`` checks the arguments once (a refusal exits 2 before any process starts) and then
starts the N processes itself, as ``torchrun --standalone --nproc_per_node N -m steindiff sample-dist ...``
would; started by torchrun directly, only rank 0 prints a refusal (torchrun then reports the failure in
its own words and exits 1).  Without either it runs as a single process (world size 1).  See
:mod:`steindiff.distributed`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
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
    p.add_argument("--nproc-per-node", type=int, default=None, metavar="N",
                   help="start N processes on this machine (torchrun --standalone) after checking the arguments once; "
                        "default: the processes torchrun started, or one")
    common.add_calibration(p)
    common.add_device(p, help="auto (the default: under nccl each rank on its own GPU, cuda:LOCAL_RANK, statistics "
                      "all-reduced on the GPU; else CUDA when available, else the CPU), cpu, cuda (cuda:LOCAL_RANK) or "
                      "cuda:N")
    common.add_common(p)
    p.set_defaults(func=run_sample, parser=p)

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
    rank = os.environ.get("RANK", "0")
    try:
        if args.nproc_per_node is not None:
            return _launch(args)
        spec, plan, name, stabilizer = _checked(args, int(os.environ.get("WORLD_SIZE", "1")))
    except UsageError:
        if rank != "0":  # every rank finds the same refusal: rank 0 alone says it
            return 2
        raise
    return _sample(args, spec, plan, name, stabilizer)


def _checked(args: argparse.Namespace, world: int):
    """Every check of a run on ``world`` ranks, before any work (``UsageError``): the model, the plan of
    ``--stabilizer auto``, the stabilizer and the output folder."""
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
    plan, name = _auto_plan(args, spec, world) if resolves_to_calibrated(args.stabilizer) else (None, args.stabilizer)
    stabilizer = common.stabilizer_from_args(args, spec) if name != "none" else None
    if args.n < world:
        raise UsageError(f"--num-samples {args.n} cannot be sharded over {world} ranks (at least one sample per rank)")
    if stabilizer is not None and not getattr(stabilizer, "per_sample", False) and args.n // world < 2:
        raise UsageError(f"the stabilizer's batch statistics need at least 2 samples per rank; --num-samples {args.n} "
                         f"over {world} ranks (pass --per-sample for one gamma per sample)")
    common.check_output_dir(args.out_dir, "--out-dir")
    return spec, plan, name, stabilizer


def _launch(args: argparse.Namespace) -> int:
    """``--nproc-per-node N``: the checks once here, then N processes as ``torchrun --standalone`` starts
    them (torch's own launcher, in this process); its failure report is replaced by one line."""
    import logging

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    if "WORLD_SIZE" in os.environ:
        raise UsageError("--nproc-per-node starts the processes itself; do not combine it with torchrun")
    if args.nproc_per_node < 1:
        raise UsageError(f"--nproc-per-node must be >= 1, got {args.nproc_per_node}")
    _checked(args, args.nproc_per_node)
    from torch.distributed import run as torchrun

    launcher = torchrun.parse_args(["--standalone", "--nproc_per_node", str(args.nproc_per_node), "-m", "steindiff",
                                    *_child_argv(args)])
    quiet, env = logging.getLogger("torch.distributed"), dict(os.environ)
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # the launcher's own warnings and failure log: summarised below
    try:
        torchrun.run(launcher)
    except ChildFailedError as e:
        codes = {r: f.exitcode for r, f in sorted(e.failures.items())}
        first = min(codes)
        if codes[first] == 2:  # a refusal, already printed by rank 0
            return 2
        raise RuntimeError(f"{len(codes)} of {args.nproc_per_node} processes failed (rank {first}: exit code "
                           f"{codes[first]}; its error is above); finished shards are kept in {args.out_dir}") from None
    finally:
        quiet.setLevel(level)
        os.environ.clear()
        os.environ.update(env)  # the launcher sets OMP_NUM_THREADS for its processes
    return 0


def _child_argv(args: argparse.Namespace) -> list[str]:
    """The command line of every rank: this run's options, without ``--nproc-per-node``."""
    argv = ["sample-dist"]
    for a in args.parser._actions:
        if not a.option_strings or a.dest in ("help", "nproc_per_node"):
            continue
        v = getattr(args, a.dest)
        if isinstance(a, argparse._StoreTrueAction):
            argv += [a.option_strings[0]] if v else []
        elif v is not None:
            argv += [a.option_strings[0], str(v)]
    return argv


def _sample(args: argparse.Namespace, spec, plan, name: str, stabilizer) -> int:
    from ..distributed import sample_distributed, shard_name

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
    warning = common.gamma_warning(res.gammas) if stabilizer is not None else None
    if warning:
        summary["warnings"] = [warning]
        print(f"steindiff sample-dist: {warning}", file=sys.stderr)
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
