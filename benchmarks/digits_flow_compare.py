"""The rectified-flow digits model beside the EDM one: plain and calibrated solvers per NFE, from their grids.

    python benchmarks/digits_flow_compare.py --edm docs/results/calibrated-digits.json \\
        --edm-fine docs/results/digits-fine.json --flow docs/results/calibrated-digits-flow.json \\
        --flow-fine docs/results/digits-flow-fine.json --json-out docs/results/digits-flow-vs-edm.json \\
        --markdown docs/results/digits-flow-vs-edm.md

Both models are the same U-Net trained on the same digits for the same number of iterations (``steindiff train``,
``--objective edm`` and ``--objective flow``), sampled over the same VE noise range [0.002, 80].  Per model and NFE
budget: the best plain configuration and the best calibrated one (``cal:trajectory``) by mean excess digits-FID over
the seeds, among the solvers and schedules both grids share (the flow model also on its own ``flow`` schedule), with
the other image metrics of those configurations, the fine solve's excess digits-FID (the model's own floor: 100
``dpmpp_3m`` steps) and the gap closed, ``(best plain - best calibrated) / (best plain - fine solve)``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Sequence

from steindiff.bench.runner import excess
from steindiff.io import save_json, save_text

METRICS = ("digits_fid", "digits_kid", "precision", "recall", "class_tv")
CALIBRATED = "cal:trajectory"


def _cells(result: dict) -> dict[tuple, dict]:
    """``(solver, schedule, nfe_budget, stabilizer) -> {metric: [excess per seed]}`` of a bench result."""
    out: dict[tuple, dict] = {}
    for r in result["rows"]:
        if r.get("status") != "ok" or r.get("coords") not in ("-", "ve"):
            continue
        c = out.setdefault((r["solver"], r["schedule"], r["nfe_budget"], r["stabilizer"]), {})
        for m in METRICS:
            v = excess(r["metrics"], m)
            if v is not None:
                c.setdefault(m, []).append(v)
    return out


def _stats(v: list[float]) -> dict:
    return {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0, "n": len(v)}


def _best(cells: dict, stabilizer: str, nfe: int, solvers: set, schedules: set) -> dict | None:
    cand = [(statistics.fmean(c["digits_fid"]), k) for k, c in cells.items()
            if k[3] == stabilizer and k[2] == nfe and k[0] in solvers and k[1] in schedules and "digits_fid" in c]
    if not cand:
        return None
    _, k = min(cand)
    return {"solver": k[0], "schedule": k[1], **{m: _stats(cells[k][m]) for m in METRICS if m in cells[k]}}


def compare(edm: dict, edm_fine: dict, flow: dict, flow_fine: dict) -> dict:
    ce, cf = _cells(edm), _cells(flow)
    solvers = {k[0] for k in ce} & {k[0] for k in cf}
    shared = {k[1] for k in ce} & {k[1] for k in cf}
    nfes = sorted({k[2] for k in ce} & {k[2] for k in cf})
    out = {"solvers": sorted(solvers), "shared_schedules": sorted(shared), "nfe": nfes, "models": {}}
    for name, cells, fine, schedules in (("digits (EDM)", ce, edm_fine, shared),
                                         ("digits-flow", cf, flow_fine, {k[1] for k in cf})):
        fc = _cells(fine)
        floor = {m: _stats(v) for c in fc.values() for m, v in c.items()}
        per = {}
        for nfe in nfes:
            p = _best(cells, "none", nfe, solvers, schedules)
            c = _best(cells, CALIBRATED, nfe, solvers, schedules)
            gap = None
            if p and c and floor.get("digits_fid"):
                room = p["digits_fid"]["mean"] - floor["digits_fid"]["mean"]
                gap = (p["digits_fid"]["mean"] - c["digits_fid"]["mean"]) / room if room > 0 else None
            per[nfe] = {"plain": p, "calibrated": c, "gap_closed": gap}
        out["models"][name] = {"fine": floor, "schedules": sorted(schedules), "by_nfe": per}
    return out


def _f(s: dict | None, m: str, digits: int = 3) -> str:
    if not s or m not in s:
        return "-"
    return f"{s[m]['mean']:.{digits}g} ± {s[m]['std']:.1g}"


def markdown(res: dict, command: str) -> str:
    lines = ["# The rectified-flow digits model beside the EDM one", "",
             f"Regenerate: `{command}` (from the grids of `benchmarks/run_results.sh calibrated-digits`, `digits-fine` "
             "and `digits-flow`).", "",
             "Same U-Net, same data, same training iterations; the flow model trained with `steindiff train "
             "--objective flow` (rectified flow, SD3's logit-normal times). Both sampled over the VE range [0.002, "
             f"80]. Solvers compared: {', '.join(res['solvers'])}; schedules: "
             + "; ".join(f"{k}: {', '.join(v['schedules'])}" for k, v in res["models"].items())
             + ". Excess metrics over real training images (precision and recall: deficits), mean ± seed std; "
               "the calibrated sampler is `cal:trajectory`; gap closed = (best plain - best calibrated) / "
               "(best plain - fine solve), in excess digits-FID.", "",
             "Fine solve (100 `dpmpp_3m` Karras steps), excess digits-FID: "
             + "; ".join(f"{k} {_f(v['fine'], 'digits_fid')}" for k, v in res["models"].items()) + ".", ""]
    for name, v in res["models"].items():
        lines += [f"## {name}", "",
                  "| NFE | best plain | digits-FID | KID | precision def. | recall def. | best calibrated | "
                  "digits-FID | KID | precision def. | recall def. | gap closed |", "|---|" + "---|" * 11]
        for nfe in res["nfe"]:
            b = v["by_nfe"][nfe]
            p, c = b["plain"], b["calibrated"]
            cols = [f"{p['solver']} / {p['schedule']}" if p else "-", *[_f(p, m) for m in METRICS[:4]],
                    f"{c['solver']} / {c['schedule']}" if c else "-", *[_f(c, m) for m in METRICS[:4]],
                    f"{b['gap_closed']:.0%}" if b["gap_closed"] is not None else "-"]
            lines.append(f"| {nfe} | " + " | ".join(cols) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for k in ("edm", "edm-fine", "flow", "flow-fine"):
        p.add_argument(f"--{k}", required=True, metavar="FILE", help="a steindiff bench result (JSON)")
    p.add_argument("--json-out", metavar="FILE")
    p.add_argument("--markdown", metavar="FILE")
    args = p.parse_args(argv)
    try:
        load = [json.loads(Path(f).read_text()) for f in (args.edm, args.edm_fine, args.flow, args.flow_fine)]
    except (OSError, ValueError) as e:
        print(f"digits_flow_compare: error: {e}", file=sys.stderr)
        return 2
    res = compare(*load)
    command = "python benchmarks/digits_flow_compare.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.json_out:
        save_json(args.json_out, res)
    md = markdown(res, command)
    save_text(args.markdown, md) if args.markdown else print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
