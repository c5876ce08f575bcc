"""Does a larger refinement budget bring the calibrated sampler closer to the fine solve?

For each cell (solver:schedule:nfe) of ``gmm:image64``, fits the trajectory calibration with the bench's
budget (``--base`` solves) and with ``--more`` solves, no time limit, on the bench's calibration noise
and shared reference solve, and prints the validation distance of every candidate relative to the
plain solver, with how each refinement stopped (``converged`` or ``budget``).

    python benchmarks/calibration_budget.py --cells dpmpp_2m:karras:6,euler:karras:6 --json-out out.json
"""

from __future__ import annotations

import argparse
import time

import torch

from steindiff.bench.runner import _calibration_reference, calibration_options
from steindiff.io import save_json
from steindiff.models.registry import load_model
from steindiff.plan import make_plan
from steindiff.trajectory import fit_trajectory


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gmm:image64")
    p.add_argument("--cells", default="dpmpp_2m:karras:6,euler:karras:6,unipc:karras:8,ipndm:karras:10",
                   help="comma-separated solver:schedule:nfe")
    p.add_argument("--base", type=int, default=200, help="the bench's refinement budget (solves)")
    p.add_argument("--more", type=int, default=1000, help="the larger budget (solves)")
    p.add_argument("--json-out", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    spec = load_model(args.model)
    opts = calibration_options(spec)
    ref = _calibration_reference(spec, opts)
    n = opts["n"]
    if ref.states.shape[1] != n:  # the bench's reference keeps every sample's states: its first is the noise
        raise SystemExit("reference solve does not hold the calibration noise")
    noise = ref.states[0]
    rows = []
    for cell in args.cells.split(","):
        solver, schedule, nfe = cell.split(":")
        base = make_plan(spec.process, solver, int(nfe), schedule)
        for budget in (args.base, args.more):
            t0 = time.perf_counter()
            fit = fit_trajectory(spec.denoiser, base, noise, sigma_min=float(spec.process.sigma_min), ref=ref,
                                 max_solves=budget, max_seconds=float("inf"))
            cand = fit.record["candidates"]
            plain = cand["plain"]["val_rms"]
            row = {"cell": cell, "max_solves": budget, "chosen": fit.record["chosen"],
                   "val_ratio": {k: v["val_rms"] / plain for k, v in cand.items()},
                   "refine": {k: {"solves": v["solves"], "stopped": v["stopped"]}
                              for k, v in fit.record["refine"].items()},
                   "wall_s": time.perf_counter() - t0}
            rows.append(row)
            print(cell, budget, row["chosen"], {k: round(v, 3) for k, v in row["val_ratio"].items()},
                  {k: (v["solves"], v["stopped"]) for k, v in row["refine"].items()}, f"{row['wall_s']:.0f} s",
                  flush=True)
    if args.json_out:
        save_json(args.json_out, {"model": args.model, "calibration": opts, "rows": rows,
                                  "command": "python benchmarks/calibration_budget.py " + " ".join(
                                      f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                                      if v is not None and k != "json_out") + f" --json-out {args.json_out}"})


if __name__ == "__main__":
    main()
