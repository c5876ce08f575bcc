"""Which stabilizer may be ``--stabilizer auto``?  Applies the evidence rule of
``steindiff.bench.auto`` to saved benchmark results (helps in >= 80% of the cells with room at
NFE <= 8, worse in none, secondary metrics not worse in >= 90%).

    python benchmarks/select_auto.py docs/results/variants-image64.json docs/results/digits.json [--json]
"""

import argparse
import json
import sys

from steindiff.bench.auto import evaluate_candidates


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", help="steindiff.bench/1 JSON files")
    p.add_argument("--json", action="store_true", help="print JSON")
    args = p.parse_args()
    try:
        results = [json.load(open(f)) for f in args.results]
    except (OSError, ValueError) as e:
        print(f"select_auto: error: {e}", file=sys.stderr)
        return 2
    rows = evaluate_candidates(results)
    if args.json:
        print(json.dumps(rows, indent=1))
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
