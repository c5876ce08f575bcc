"""Is the calibration's residual-noise check right on an image model?  For every shipped calibration where
the check decides (the candidate chosen with it differs from the one chosen without it,
:func:`steindiff.trajectory.choose_candidate`), sample plain and both choices (their recorded sigmas and
gammas) from evaluation noise and score them with the model's image metrics.

    python benchmarks/rejected_candidates.py --model digits --seeds 3,4,5 \
        --json-out docs/results/digits-rejected-candidates.json

The choice depends only on each file's recorded candidates, not on the guards it was saved under, so the
cells are the same before and after a re-selection (benchmarks/reselect_calibrations.py).  Use seeds the
rule was not chosen on (the bench grid evaluates 0, 1, 2).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from steindiff.generate import generate
from steindiff.io import save_json
from steindiff.metrics import image_model_metrics
from steindiff.models.registry import load_model
from steindiff.plan import SamplingPlan
from steindiff.trajectory import DEFAULT_GUARDS, choose_candidate

WITH_RESIDUAL = ("residual", *DEFAULT_GUARDS)
LOWER_IS_BETTER = {"digits_fid": True, "digits_kid": True, "precision": False, "recall": False,
                   "patch_fd": True, "spectrum": True, "pixel_sw2": True}


def _verdict(new: list[float], old: list[float], lower: bool) -> str:
    """``better``/``worse`` when the mean difference exceeds the larger seed spread, else ``tie``."""
    d = statistics.mean(new) - statistics.mean(old)
    spread = max(statistics.pstdev(new), statistics.pstdev(old))
    if abs(d) <= spread:
        return "tie"
    return "better" if (d < 0) == lower else "worse"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="digits", help="a shipped image model with calibrations (digits)")
    p.add_argument("--seeds", default="3,4,5")
    p.add_argument("--n", type=int, default=400)
    p.add_argument("--json-out", default=None)
    args = p.parse_args()
    torch.set_num_threads(2)
    spec = load_model(args.model)
    seeds = [int(s) for s in args.seeds.split(",")]
    folder = spec.info.get("calibrations")
    if not folder:
        raise SystemExit(f"{args.model} ships no calibrations")
    patches = spec.info.get("metrics") == "patches"
    metrics = ["patch_fd", "spectrum", "pixel_sw2"] if patches else ["digits_fid", "digits_kid", "precision", "recall"]
    rows = []
    for f in sorted(Path(folder).glob("*.json")):
        meta = json.loads(f.read_text())
        cands = meta["calibration"]["candidates"]
        with_r, without_r = choose_candidate(cands, WITH_RESIDUAL), choose_candidate(cands, DEFAULT_GUARDS)
        if with_r == without_r:
            continue
        row = {"solver": meta["solver"], "schedule": meta["schedule"], "nfe": meta["nfe"],
               "with_residual_check": with_r, "without": without_r, "candidates": {}}
        for name in dict.fromkeys(["plain", with_r, without_r]):
            cand = cands[name]
            plan = SamplingPlan(meta["solver"], torch.tensor(cand["sigmas"], dtype=torch.float64), meta["schedule"],
                                cand["gammas"], meta.get("coords", "ve"))
            per_seed = {m: [] for m in metrics}
            for seed in seeds:
                x = generate(spec, plan, n=args.n, seed=seed).x.clamp(-1, 1)
                scores = image_model_metrics(x, spec, seed=seed)
                for m in metrics:
                    per_seed[m].append(float(scores[m]))
            row["candidates"][name] = {"per_seed": per_seed,
                                       "mean": {m: statistics.mean(v) for m, v in per_seed.items()},
                                       "val_ratio": cand["val_rms"] / cands["plain"]["val_rms"],
                                       "passed_residual_check": cand.get("passed_residual_check")}
        c = row["candidates"]
        row["verdict"] = {m: _verdict(c[without_r]["per_seed"][m], c[with_r]["per_seed"][m], LOWER_IS_BETTER[m])
                          for m in metrics}
        rows.append(row)
        print(f"{row['solver']} {row['schedule']} {row['nfe']}: {with_r} -> {without_r}  " + "  ".join(
            f"{m} {c[with_r]['mean'][m]:.3g} -> {c[without_r]['mean'][m]:.3g} ({row['verdict'][m]})" for m in metrics),
            flush=True)
    summary = {m: {v: sum(r["verdict"][m] == v for r in rows) for v in ("better", "tie", "worse")} for m in metrics}
    print(f"{len(rows)} cells where the residual check decides; without it, against with it (beyond the seed "
          f"spread): " + "; ".join(f"{m} {s['better']} better / {s['tie']} ties / {s['worse']} worse"
                                   for m, s in summary.items()))
    if args.json_out:
        save_json(args.json_out, {"model": args.model, "seeds": seeds, "n": args.n, "metrics": metrics, "rows": rows,
                                  "summary": summary, "command": "python benchmarks/rejected_candidates.py "
                                  f"--model {args.model} --seeds {args.seeds} --n {args.n} --json-out {args.json_out}"})


if __name__ == "__main__":
    main()
