"""Refit a few cells' trajectory calibrations with the current code and score them against plain on
evaluation seeds: a check of a fit change on the cells it is meant to fix, without refitting a whole
grid (the digits grid is a GPU job).  Nothing is written to the model's shipped calibrations.

    python benchmarks/refit_cells.py --model digits --cells dpmpp_2m/karras/4,unipc/karras/4 --seeds 3,4,5 \\
        --json-out docs/results/digits-refit-cells.json

Each cell is calibrated as the bench does for image models (256 calibration samples, a 100-step reference
solve, at most 120 solves for the two refinements together unless ``--max-solves`` says otherwise;
``--max-seconds`` for the fit, so that a slow CPU does not cut it short), then plain and calibrated are
sampled from the same evaluation noise (N = ``--n``) and scored with the model's image metrics: excess
digits-FID (over the real-vs-real floor), mean and standard deviation over seeds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from steindiff.calibration import calibrate, plan_from_schedule
from steindiff.generate import generate
from steindiff.io import save_json
from steindiff.metrics import image_model_metrics
from steindiff.models.registry import load_model
from steindiff.plan import make_plan


def parse_cells(text: str) -> list[tuple[str, str, int]]:
    cells = []
    for item in text.split(","):
        parts = item.split("/")
        if len(parts) != 3 or not parts[2].isdigit():
            raise ValueError(f"cells are solver/schedule/nfe, comma-separated; got {item!r}")
        cells.append((parts[0], parts[1], int(parts[2])))
    return cells


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="digits", help="an image model (digits)")
    p.add_argument("--cells", required=True, help="solver/schedule/nfe, comma-separated")
    p.add_argument("--seeds", default="3,4,5", help="evaluation seeds")
    p.add_argument("--n", type=int, default=400, help="samples per seed")
    p.add_argument("--max-seconds", type=float, default=400.0,
                   help="time budget of the fit (the two refinements share it)")
    p.add_argument("--max-solves", type=int, default=120, help="solve budget of the two refinements together "
                   "(the bench's: 120)")
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    try:
        cells = parse_cells(args.cells)
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    spec = load_model(args.model)
    metric = "patch_fd" if spec.info.get("metrics") == "patches" else "digits_fid"
    rows = []
    for solver, schedule, nfe in cells:
        t0 = time.perf_counter()
        base = make_plan(spec.process, solver, nfe, schedule)
        sched = calibrate(spec, base, n=256, ref_steps=100, max_solves=args.max_solves, max_seconds=args.max_seconds)
        rec = sched.meta["calibration"]
        row = {"solver": solver, "schedule": schedule, "nfe": nfe, "chosen": rec["chosen"], "gammas": sched.gammas,
               "sigmas": sched.meta["sigmas"], "val_ratio": rec["val_ratio"], "plain_tail": rec["plain_tail"],
               "guards": rec["guards"], "solves": {k: v["solves"] for k, v in rec["refine"].items()},
               "fit_s": time.perf_counter() - t0}
        for name, plan in (("plain", base), ("calibrated", plan_from_schedule(sched, base))):
            excess = []
            for seed in seeds:
                m = image_model_metrics(generate(spec, plan, n=args.n, seed=seed).x.clamp(-1, 1), spec, seed=seed)
                excess.append(float(m[metric] - m[f"{metric}_floor"]))
            row[name] = {"mean": statistics.mean(excess), "sd": statistics.pstdev(excess), "per_seed": excess}
        rows.append(row)
        print(f"{solver}/{schedule}/{nfe}: {row['chosen']}, excess {metric} plain {row['plain']['mean']:.3g} "
              f"± {row['plain']['sd']:.2g}, calibrated {row['calibrated']['mean']:.3g} ± {row['calibrated']['sd']:.2g}",
              flush=True)
    if args.json_out:
        save_json(args.json_out, {"model": args.model, "metric": f"excess {metric}", "seeds": seeds, "n": args.n,
                                  "rows": rows, "command": "python benchmarks/refit_cells.py " + " ".join(
                                      sys.argv[1:] if argv is None else argv)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
