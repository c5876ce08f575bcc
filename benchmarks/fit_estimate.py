"""Does the announced calibration time hold?  Estimate (:func:`steindiff.fit_estimate.estimate_fit`, as
``--stabilizer auto`` and ``steindiff calibrate`` announce it) against the measured fit, per cell, with each
model's default calibration options, on this machine (one torch thread, the load average recorded).

    python benchmarks/fit_estimate.py --cells gmm:image64:unipc:karras:5,digits:dpmpp_2m:karras:7 \\
        --json-out docs/results/fit-estimate.json --md-out docs/results/fit-estimate.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from steindiff.calibration import calibrate, calibration_options
from steindiff.fit_estimate import estimate_fit
from steindiff.io import save_json
from steindiff.models.registry import load_model
from steindiff.plan import make_plan

CELLS = "gmm:toy2d:euler:karras:4,gmm:image64:unipc:karras:5,gmm:image64:dpmpp_2m:karras:10,digits:dpmpp_2m:karras:7"


def _cell(text: str) -> tuple[str, str, str, int]:
    *model, solver, schedule, nfe = text.split(":")
    return ":".join(model), solver, schedule, int(nfe)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cells", default=CELLS, help="comma-separated model:solver:schedule:nfe")
    p.add_argument("--json-out", default=None)
    p.add_argument("--md-out", default=None)
    p.add_argument("--from", dest="from_json", default=None, help="write --md-out from this JSON, without fitting")
    args = p.parse_args()
    if args.from_json:
        with open(args.from_json) as f:
            _markdown(json.load(f)["rows"], args.md_out)
        return
    torch.set_num_threads(1)
    rows = []
    for text in args.cells.split(","):
        model, solver, schedule, nfe = _cell(text)
        spec = load_model(model)
        base = make_plan(spec.process, solver, nfe, schedule)
        opts = calibration_options(spec, objective="trajectory")
        load0 = os.getloadavg()[0]
        est = estimate_fit(spec, base, opts)
        t0 = time.perf_counter()
        sched = calibrate(spec, base, **opts)
        wall = time.perf_counter() - t0
        cal = sched.meta["calibration"]
        row = {"model": model, "solver": solver, "schedule": schedule, "nfe": nfe, "options": opts,
               "estimate_s": est.seconds, "probe_s": est.probe_s, "fit_s": wall, "ratio": est.seconds / wall,
               "ref_step_s": est.ref_step_s, "solve_s": est.solve_s, "pass_s": est.pass_s,
               "reference_s": cal["reference"]["wall_s"],
               "refine": {k: {f: v[f] for f in ("solves", "stopped", "wall_s")} for k, v in cal["refine"].items()},
               "load_before": load0, "load_after": os.getloadavg()[0]}
        rows.append(row)
        print(f"{text}: estimated {est.seconds:.1f} s (probe {est.probe_s:.1f} s), fit took {wall:.1f} s, "
              f"ratio {row['ratio']:.2f}; load {load0:.1f} -> {row['load_after']:.1f}", flush=True)
    result = {"schema": "steindiff.fit-estimate/1", "machine": {"platform": platform.platform(),
              "cpus": os.cpu_count(), "torch_threads": 1}, "rows": rows}
    if args.json_out:
        save_json(args.json_out, result)
    if args.md_out:
        _markdown(rows, args.md_out)


def _markdown(rows: list[dict], path: str) -> None:
    lines = ["# Announced calibration time against the measured fit", "",
             "Written by `python benchmarks/fit_estimate.py --json-out docs/results/fit-estimate.json "
             "--md-out docs/results/fit-estimate.md` (one torch thread, each model's default calibration "
             "options; the load average is the machine's, shared with other work). The estimate counts the "
             "refinements as using their whole budget of solves (or seconds); where they converge sooner, the fit "
             "is shorter than announced.", "",
             "| cell | estimated (s) | measuring took (s) | fit took (s) | estimate / fit | refinement solves | load |",
             "|---|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        solves = " + ".join(f"{v['solves']} ({v['stopped']})" for v in r["refine"].values())
        budget = r["options"]["max_solves"] // 2
        lines.append(f"| {r['model']} {r['solver']}/{r['schedule']}/NFE {r['nfe']} | {r['estimate_s']:.1f} | "
                     f"{r['probe_s']:.1f} | {r['fit_s']:.1f} | {r['ratio']:.2f} | {solves} of {budget} each | "
                     f"{r['load_before']:.1f}-{r['load_after']:.1f} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")

if __name__ == "__main__":
    main()
