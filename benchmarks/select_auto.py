"""Which stabilizer may be ``--stabilizer auto``?  Applies the evidence rule of
``steindiff.bench.auto`` to saved benchmark results (helps in >= 80% of the cells with room at
NFE <= 8, worse in none, secondary metrics not worse in >= 90%).

    python benchmarks/select_auto.py docs/results/variants-image64.json docs/results/digits.json [--json]

With ``--versus BASE.json`` (one results file each side, the same grid): two candidates that both qualify, head
to head: the protocol's verdict of each stabilizer cell of the results against the same cell of ``BASE``
(``helps``: the results' candidate is better by more than BASE's seed spread; worse where BASE is at its floor
counts as worse), per metric.

    python benchmarks/select_auto.py docs/results/calibrated-image64-gradient.json \
        --versus docs/results/calibrated-image64.json

With ``--fine FINE.json`` (the model's fine solve benchmarked from the same seeds, e.g.
``docs/results/digits-fine.json``), each candidate's cells with room at NFE <= 8 are also split by whether
vanilla is above the fine solve beyond both seed spreads (the rule by which a cell has room for the gap closed:
elsewhere a sampler that follows the model's ODE can at best tie vanilla), and the cells that do not help are
counted by why: vanilla within the fine solve's spread, the calibration kept the plain plan, or neither.  The
evidence rule itself is unchanged.

    python benchmarks/select_auto.py docs/results/calibrated-digits-gradient.json \
        --fine docs/results/digits-fine.json
"""

import argparse
import json
import sys

from steindiff.bench.auto import SECONDARY, evaluate_candidates
from steindiff.bench.runner import above_fine, label_of, summarize, verdict


def head_to_head(result: dict, base: dict) -> list[dict]:
    """Per model and stabilizer label: verdict counts of ``result``'s cells against ``base``'s same cells."""
    here, there = summarize(result), summarize(base)
    cells = {(c["model"], label_of(c), c["solver"], c["schedule"], c["nfe_budget"]): c for c in there["cells"]}
    out: dict[tuple, dict] = {}
    for c in here["cells"]:
        if c["stabilizer"] == "none":
            continue
        other = cells.get((c["model"], label_of(c), c["solver"], c["schedule"], c["nfe_budget"]))
        if other is None:
            continue
        primary = here["primary"][c["model"]]
        row = out.setdefault((c["model"], label_of(c)), {"model": c["model"], "label": label_of(c), "cells": 0,
                                                         "metrics": {}})
        row["cells"] += 1
        for m in (primary, *SECONDARY.get(primary, ())):
            if m in c["excess"] and m in other["excess"]:
                v = verdict(other["excess"][m], c["excess"][m])
                v = "hurts" if v["worse_at_floor"] else v["verdict"]  # worse where the base is at its floor
                tally = row["metrics"].setdefault(m, {"helps": 0, "tie": 0, "hurts": 0, "failed": 0, "n/a": 0})
                tally[v] += 1
    if not out:
        raise ValueError("no stabilizer cell of the results is in the base results (another grid?)")
    return list(out.values())


def fine_room(result: dict, fine: dict, max_nfe: int = 8) -> list[dict]:
    """Per model and stabilizer label of ``result``: its cells with room at NFE <= ``max_nfe`` (the evidence
    rule's), how many of them have vanilla above ``fine``'s fine solve beyond both seed spreads and how many of
    those it helps; and the cells with room it does not help, by why (``within_fine``: vanilla within the fine
    solve's spread; ``kept_plain``: the calibration chose the plain plan on every seed; ``other``)."""
    here, ref = summarize(result), summarize(fine)
    fines = {c["model"]: c for c in ref["cells"]}
    chosen: dict[tuple, set] = {}
    for r in result["rows"]:
        key = (r["model"], label_of(r), r["solver"], r["schedule"], r.get("nfe_budget", r.get("nfe")))
        chosen.setdefault(key, set()).add((r.get("calibration") or {}).get("chosen"))
    vanilla = {(c["model"], c["solver"], c["schedule"], c["nfe_budget"]): c for c in here["cells"]
               if c["stabilizer"] == "none"}
    out: dict[tuple, dict] = {}
    for c in here["cells"]:
        if c["stabilizer"] == "none" or c["nfe_budget"] > max_nfe:
            continue
        if c["model"] not in fines:
            raise ValueError(f"no fine solve of {c['model']} in the --fine results")
        f, v = fines[c["model"]], vanilla.get((c["model"], c["solver"], c["schedule"], c["nfe_budget"]))
        if sorted(f["seeds"]) != sorted(c["seeds"]):
            raise ValueError(f"the fine solve's seeds {f['seeds']} are not the results' {c['seeds']}")
        primary = here["primary"][c["model"]]
        if v is None or primary not in c["excess"]:
            continue
        verd = verdict(v["excess"][primary], c["excess"][primary])
        if not verd["room"]:
            continue
        fv, vv = f["excess"][primary], v["excess"][primary]
        above = above_fine(vv, fv)
        row = out.setdefault((c["model"], label_of(c)), {"model": c["model"], "label": label_of(c), "room": 0,
                                                         "above_fine": 0, "helps_above_fine": 0, "helps": 0,
                                                         "not_helps": {"within_fine": 0, "kept_plain": 0,
                                                                       "other": 0}})
        helps = verd["verdict"] == "helps"
        row["room"] += 1
        row["helps"] += helps
        row["above_fine"] += above
        row["helps_above_fine"] += above and helps
        if not helps:
            kept = chosen.get((c["model"], label_of(c), c["solver"], c["schedule"], c["nfe_budget"])) == {"plain"}
            row["not_helps"]["within_fine" if not above else "kept_plain" if kept else "other"] += 1
    return list(out.values())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", help="steindiff.bench/1 JSON files")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--versus", default=None, metavar="BASE",
                   help="compare the (one) results file's stabilizer cells with BASE's, head to head")
    p.add_argument("--fine", default=None, metavar="FINE",
                   help="the model's fine solve from the same seeds (steindiff.bench/1): also split the cells with "
                        "room by whether vanilla is above it, and count why the others do not help")
    args = p.parse_args()
    try:
        results = [json.load(open(f)) for f in args.results]
        base = json.load(open(args.versus)) if args.versus else None
        if base is not None and len(results) != 1:
            raise ValueError("--versus compares one results file with BASE")
        rows = head_to_head(results[0], base) if base is not None else None
        fine = None
        if args.fine:
            ref = json.load(open(args.fine))
            fine = [r for res in results for r in fine_room(res, ref)]
    except (OSError, ValueError) as e:
        print(f"select_auto: error: {e}", file=sys.stderr)
        return 2
    if rows is not None:
        if args.json:
            print(json.dumps(rows, indent=1))
            return 0
        print(f"Against {args.versus}, cell by cell (better / ties / worse, the protocol's rule with the base's "
              "seed spread):")
        for r in rows:
            print(f"- {r['model']} {r['label']}, {r['cells']} cells: " + "; ".join(
                f"{m} {t['helps']}/{t['tie'] + t['n/a']}/{t['hurts']}" + (f" ({t['failed']} failed)" if t["failed"]
                                                                         else "")
                for m, t in r["metrics"].items()))
        return 0
    rows = evaluate_candidates(results)
    if args.json:
        print(json.dumps(rows if fine is None else {"rule": rows, "fine": fine}, indent=1))
        return 0
    print("| stabilizer | cells | worse than vanilla | helps at NFE <= 8 (cells with room) | "
          "secondary metrics not worse "
          "| qualifies |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        worse = f"{r['worse_cells']}" + (f" (first: {r['first_worse']})" if r["first_worse"] else "")
        print(f"| {r['label']} | {r['cells']} | {worse} | {r['helps_small_nfe']}/{r['room_small_nfe']} "
              f"({r['helps_pct']:.0f}%) | {r['cells'] - r['secondary_worse_cells']}/{r['cells']} "
              f"({r['secondary_ok_pct']:.0f}%) "
              f"| {'yes' if r['qualifies'] else 'no'} |")
    if fine:
        print(f"\nAgainst the fine solve ({args.fine}), the cells with room at NFE <= 8:\n")
        print("| model | stabilizer | cells with room | helps | vanilla above the fine solve | helps there | "
              "no help: vanilla within the fine solve's spread / kept the plain plan / other |")
        print("|---|---|---|---|---|---|---|")
        for r in fine:
            n = r["not_helps"]
            share = f" ({100 * r['helps_above_fine'] / r['above_fine']:.0f}%)" if r["above_fine"] else ""
            print(f"| {r['model']} | {r['label']} | {r['room']} | {r['helps']} | {r['above_fine']} | "
                  f"{r['helps_above_fine']}{share} | {n['within_fine']} / {n['kept_plain']} / {n['other']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
