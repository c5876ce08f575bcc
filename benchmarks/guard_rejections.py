"""Were the candidates a guard rejected better or worse than the plain plan it kept?

For each named cell this fits the calibration as ``steindiff bench`` does (the gradient fit at the bench's
settings, :func:`steindiff.bench.runner.calibration_options`), reads every candidate's data-free checks from the
record, says which guards of each guard set reject it, then samples plain and every candidate from the bench's
evaluation noise and scores them with every metric of the model, each with the protocol's verdict against plain
(:func:`steindiff.bench.runner.verdict`).  A candidate a guard set rejects that is better than plain on every
metric is a false alarm of that set.

    OMP_NUM_THREADS=1 python benchmarks/guard_rejections.py --model digits \\
        --cells ipndm/karras/3,euler/karras/8,ipndm/logsnr/4 --json-out docs/results/guard-rejections-digits.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from steindiff import calibrate
from steindiff.bench.runner import _floors, _noise, calibration_options, excess, machine_info, verdict
from steindiff.calibration import GRADIENT_GUARDS
from steindiff.io import save_json
from steindiff.metrics import image_model_metrics, mixture_metrics
from steindiff.models.registry import load_model
from steindiff.plan import SamplingPlan, make_plan
from steindiff.sampling import sample
from steindiff.trajectory import passes_guard

#: The guard sets each candidate is judged under: the gradient fit's default, the same without ``dominance``, and
#: with ``dominance=4`` on the mode check too (rejected: it let mode-collapsed ``heun`` plans through).
GUARD_SETS = {"default": GRADIENT_GUARDS,
              "without dominance": tuple(g.split(":dominance=")[0] for g in GRADIENT_GUARDS),
              "dominance=4 on both": ("residual:margin=0:dominance=4", "modes:tolerance=0.02:dominance=4",
                                      "distribution", "significance")}
IMAGE_METRICS = {"digits": ("digits_fid", "digits_kid", "precision", "recall"),
                 "patches": ("patch_fd", "spectrum", "pixel_sw2")}


def scores(spec, plan: SamplingPlan, seeds: list[int], n: int) -> dict[str, dict]:
    """Per metric, the excess over the seeds (``mean``, ``std``)."""
    names = ("sw2", "nll", "mode_tv") if spec.gmm is not None else IMAGE_METRICS[spec.info.get("metrics", "digits")]
    per: dict[str, list[float]] = {m: [] for m in names}
    for seed in seeds:
        x = sample(spec.denoiser, _noise(spec, n, seed), plan.sigmas, plan.get_solver(),
                   stabilizer=plan.stabilizer()).x
        m = {**mixture_metrics(x, spec.gmm, seed=seed), **_floors(spec, n, seed)} if spec.gmm is not None else \
            image_model_metrics(x.clamp(-1, 1), spec, seed=seed)
        for k in names:
            per[k].append(excess(m, k))
    return {k: {"mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0} for k, v in per.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--model", default="digits")
    p.add_argument("--cells", required=True, help="comma-separated solver/schedule/NFE")
    p.add_argument("--seeds", default="3,4,5", help="evaluation seeds (default the bench's for images: 3,4,5)")
    p.add_argument("--n", type=int, default=400, help="samples per seed (default 400)")
    p.add_argument("--json-out", default=None)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args(argv)
    try:
        spec = load_model(args.model)
        cells = [c.split("/") for c in args.cells.split(",") if c]
        if any(len(c) != 3 or not c[2].isdigit() for c in cells):
            raise ValueError(f"cells are solver/schedule/NFE, got {args.cells!r}")
        for solver, schedule, nfe in cells:  # an unknown solver or schedule stops here, before any fit
            make_plan(spec.process, solver, int(nfe), schedule)
        seeds = [int(s) for s in args.seeds.split(",")]
    except (ValueError, KeyError) as e:
        print(f"guard_rejections: error: {e}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    opts = calibration_options(spec, "gradient")
    result = {"schema": "steindiff.guard-rejections/1", "machine": machine_info(), "model": args.model,
              "command": "python benchmarks/guard_rejections.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "calibration": {k: v for k, v in opts.items() if k != "dtype"}, "seeds": seeds, "n": args.n,
              "guard_sets": {k: list(v) for k, v in GUARD_SETS.items()}, "cells": []}
    for solver, schedule, nfe in cells:
        t0 = time.perf_counter()
        sched = calibrate(spec, solver=solver, nfe=int(nfe), schedule=schedule, objective="trajectory",
                          fit_method="gradient", params="steps,model_sigmas", n=opts["n"], ref_steps=opts["ref_steps"],
                          max_seconds=opts["max_seconds"], gradient_options=opts.get("gradient_options"),
                          guards=GRADIENT_GUARDS)
        rec = sched.meta["calibration"]
        cands = rec["candidates"]
        cell = {"cell": f"{solver}/{schedule}/{nfe}", "calibration_s": time.perf_counter() - t0, "candidates": {}}
        metrics = {}
        for name, c in cands.items():
            plan = SamplingPlan(solver, torch.tensor(c["sigmas"], dtype=torch.float64), "fitted", c.get("gammas"),
                                model_sigmas=c.get("model_sigmas"), history=c.get("history"))
            metrics[name] = scores(spec, plan, seeds, args.n)
        for name, c in cands.items():
            rejected = {s: [g for g in gs if name != "plain" and not passes_guard(c, cands["plain"], g)]
                        for s, gs in GUARD_SETS.items()}
            cell["candidates"][name] = {
                "val_rms": c["val_rms"], "checks": c.get("checks"), "rejected_by": rejected,
                "metrics": metrics[name],
                "verdicts": {} if name == "plain" else {
                    m: ("hurts" if v["worse_at_floor"] else v["verdict"])
                    for m, v in ((m, verdict(metrics["plain"][m], metrics[name][m])) for m in metrics[name])}}
        result["cells"].append(cell)
        for name, c in cell["candidates"].items():
            print(f"{cell['cell']} {name}: " + ", ".join(f"{m} {v['mean']:.3g}±{v['std']:.2g}"
                                                          + (f" {c['verdicts'][m]}" if c["verdicts"] else "")
                                                          for m, v in c["metrics"].items())
                  + "; rejected by " + "; ".join(f"{s}: {', '.join(g) or 'none'}" for s, g in c["rejected_by"].items()),
                  flush=True)
    if args.json_out:
        save_json(args.json_out, result)
    if args.json:
        print(json.dumps(result, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
