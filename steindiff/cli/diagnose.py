"""``steindiff diagnose``: contractivity diagnostics of a sampler.

Runs the sampler and, at every step's input states, estimates the local Lipschitz constant of the
step operator per sample (Jacobian products: Lanczos or power iteration on J^T J), compares it
with the strict-contraction threshold 1 and with the paper's bound sigma_t/sigma_s + sigma_t h L_D
(L_D: the denoiser's local Lipschitz constant), and draws the per-step picture (--png).
--coords selects the coordinates of the reported constants (and of the stabilizer's statistics):
ve (the solver's state) or vp (x_vp = alpha x; L_vp = L_ve alpha_t/alpha_s).
"""

from __future__ import annotations

import argparse

from ..diagnostics import diagnose, plot_diagnosis, summarize
from ..io import save_json
from . import UsageError, common, emit


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("diagnose", help="local Lipschitz constants of each solver step (contractivity)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_sampling(p)
    common.add_stabilizer(p, per_sample=False,  # the diagnostics need one gamma per step
                          coords_help="coordinates of the reported Lipschitz constants and bounds (and of the "
                                      "stabilizer's statistics)")
    p.add_argument("--n", type=int, default=256, help="number of samples (trajectories)")
    p.add_argument("--iters", type=int, default=20, help="Jacobian-product iterations per estimate")
    p.add_argument("--method", default="lanczos", choices=["lanczos", "power"],
                   help="Lanczos or plain power iteration on J^T J")
    p.add_argument("--jvp", default="auto", choices=["auto", "forward", "double_backward"],
                   help="how Jacobian-vector products are taken (auto: forward mode, else double backward)")
    p.add_argument("--batch-size", type=int, default=None, help="samples per Jacobian-product batch (default: all)")
    p.add_argument("--png", default=None, metavar="FILE", help="write the per-step picture to this PNG file")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="write the full per-step record (with per-sample values) to this JSON file")
    common.add_device(p)
    common.add_common(p)
    p.set_defaults(func=run)


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3g}"


def run(args: argparse.Namespace) -> int:
    common.check_sampling(args)  # also --n, --batch-size and the NFE budget
    if args.iters < 1:
        raise UsageError(f"--iters must be >= 1, got {args.iters}")
    common.check_extension(args.png, "--png", ".png")
    common.check_extension(args.out, "--out", ".json")
    common.check_outputs(args.png, args.out, distinct="--png and --out")
    device = common.device_from_args(args)
    spec = common.model_on_device(common.resolve_model(args), device)
    common.resolve_sampling(args, spec)
    stabilizer = common.stabilizer_from_args(args, spec)
    if stabilizer is not None and args.n < 2:
        raise UsageError("a stabilizer's batch statistics need --n >= 2")
    result = diagnose(spec, args.solver, args.nfe, args.schedule, args.n, args.seed, args.coords, stabilizer=stabilizer,
                      iters=args.iters, method=args.method, jvp=args.jvp, rho=args.rho, dtype=common.DTYPES[args.dtype],
                      batch_size=args.batch_size, progress=not args.no_progress, device=device)
    result["config"]["stabilizer"] = args.stabilizer
    if args.png is not None:
        plot_diagnosis(result, args.png)
    if args.out is not None:
        save_json(args.out, {k: v for k, v in result.items() if k != "x"})
    summary = summarize(result)
    summary["png"], summary["out"] = args.png, args.out
    cfg, s = result["config"], result["summary"]
    lines = [f"{cfg['model']}: {cfg['solver']} / {cfg['schedule']} / stabilizer {args.stabilizer}, NFE {cfg['nfe']}, "
             f"n={cfg['n']}, {cfg['coords'].upper()} coords, {cfg['method']} x{cfg['iters']}",
             f"{'step':>4} {'sigma':>8} {'-> next':>8} {'L med':>8} {'L q95':>8} {'L max':>8} {'>1':>6} "
             f"{'L_D med':>8} {'bound':>8} {'1st-ord':>8}" + (f" {'gamma':>9} {'L_S med':>8} {'L_S max':>8}"
                                                              if stabilizer is not None else "")]
    for r in result["steps"]:
        L = r["lipschitz"]
        line = (f"{r['step']:>4} {r['sigma']:>8.3g} {r['sigma_next']:>8.3g} {L['median']:>8.3g} {L['q95']:>8.3g} "
                f"{L['max']:>8.3g} {L['frac_gt_1']:>6.2f} {_fmt(r['lipschitz_D']['median']):>8} "
                f"{_fmt(r['bound']['median'] if r['bound'] else None):>8} {_fmt(r['bound_first_order']['median']):>8}")
        if stabilizer is not None:
            ls = r["lipschitz_stabilized"]
            line += f" {r['gamma']:>9.3g} {ls['median']:>8.3g} {ls['max']:>8.3g}"
        lines.append(line)
    lines.append(f"  peak median L {s['peak_median']:.3g}, peak max L {s['peak_max']:.3g}, steps with median > 1: "
                 f"{s['steps_with_median_gt_1']}/{cfg['steps']}, trajectory amplification median "
                 f"{s['trajectory_amplification']['median']:.3g}")
    p = result["passes"]
    lines.append(f"  passes: NFE {p['nfe']}, Lipschitz model passes {p['lipschitz_model_passes']} (JVP {p['jvp']} "
                 f"[{p['jvp_mode']}], VJP {p['vjp']})")
    lines += [f"  wrote {path}" for path in (args.png, args.out) if path]
    emit(args, summary, "\n".join(lines))
    return 0
