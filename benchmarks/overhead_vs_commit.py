#!/usr/bin/env python
"""Per-step engine overhead of this checkout's sampling loop against an earlier commit's, side by side.

The package at ``--base`` (a git commit) is extracted to a temporary folder and imported under another name
(its imports are relative), so both run in one process on the same tensors.  The "model" returns a
precomputed tensor: what is timed is the solver arithmetic, the loop and its checks.  The two alternate
over ``--repeats`` solves; each solve's thread CPU time is taken (``time.thread_time``: insensitive to
other processes on a shared machine); medians per step and the median of the paired ratios are reported.

    python benchmarks/overhead_vs_commit.py --base 2ed6b68 --shape 16 64
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

CASES = ("euler", "dpmpp_2m", "unipc", "ipndm", "heun", "dpmpp_2m+gammas", "unipc+gammas")


def load_base(commit: str, root: Path) -> object:
    """``steindiff`` as it was at ``commit``, importable as ``steindiff_base``."""
    tmp = Path(tempfile.mkdtemp(prefix="steindiff-base-"))
    archive = subprocess.run(["git", "archive", commit, "steindiff"], cwd=root, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
    (tmp / "steindiff").rename(tmp / "steindiff_base")
    sys.path.insert(0, str(tmp))
    return importlib.import_module("steindiff_base")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--base", required=True, help="the git commit to compare with")
    p.add_argument("--shape", type=int, nargs="+", default=[16, 64], help="state shape (batch first)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)
    import steindiff as new
    from steindiff.stabilizers.schedule import GammaSchedule

    try:
        old = load_base(args.base, Path(new.__file__).resolve().parent.parent)
    except subprocess.CalledProcessError as e:
        print(f"error: cannot extract commit {args.base!r}: {e.stderr.decode().strip()}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*args.shape, generator=g)
    out = torch.randn(*args.shape, generator=g)

    def model(x_, s_):
        return out

    sig = new.get_sigmas("karras", args.steps, new.VEProcess())
    gammas = [0.9] * (args.steps - 2) + [1.0, 1.0]
    rows = []
    for case in CASES:
        solver, _, with_gammas = case.partition("+")
        s_old = old.stabilizers.schedule.GammaSchedule(gammas) if with_gammas else None
        s_new = GammaSchedule(gammas) if with_gammas else None
        fns = {"base": lambda: old.sample(model, x, sig, solver, stabilizer=s_old),
               "this": lambda: new.sample(model, x, sig, solver, stabilizer=s_new)}
        for f in fns.values():  # warm-up
            f(), f()
        t: dict[str, list[float]] = {k: [] for k in fns}
        for r in range(args.repeats):
            for k in (("base", "this") if r % 2 == 0 else ("this", "base")):
                t0 = time.thread_time()
                fns[k]()
                t[k].append(time.thread_time() - t0)
        rows.append({"case": case, "base_us_per_step": 1e6 * statistics.median(t["base"]) / args.steps,
                     "this_us_per_step": 1e6 * statistics.median(t["this"]) / args.steps,
                     "ratio": statistics.median(b / a for a, b in zip(t["base"], t["this"]) if a > 0)})
    meta = {"base": args.base, "shape": args.shape, "steps": args.steps, "repeats": args.repeats,
            "torch": torch.__version__}
    if args.json:
        print(json.dumps({"meta": meta, "rows": rows}, indent=1))
    else:
        print(f"per-step engine overhead, shape {tuple(args.shape)}, {args.steps} steps, median of {args.repeats} "
              f"paired solves (thread CPU time), this checkout vs {args.base}")
        for r in rows:
            print(f"{r['case']:16s} base {r['base_us_per_step']:8.1f} us/step  this {r['this_us_per_step']:8.1f} "
                  f"us/step  ratio {r['ratio']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
