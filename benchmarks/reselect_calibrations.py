"""Re-apply the calibration's validation choice to saved trajectory calibrations, under other guards.

A trajectory calibration file records every candidate it fitted (plain, closed form, the two
refinements) with its validation scores and the outcome of each check
(``steindiff.trajectory.fit_trajectory``).  The choice among them is a pure function of that record
(:func:`steindiff.trajectory.choose_candidate`), so a change of the guards can be applied to saved
files exactly, without refitting: the result is the file a refit would write from the same candidates.
Used to move the digits model's shipped calibrations (fitted on an H200) to the default guards, which no
longer gate on the residual-noise check::

    python benchmarks/reselect_calibrations.py steindiff/weights/digits/calibrations

Each changed file is rewritten atomically and says what it was re-chosen from (``calibration.reselected``).

``--rescore`` first re-scores each file's candidates with the current checks
(:func:`steindiff.trajectory.score_candidates`): it redraws the calibration noise from the recorded seed,
repeats the reference solve, solves every recorded candidate plan on the validation half and checks that
each candidate's validation distance is the recorded one (a file whose candidates are not reproduced is
refused).  Used to move the shipped digits calibrations to the rank-based significance check::

    python benchmarks/reselect_calibrations.py steindiff/weights/digits/calibrations --rescore
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from steindiff.io import save_json
from steindiff.models.registry import load_model
from steindiff.plan import SamplingPlan
from steindiff.sampling import prior_noise
from steindiff.stabilizers.schedule import load_gamma_schedule
from steindiff.trajectory import (
    DEFAULT_GUARDS,
    SIGNIFICANCE_TEST,
    choose_candidate,
    reference_solve,
    score_candidates,
)


def reselect(obj: dict, guards: tuple[str, ...]) -> tuple[dict, str, str]:
    """The calibration file ``obj`` with its choice re-made under ``guards``: (new obj, old, new choice)."""
    cal = obj["calibration"]
    old = cal["chosen"]
    new = choose_candidate(cal["candidates"], guards)
    out = json.loads(json.dumps(obj))
    c = out["calibration"]
    cand = c["candidates"][new]
    out["gammas"], out["sigmas"] = list(cand["gammas"]), list(cand["sigmas"])
    plain = c["candidates"]["plain"]["val_rms"]
    c.update(chosen=new, beats_plain=new != "plain", guards=list(guards),
             val_ratio=cand["val_rms"] / plain if plain else None)
    if new != old or c.get("guards") != cal.get("guards"):
        c["reselected"] = {"from": old, "guards_before": cal.get("guards", ["residual", "distribution",
                                                                            "significance"])}
    return out, old, new


def rescore(obj: dict, cache: dict, tolerance: float = 1e-5) -> dict:
    """The calibration file ``obj`` with its candidates' validation record made anew by the current
    :func:`~steindiff.trajectory.score_candidates`, on the noise and reference solve it was fitted with
    (``cache`` keeps models and reference solves between files).  Refuses a file whose candidates'
    validation distances differ from the recorded ones by more than ``tolerance`` (relative)."""
    cal = obj["calibration"]
    if (obj.get("key") or {}).get("conditioning"):
        raise ValueError("a conditional calibration cannot be re-scored here (its labels are not recorded)")
    if ("model", obj["model"]) not in cache:
        cache[("model", obj["model"])] = load_model(obj["model"])
    spec = cache[("model", obj["model"])]
    n, seed, n_fit, ref_rec = cal["n"], cal["seed"], cal["n_fit"], cal["reference"]
    sigma_max, sigma_min = float(obj["base_sigmas"][0]), float(spec.process.sigma_min)
    key = (obj["model"], n, seed, ref_rec["solver"], ref_rec["steps"], sigma_max)
    if key not in cache:
        noise = prior_noise((n, *spec.sample_shape), sigma_max, spec.process, seed=seed,
                            device=spec.device or "cpu")
        ref = reference_solve(spec.denoiser, noise, sigma_max, sigma_min, solver=ref_rec["solver"],
                              steps=ref_rec["steps"], keep=1)
        cache[key] = (noise, ref.final)
    noise, final = cache[key]
    opts = (obj.get("key") or {}).get("solver_options") or {}
    plans = {k: SamplingPlan(obj["solver"], torch.tensor(v["sigmas"], dtype=torch.float64), "fitted",
                             list(v["gammas"]), obj["coords"], opts) for k, v in cal["candidates"].items()}
    scores = score_candidates(spec.denoiser, plans, noise[n_fit:], final[n_fit:], sigma_min=sigma_min,
                              residual_tolerance=cal["residual_tolerance"], significance=cal["significance"])
    for k, v in scores.items():
        was = cal["candidates"][k]["val_rms"]
        if (was is None) != (v["val_rms"] is None) or (was is not None and abs(v["val_rms"] / was - 1) > tolerance):
            raise ValueError(f"candidate {k!r} is not reproduced: validation distance {v['val_rms']} "
                             f"against the recorded {was}")
    out = json.loads(json.dumps(obj))
    out["calibration"]["candidates"] = scores
    out["calibration"].update(rescored=True, significance_test=SIGNIFICANCE_TEST)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="a folder of trajectory calibration files (*.json)")
    p.add_argument("--guards", default=",".join(("residual", *DEFAULT_GUARDS)),
                   help="the guards to choose under, comma-separated (default: every model's, "
                        "steindiff.calibration.default_guards)")
    p.add_argument("--rescore", action="store_true",
                   help="re-score the candidates with the current checks first (loads the model; module docstring)")
    p.add_argument("--dry-run", action="store_true", help="report the changes, write nothing")
    p.add_argument("--json", action="store_true", help="print the changes as JSON")
    args = p.parse_args(argv)
    guards = tuple(g for g in args.guards.split(",") if g)
    files = sorted(Path(args.folder).glob("*.json"))
    if not files:
        print(f"error: no calibration files (*.json) in {args.folder!r}", file=sys.stderr)
        return 2
    changes, updates, cache = [], [], {}
    for f in files:
        obj = json.loads(f.read_text())
        if obj.get("objective") != "trajectory":
            continue
        try:
            if args.rescore:
                obj = rescore(obj, cache)
            new_obj, old, new = reselect(obj, guards)
        except (KeyError, ValueError) as e:
            print(f"error: {f}: {e}", file=sys.stderr)
            return 2
        updates.append((f, new_obj))
        if old != new:
            changes.append({"file": f.name, "from": old, "to": new,
                            "val_ratio": new_obj["calibration"]["val_ratio"]})
    if not args.dry_run:
        for f, new_obj in updates:  # every file checked before any is written
            save_json(f, new_obj)
            load_gamma_schedule(f)
    if args.json:
        print(json.dumps({"guards": list(guards), "files": len(updates), "changed": changes}, indent=1))
    else:
        for c in changes:
            print(f"{c['file']}: {c['from']} -> {c['to']} (validation distance {c['val_ratio']:.2f}x plain)")
        print(f"{len(changes)} of {len(updates)} calibrations re-chosen under guards {', '.join(guards)}"
              + (" (dry run)" if args.dry_run else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
