"""Were the calibration's guards right to keep the plain solver?  For every shipped calibration of a model
whose choice was ``plain``, sample each candidate the fit recorded (its sigmas and gammas) from the
bench's evaluation noise and score it with the model's primary metric, beside which guards it failed.

    python benchmarks/rejected_candidates.py --model digits --json-out docs/results/digits-rejected-candidates.json

Note: the scores use the bench's evaluation seeds, so they judge the guards; a rule changed because of
them must be judged again on other seeds.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from steindiff.generate import generate
from steindiff.io import save_json
from steindiff.metrics import image_model_metrics
from steindiff.models.registry import load_model
from steindiff.plan import SamplingPlan

CHECKS = ("passed_residual_check", "passed_distribution_check", "passed_significance_check")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="digits", help="a shipped image model with calibrations (digits)")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--n", type=int, default=400)
    p.add_argument("--json-out", default=None)
    args = p.parse_args()
    torch.set_num_threads(2)
    spec = load_model(args.model)
    seeds = [int(s) for s in args.seeds.split(",")]
    folder = spec.info.get("calibrations")
    if not folder:
        raise SystemExit(f"{args.model} ships no calibrations")
    metric = {"digits": "digits_fid", "patches": "patch_fd"}[spec.info.get("metrics", "digits")]
    rows = []
    for f in sorted(Path(folder).glob("*.json")):
        d = json.loads(f.read_text())
        meta = d.get("meta", d)
        cal = meta["calibration"]
        if cal["chosen"] != "plain":
            continue
        plain_rms = cal["candidates"]["plain"]["val_rms"]
        row = {"solver": meta["solver"], "schedule": meta["schedule"], "nfe": meta["nfe"], "candidates": {}}
        for name, cand in cal["candidates"].items():
            plan = SamplingPlan(meta["solver"], torch.tensor(cand["sigmas"], dtype=torch.float64), meta["schedule"],
                                cand["gammas"], meta.get("coords", "ve"))
            scores = []
            for seed in seeds:
                x = generate(spec, plan, n=args.n, seed=seed).x.clamp(-1, 1)
                scores.append(image_model_metrics(x, spec, seed=seed)[metric])
            row["candidates"][name] = {"metric": sum(scores) / len(scores), "per_seed": scores,
                                       "val_ratio": cand["val_rms"] / plain_rms,
                                       **{k: cand.get(k) for k in CHECKS}}
        rows.append(row)
        c = row["candidates"]
        print(row["solver"], row["schedule"], row["nfe"], "  ".join(
            f"{k} {v['metric']:.2f} ({'/'.join('ok' if v[x] else 'x' for x in CHECKS if v[x] is not None)})"
            for k, v in c.items()), flush=True)
    better = sum(r["candidates"]["refined"]["metric"] < r["candidates"]["plain"]["metric"] for r in rows)
    print(f"{len(rows)} cells kept plain; the refined candidate scores lower than plain in {better}")
    if args.json_out:
        save_json(args.json_out, {"model": args.model, "metric": metric, "seeds": seeds, "n": args.n, "rows": rows,
                                  "refined_better": better, "command": "python benchmarks/rejected_candidates.py "
                                  f"--model {args.model} --seeds {args.seeds} --n {args.n} --json-out {args.json_out}"})


if __name__ == "__main__":
    main()
