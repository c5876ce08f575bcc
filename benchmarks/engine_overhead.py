#!/usr/bin/env python
"""Per-step engine overhead of steindiff's solvers vs diffusers' schedulers.

Everything except the network is timed: the "model" returns a precomputed tensor, so what remains
is the solver arithmetic, the sampling loop and its checks (steindiff) or ``scheduler.step`` and
``scale_model_input`` (diffusers).  Both run side by side on the same tensors and noise levels, in
one process, alternating, and the median over repeats is reported as microseconds per step.

  python benchmarks/engine_overhead.py                      # table
  python benchmarks/engine_overhead.py --json               # machine-readable
  python benchmarks/engine_overhead.py --shape 16 3 64 64 --steps 10 --repeats 30
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from steindiff import sample

PAIRS = {
    # ours (solver, options) : diffusers scheduler class name, kwargs
    "dpmpp_2m": (("dpmpp_2m", {}),
                 ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2})),
    "unipc": (("unipc", {"order": 2}), ("UniPCMultistepScheduler", {"solver_type": "bh2", "solver_order": 2})),
    "euler": (("euler", {}), ("EulerDiscreteScheduler", {})),
}


def bench_pair(key: str, shape, steps: int, repeats: int, dtype: torch.dtype, check_finite: bool) -> dict:
    import diffusers

    (ours_name, ours_opts), (cls_name, kw) = PAIRS[key]
    sch = getattr(diffusers, cls_name)(num_train_timesteps=1000, beta_schedule="scaled_linear",
                                        beta_start=0.00085, beta_end=0.012, **kw)
    sch.set_timesteps(steps)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g).to(dtype)
    out = torch.randn(*shape, generator=g).to(dtype)  # the "network output", precomputed
    sigmas = sch.sigmas.double()
    k_diffusion_style = hasattr(sch, "scale_model_input") and cls_name == "EulerDiscreteScheduler"

    def ours():
        sample(lambda x_, s_: out, x, sigmas, ours_name, solver_options=ours_opts, check_finite=check_finite)

    def ours_unchecked():  # the same without the NaN/Inf check of model outputs: its cost, by difference
        sample(lambda x_, s_: out, x, sigmas, ours_name, solver_options=ours_opts, check_finite=False)

    def theirs_loop():
        y = x
        for t in sch.timesteps:
            if k_diffusion_style:
                sch.scale_model_input(y, t)
            y = sch.step(out, t, y).prev_sample

    def theirs():  # set_timesteps resets the scheduler's history: part of each solve
        sch.set_timesteps(steps)
        theirs_loop()

    def reset_only():
        sch.set_timesteps(steps)

    # paired, interleaved timings: machine load drifts affect both alike; the ratio is the median of
    # per-repeat ratios, the per-step times are medians
    for fn in (ours, ours_unchecked, theirs, reset_only):  # warm-up
        fn(), fn()
    times = {ours: [], ours_unchecked: [], theirs: []}
    t_ours, t_unchecked, t_theirs, t_reset = times[ours], times[ours_unchecked], times[theirs], []
    for r in range(repeats):
        order = (ours, theirs, ours_unchecked) if r % 2 == 0 else (ours_unchecked, theirs, ours)
        for fn in order:
            t0 = time.perf_counter()
            fn()
            times[fn].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        reset_only()
        t_reset.append(time.perf_counter() - t0)
    reset_s = statistics.median(t_reset)
    return {
        "solver": ours_name, "diffusers": cls_name, "steps": steps,
        "ours_us_per_step": 1e6 * statistics.median(t_ours) / steps,
        "diffusers_us_per_step": 1e6 * statistics.median(t_theirs) / steps,
        "diffusers_steps_only_us_per_step": 1e6 * (statistics.median(t_theirs) - reset_s) / steps,
        "ours_unchecked_us_per_step": 1e6 * statistics.median(t_unchecked) / steps,
        "ratio": statistics.median([a / b for a, b in zip(t_ours, t_theirs)]),
        "ratio_unchecked": statistics.median([a / b for a, b in zip(t_unchecked, t_theirs)]),
        "ratio_vs_steps_only": statistics.median([a / max(b - reset_s, 1e-12) for a, b in zip(t_ours, t_theirs)]),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 2)[-1])
    p.add_argument("--shape", type=int, nargs="+", default=[16, 3, 64, 64], help="latent shape (batch first)")
    p.add_argument("--steps", type=int, default=10, help="solver steps per solve")
    p.add_argument("--repeats", type=int, default=40, help="timed solves of each (medians taken)")
    p.add_argument("--solvers", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: stable on shared CPUs)")
    p.add_argument("--no-check-finite", action="store_true", help="disable steindiff's NaN/Inf check of model outputs")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)
    try:
        import diffusers  # noqa: F401
    except ImportError:
        print("diffusers is not installed: pip install diffusers", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    rows = [bench_pair(k, tuple(args.shape), args.steps, args.repeats, dtype,
                       not args.no_check_finite) for k in args.solvers]
    meta = {"shape": args.shape, "dtype": args.dtype, "steps": args.steps, "repeats": args.repeats,
            "threads": args.threads, "check_finite": not args.no_check_finite, "torch": torch.__version__,
            "diffusers": __import__("diffusers").__version__}
    if args.json:
        print(json.dumps({"meta": meta, "results": rows}, indent=2))
    else:
        print(f"per-step overhead, shape {tuple(args.shape)} {args.dtype}, {args.steps} steps, "
              f"median of {args.repeats}, {args.threads} thread(s), check_finite={meta['check_finite']}")
        print(f"{'ours':9s} {'diffusers':28s} {'ours us':>8s} {'unchecked':>9s} {'diff us':>8s} {'diff steps':>10s} "
              f"{'ours/diff':>9s} {'unchk/diff':>10s} {'vs steps':>8s}")
        for r in rows:
            print(f"{r['solver']:9s} {r['diffusers']:28s} {r['ours_us_per_step']:8.1f} "
                  f"{r['ours_unchecked_us_per_step']:9.1f} "
                  f"{r['diffusers_us_per_step']:8.1f} {r['diffusers_steps_only_us_per_step']:10.1f} {r['ratio']:9.2f} "
                  f"{r['ratio_unchecked']:10.2f} {r['ratio_vs_steps_only']:8.2f}")
        print("ours us: steindiff sample() per step (default check_finite); unchecked: check_finite=False; "
              "diff steps: diffusers without set_timesteps; ratios are medians of paired per-repeat ratios")
    return 0


if __name__ == "__main__":
    sys.exit(main())
