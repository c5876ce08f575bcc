"""Where the distance to the ODE's solution sits: per-sample distances of plain and calibrated cells.

The bench's ``traj_err`` is the RMS over samples (and coordinates) of the distance between a solve and
the fine reference solve from the same noise.  This script re-samples the committed ``cal:trajectory``
grid (the fitted gammas and noise levels recorded in its rows; nothing is refitted) and the plain solver
on the same evaluation noise and splits that RMS per sample:

- ``rms``: the bench's ``traj_err`` (recomputed: a check that the cells are reproduced);
- ``median``: the median sample's distance (RMS over its coordinates);
- ``top5_share``: the share of the summed squared distance held by the 5% farthest samples;
- ``switched`` (mixtures only): the fraction of samples whose most likely mixture component differs
  from the reference sample's, i.e. the coarse solve ended in another mode.

Per cell, calibrated / plain ratios of ``rms`` and ``median`` (mean over seeds of each); the summary
gives their median over cells, as the bench's ``traj_err`` ratio is summarised.

    python benchmarks/distance_breakdown.py docs/results/calibrated-image64.json --json-out out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from steindiff.bench.runner import TRAJECTORY, _dtype, _noise, _reference
from steindiff.generate import generate
from steindiff.io import save_json
from steindiff.models.registry import load_model
from steindiff.plan import SamplingPlan, make_plan


def per_sample(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """RMS over coordinates of each sample's distance to its reference sample (float64)."""
    return (x - ref).double().reshape(len(x), -1).pow(2).mean(1).sqrt()


def breakdown(d: torch.Tensor) -> dict:
    """``rms``, ``median`` and ``top5_share`` of per-sample distances ``d``."""
    sq = d.pow(2).sort(descending=True).values
    k = max(1, int(round(0.05 * len(d))))
    return {"rms": float(sq.mean().sqrt()), "median": float(d.median()), "top5_share": float(sq[:k].sum() / sq.sum())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("grid", help="a committed calibrated grid (docs/results/calibrated-*.json)")
    p.add_argument("--json-out", default=None)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        grid = json.loads(Path(args.grid).read_text())
        rows = [r for r in grid["rows"] if r["stabilizer"] == TRAJECTORY and r.get("status") == "ok"]
        if not rows:
            raise ValueError(f"{args.grid} has no {TRAJECTORY} rows")
    except (OSError, ValueError, KeyError) as e:  # json.JSONDecodeError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    ref_cfg = grid["config"]["reference"]
    t0 = time.perf_counter()
    cells: dict[tuple, dict] = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        spec = load_model(model)
        gmm = getattr(spec, "gmm", None)
        mrows = [r for r in rows if r["model"] == model]
        for seed in dict.fromkeys(r["seed"] for r in mrows):
            srows = [r for r in mrows if r["seed"] == seed]
            noise = _noise(spec, srows[0]["n"], seed)
            ref = _reference(spec, noise, ref_cfg["solver"], ref_cfg["steps"])
            ref_mode = gmm.responsibilities(ref, 0.0).argmax(1) if gmm is not None else None
            for r in tqdm(srows, disable=args.no_progress, desc=f"{model} seed {seed}", leave=False):
                base = make_plan(spec.process, r["solver"], r["nfe_budget"], r["schedule"])
                cal = SamplingPlan(r["solver"], torch.tensor(r["calibrated_sigmas"], dtype=torch.float64), "fitted",
                                   list(r["calibrated_gammas"]), r["coords"])
                key = (model, r["solver"], r["schedule"], r["nfe_budget"])
                cell = cells.setdefault(key, {"plain": [], "calibrated": []})
                for name, plan in (("plain", base), ("calibrated", cal)):
                    x = generate(spec, plan, noise=noise, n=noise.shape[0], dtype=_dtype(spec)).x
                    b = breakdown(per_sample(x, ref))
                    if gmm is not None:
                        b["switched"] = float((gmm.responsibilities(x, 0.0).argmax(1) != ref_mode).double().mean())
                    if name == "calibrated":
                        b["bench_traj_err"] = r["metrics"].get("traj_err")
                    cell[name].append(b)
    out_cells = []
    for (model, solver, schedule, nfe), c in cells.items():
        mean = {name: {k: statistics.mean(b[k] for b in c[name] if b.get(k) is not None)
                       for k in c[name][0] if any(b.get(k) is not None for b in c[name])} for name in c}
        out_cells.append({"model": model, "solver": solver, "schedule": schedule, "nfe_budget": nfe, **mean,
                          "ratio": {k: mean["calibrated"][k] / mean["plain"][k] if mean["plain"][k] > 0 else None
                                    for k in ("rms", "median")}})
    summary = {}
    for model in dict.fromkeys(c["model"] for c in out_cells):
        mc = [c for c in out_cells if c["model"] == model]
        s = {f"{k}_ratio_median": float(np.median([c["ratio"][k] for c in mc if c["ratio"][k] is not None]))
             for k in ("rms", "median")}
        for name in ("plain", "calibrated"):
            s[f"{name}_top5_share_median"] = float(np.median([c[name]["top5_share"] for c in mc]))
            if "switched" in mc[0][name]:
                s[f"{name}_switched_mean"] = float(np.mean([c[name]["switched"] for c in mc]))
        s["rms_reproduces_bench"] = max(abs(c["calibrated"]["rms"] / c["calibrated"]["bench_traj_err"] - 1)
                                        for c in mc if c["calibrated"].get("bench_traj_err"))
        summary[model] = s
        print(f"{model}: {len(mc)} cells; calibrated / plain, median over cells: RMS distance "
              f"{s['rms_ratio_median']:.2f}, median sample's distance {s['median_ratio_median']:.2f}; the 5% farthest "
              f"samples hold {s['plain_top5_share_median']:.0%} (plain) and {s['calibrated_top5_share_median']:.0%} "
              f"(calibrated) of the squared distance"
              + (f"; samples ending in another mode than the reference's: {s['plain_switched_mean']:.1%} plain, "
                 f"{s['calibrated_switched_mean']:.1%} calibrated" if "plain_switched_mean" in s else "")
              + f" (bench traj_err reproduced within {s['rms_reproduces_bench']:.1e})")
    if args.json_out:
        save_json(args.json_out, {"grid": args.grid, "reference": ref_cfg, "summary": summary, "cells": out_cells,
                                  "wall_s": time.perf_counter() - t0,
                                  "command": "python benchmarks/distance_breakdown.py " + " ".join(
                                      sys.argv[1:] if argv is None else argv)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
