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
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from steindiff.io import save_json
from steindiff.stabilizers.schedule import load_gamma_schedule
from steindiff.trajectory import DEFAULT_GUARDS, choose_candidate


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="a folder of trajectory calibration files (*.json)")
    p.add_argument("--guards", default=",".join(DEFAULT_GUARDS),
                   help="the guards to choose under, comma-separated (default: an image model's, "
                        "steindiff.calibrate.default_guards)")
    p.add_argument("--dry-run", action="store_true", help="report the changes, write nothing")
    p.add_argument("--json", action="store_true", help="print the changes as JSON")
    args = p.parse_args(argv)
    guards = tuple(g for g in args.guards.split(",") if g)
    files = sorted(Path(args.folder).glob("*.json"))
    if not files:
        print(f"error: no calibration files (*.json) in {args.folder!r}", file=sys.stderr)
        return 2
    changes, updates = [], []
    for f in files:
        obj = json.loads(f.read_text())
        if obj.get("objective") != "trajectory":
            continue
        try:
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
