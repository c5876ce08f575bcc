"""diffusers' flow-matching schedulers beside steindiff's plain and calibrated solvers, on an exact mixture seen as
a flow-matching model (``gmm:<preset>-flow``), from the same noise.

    python benchmarks/flow_peers.py --bench docs/results/calibrated-image64-flow.json \\
        --json-out docs/results/peers-image64-flow.json --markdown docs/results/peers-image64-flow.md

``--bench`` is a ``steindiff bench`` result on a ``gmm:<preset>-flow`` model (its plain and ``cal:trajectory`` rows,
benchmarks/run_results.sh ``calibrated-image64-flow``), or several, comma-separated, on its variant whose ``flow``
schedule is UniPC's grid (``-flow-unipc``: the same model and noise): this script runs
diffusers' schedulers on the same model, seeds, sample count, NFE budgets, initial noise, reference solve and
metrics, and compares per NFE the best configuration of each group (diffusers, steindiff plain, steindiff
calibrated) by mean excess sliced W2.

The model: the mixture's exact velocity ``v(x_t, 1000 t)`` (:meth:`steindiff.models.GaussianMixture.velocity_net`),
the network behind the bench's ``FlowDenoiser``; diffusers' loops call it as a flow pipeline calls its transformer
(``timestep = 1000 t``; DPM-Solver and UniPC pass integer timesteps, as they do).  The noise: the bench's VE state
at ``t_max = 1 - 1e-6`` is ``eps (1 + sigma_max)``; diffusers gets ``eps`` as its latents (``x_t`` at its first
level: ``t = 1`` for the flow-matching Euler and Heun schedulers).  The peers: ``FlowMatchEulerDiscreteScheduler``
(shift 1, 2, 3; default, Karras, exponential and beta spacings of its flow times), ``FlowMatchHeunDiscreteScheduler``
(shift 1, 2, 3; ``(NFE + 1) / 2`` steps: ``2 steps - 1`` passes), ``DPMSolverMultistepScheduler`` and
``UniPCMultistepScheduler`` with ``use_flow_sigmas=True`` (``flow_shift`` 1, 2, 3; orders 2 and 3), otherwise
diffusers' defaults.  Model passes are counted.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from steindiff.bench.runner import _floors, _noise, _reference, above_fine, excess, machine_info, verdict
from steindiff.io import save_json, save_text
from steindiff.metrics import mixture_metrics
from steindiff.models.registry import FLOW_GRID_SUFFIXES, FLOW_SUFFIX, load_model

SHIFTS = (1.0, 2.0, 3.0)
METRICS = ("sw2", "nll", "mode_tv", "mmd", "traj_err")
CALIBRATED = "cal:trajectory"
GROUPS = ("diffusers", "steindiff", "calibrated")


@dataclass(frozen=True)
class Peer:
    """One diffusers configuration: its class, config, and passes per step."""

    cls: str
    label: str
    config: dict = field(default_factory=dict)
    heun: bool = False

    def steps(self, nfe: int) -> int:
        return (nfe + 1) // 2 if self.heun else nfe


def peers() -> list[Peer]:
    flow = {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}
    out = []
    for s in SHIFTS:
        out.append(Peer("FlowMatchEulerDiscreteScheduler", f"FlowMatchEuler shift {s:g}", {"shift": s}))
        for sp in ("karras", "exponential", "beta"):
            out.append(Peer("FlowMatchEulerDiscreteScheduler", f"FlowMatchEuler shift {s:g} {sp}",
                            {"shift": s, f"use_{sp}_sigmas": True}))
        out.append(Peer("FlowMatchHeunDiscreteScheduler", f"FlowMatchHeun shift {s:g}", {"shift": s}, heun=True))
        for order in (2, 3):
            out.append(Peer("DPMSolverMultistepScheduler", f"DPMSolver++ {order}M flow shift {s:g}",
                            {**flow, "flow_shift": s, "solver_order": order}))
            out.append(Peer("UniPCMultistepScheduler", f"UniPC order {order} flow shift {s:g}",
                            {**flow, "flow_shift": s, "solver_order": order}))
    return out


class CountingNet:
    def __init__(self, net):
        self.net, self.calls = net, 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.net(x, torch.as_tensor(t, dtype=torch.float64).expand(x.shape[0]))


def run_diffusers(peer: Peer, gmm, eps: torch.Tensor, nfe: int) -> dict:
    """diffusers' own loop, as a flow pipeline runs it (state ``x_t``, no input scaling)."""
    import diffusers

    sch = getattr(diffusers, peer.cls)(**peer.config)
    sch.set_timesteps(peer.steps(nfe))
    net = CountingNet(gmm.velocity_net(1000.0))
    x = eps.clone()
    t0 = time.perf_counter()
    with torch.no_grad():
        for t in sch.timesteps:
            x = sch.step(net(x, t), t, x).prev_sample
    return {"x": x.to(torch.float64), "nfe": net.calls, "steps": peer.steps(nfe), "wall_s": time.perf_counter() - t0,
            "sigmas": [float(s) for s in sch.sigmas]}


def _base(model: str) -> str | None:
    """The mixture ``gmm:<preset>`` of a flow bed ``gmm:<preset>-flow[-unipc]`` (``None`` for other models)."""
    for suffix in sorted(FLOW_GRID_SUFFIXES, key=len, reverse=True):
        if model.startswith("gmm:") and model.endswith(suffix):
            return model[: -len(suffix)]
    return None


def merge_benches(benches: Sequence[dict]) -> dict:
    """Bench results on flow beds of one mixture (``-flow``, ``-flow-unipc``, ...), run with the same seeds, sample
    count, NFE budgets and reference: their rows together (the same model and noise, other ``flow`` levels)."""
    first = benches[0]["config"]
    models = [m for b in benches for m in b["config"]["models"]]
    bases = {_base(m) for m in models}
    if len(bases) != 1 or None in bases:
        raise ValueError(f"--bench must be steindiff bench results on gmm:<preset>{FLOW_SUFFIX} models of one mixture "
                         f"(or its -flow-unipc variant), got {models}")
    keys = ("n", "seeds", "nfe", "reference")
    for b in benches[1:]:
        if [b["config"][k] for k in keys] != [first[k] for k in keys]:
            raise ValueError("--bench results differ in n, seeds, NFE budgets or reference solve")
    return {"config": {**first, "models": models}, "rows": [r for b in benches for r in b["rows"]]}


def run(bench: dict, peer_list: Sequence[Peer] | None = None, progress: bool = True) -> dict:
    from tqdm.auto import tqdm

    cfg = bench["config"]
    bench = merge_benches([bench])  # checks the models
    spec = load_model(_base(cfg["models"][0]) + FLOW_SUFFIX)
    n, seeds, nfes = int(cfg["n"]), list(cfg["seeds"]), list(cfg["nfe"])
    ref_cfg = cfg["reference"]
    mmd = any("mmd" in r.get("metrics", {}) for r in bench["rows"])
    peer_list = list(peers() if peer_list is None else peer_list)
    machine = machine_info()
    t_start = time.perf_counter()
    rows: list[dict] = []
    bar = tqdm(total=len(seeds) * len(nfes) * len(peer_list), disable=not progress, desc="diffusers", leave=False)
    for seed in seeds:
        noise = _noise(spec, n, seed)
        eps = noise / spec.process.prior_scale(spec.process.sigma_max)
        ref = _reference(spec, noise, ref_cfg["solver"], ref_cfg["steps"])
        floors = _floors(spec, n, seed)
        rmet = mixture_metrics(ref, spec.gmm, seed=seed, ref=ref, mmd=mmd)
        rows.append({"model": spec.name, "seed": seed, "framework": "reference", "label": "reference",
                     "nfe_budget": ref_cfg["steps"], "nfe": ref_cfg["steps"], "metrics": {**rmet, **floors},
                     "status": "ok"})
        for nfe in nfes:
            for p in peer_list:
                row = {"model": spec.name, "seed": seed, "framework": "diffusers", "label": p.label,
                       "scheduler": p.cls, "config": dict(p.config), "nfe_budget": nfe}
                try:
                    out = run_diffusers(p, spec.gmm, eps, nfe)
                    m = mixture_metrics(out["x"], spec.gmm, seed=seed, ref=ref, mmd=mmd)
                    row.update(nfe=out["nfe"], steps=out["steps"], sigmas=out["sigmas"], metrics={**m, **floors},
                               wall_s_per_sample=out["wall_s"] / n, status="ok")
                except Exception as e:  # a configuration that fails is a result
                    row.update(nfe=None, metrics={}, status=f"failed: {type(e).__name__}: {e}")
                rows.append(row)
                bar.update(1)
    bar.close()
    machine["wall_s_total"] = time.perf_counter() - t_start
    import diffusers

    return {"schema": "steindiff.flow-peers/1", "machine": machine,
            "config": {"model": spec.name, "seeds": seeds, "n": n, "nfe": nfes, "reference": ref_cfg,
                       "peers": [{"label": p.label, "scheduler": p.cls, "config": p.config} for p in peer_list],
                       "diffusers_version": diffusers.__version__, "torch_version": torch.__version__},
            "rows": rows}


def _group(row: dict) -> str:
    if row.get("framework") in ("diffusers", "reference"):
        return row["framework"]
    return "calibrated" if row["stabilizer"] == CALIBRATED else "steindiff"


def _label(row: dict) -> str:
    if row.get("framework") in ("diffusers", "reference"):
        return row["label"]
    cal = f" {CALIBRATED}" if row["stabilizer"] == CALIBRATED else ""
    grid = FLOW_GRID_SUFFIXES.get(row["model"][len(_base(row["model"]) or ""):], "euler")
    schedule = row["schedule"] if row["schedule"] != "flow" or grid == "euler" else f"flow ({grid} grid)"
    return f"steindiff {row['solver']} {schedule}{cal}"


def summarize(peers_result: dict, bench: dict) -> dict:
    """Per (group, configuration, NFE budget): mean and seed std of every excess metric and the per-seed excess
    sw2; per NFE the best configuration of each group by mean excess sw2, and the protocol's verdict of the best
    calibrated (and best plain) against the best diffusers configuration on every metric."""
    bench_rows = [r for r in bench["rows"]
                  if r["stabilizer"] in ("none", CALIBRATED) and r.get("coords") in ("-", "ve")]
    cells: dict[tuple[str, str, int], dict] = {}
    for r in [*peers_result["rows"], *bench_rows]:
        c = cells.setdefault((_group(r), _label(r), r["nfe_budget"]), {"values": {}, "failed": 0, "seed_sw2": {}})
        if r.get("status") != "ok":
            c["failed"] += 1
            continue
        for m in METRICS:
            v = excess(r["metrics"], m)
            if v is not None:
                c["values"].setdefault(m, []).append(v)
        c["seed_sw2"][r["seed"]] = excess(r["metrics"], "sw2")
    stats = {k: {"failed": c["failed"], "seed_sw2": c["seed_sw2"],
                 "excess": {m: {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0}
                            for m, v in c["values"].items()}} for k, c in cells.items()}
    best: dict[int, dict] = {}
    for nfe in sorted(peers_result["config"]["nfe"]):
        for g in GROUPS:
            cand = [(s["excess"]["sw2"]["mean"], lab) for (gg, lab, k), s in stats.items()
                    if gg == g and k == nfe and not s["failed"] and "sw2" in s["excess"]]
            if cand:
                mean, lab = min(cand)
                best.setdefault(nfe, {})[g] = {"label": lab, **stats[(g, lab, nfe)]}
        b, d = best.get(nfe, {}), best.get(nfe, {}).get("diffusers")
        for g in ("steindiff", "calibrated"):
            if d and g in b:
                b[g]["vs_diffusers"] = {m: verdict(d["excess"].get(m), b[g]["excess"].get(m)) for m in METRICS
                                        if m in d["excess"]}
                seeds = sorted(set(d["seed_sw2"]) & set(b[g]["seed_sw2"]))
                b[g]["below_diffusers"] = [sum(b[g]["seed_sw2"][s] < d["seed_sw2"][s] for s in seeds), len(seeds)]
    ref = [r for r in peers_result["rows"] if r["framework"] == "reference"]
    ref_stats = {m: statistics.fmean(excess(r["metrics"], m) for r in ref) for m in METRICS
                 if all(excess(r["metrics"], m) is not None for r in ref)} if ref else {}
    ref_sw2 = [excess(r["metrics"], "sw2") for r in ref]
    if len(ref_sw2) > 1 and None not in ref_sw2:
        # room below diffusers' best: more than both seed spreads above the fine solve (the calibrated
        # sampler's gap-closed rule: a cell has no room where the baseline is within the fine solve's spread)
        fine = {"mean": statistics.fmean(ref_sw2), "std": statistics.stdev(ref_sw2)}
        ref_stats["sw2_std"] = fine["std"]
        for b in best.values():
            d = b.get("diffusers")
            if d:
                e = d["excess"]["sw2"]
                d["room_vs_fine"] = above_fine(e, fine)
    return {"cells": stats, "best": best, "reference": ref_stats}


def _fmt(s: dict | None, digits: int = 4) -> str:
    return "-" if not s else f"{s['mean']:.{digits}g} ± {s['std']:.2g}"


def markdown(peers_result: dict, bench: dict, command: str) -> str:
    cfg, mach = peers_result["config"], peers_result["machine"]
    summ = summarize(peers_result, bench)
    nfes = sorted(cfg["nfe"])
    lines = [
        f"# diffusers' flow-matching schedulers and steindiff on `{cfg['model']}`",
        "",
        f"Regenerate: `{command}` (after the steindiff grid it reads, `benchmarks/run_results.sh "
        "calibrated-image64-flow`).",
        "",
        f"{len(peers_result['rows'])} diffusers runs (and reference solves); seeds "
        f"{', '.join(map(str, cfg['seeds']))}, "
        f"N = {cfg['n']} samples each; wall time {mach['wall_s_total']:.0f} s on {mach.get('cpu_count', '?')} CPU "
        f"cores (torch threads: {mach.get('torch_threads', '?')}); diffusers {cfg['diffusers_version']}, torch "
        f"{cfg['torch_version']}.",
        "",
        "## Setup",
        "",
        "- **Model.** The exact mixture as a flow-matching model: its velocity `v(x_t, 1000 t) = E[eps - x0 | x_t]` "
        "for `x_t = (1 - t) x0 + t eps`. steindiff samples it through `FlowDenoiser` on a `FlowProcess` from `t_max = "
        "1 - 1e-6` (its stand-in for t = 1); diffusers' loops call the same velocity function as a flow pipeline "
        "calls its transformer (DPM-Solver and UniPC pass integer timesteps `floor(1000 t)`, as they do).",
        "- **Noise.** Per seed, every configuration starts from the same standard normal draws `eps`, the steindiff "
        "grid's: diffusers' latents are `eps` (`x_t` at its first level, `t = 1` for the flow-matching Euler and Heun "
        "schedulers), steindiff's VE state is `eps (1 + sigma_max)` at `sigma_max = 1e6 - 1`.",
        "- **diffusers.** `FlowMatchEulerDiscreteScheduler` (shift 1, 2, 3; default, Karras, exponential and beta "
        "spacings), `FlowMatchHeunDiscreteScheduler` (shift 1, 2, 3; `(NFE + 1) / 2` steps), "
        "`DPMSolverMultistepScheduler` and `UniPCMultistepScheduler` with `use_flow_sigmas=True`, "
        "`prediction_type='flow_prediction'` (`flow_shift` 1, 2, 3; orders 2 and 3); otherwise their defaults.",
        "- **steindiff.** The grids' plain solvers on their `karras`, `logsnr` and `flow` noise levels (`flow`: "
        "FlowMatchEuler's uniform times, shift 1; `flow (unipc grid)`: UniPC's flow sigmas, shift 1, on the "
        "`-flow-unipc` variant of the same model), and their calibrated sampler (`cal:trajectory`), from the bench "
        f"results (`--bench`: {', '.join(bench['config']['models'])}).",
        f"- **Metrics.** As the grid's: excess over the floors of an independent true sample set; `traj_err` against "
        f"a `{cfg['reference']['solver']}` solve of {cfg['reference']['steps']} Karras steps from the same noise. "
        "Mean ± seed std.",
        "",
    ]
    if summ["reference"]:
        r = summ["reference"]
        spread = f" ± {r['sw2_std']:.4f} over seeds" if "sw2_std" in r else ""
        lines += [f"The reference solve itself (the fine solve's floor): excess sw2 {r['sw2']:.4f}{spread}, excess NLL "
                  f"{r['nll']:.3f}, excess mode TV {r['mode_tv']:.3f}.", ""]
    lines += [
        "## Best per NFE (excess sliced W2)",
        "",
        "Verdicts of the best steindiff configuration against the best diffusers one at the same NFE budget, with the "
        "protocol's rule (`+` lower by more than the diffusers configuration's seed spread, `−` higher by more than "
        "2% plus that spread, `=` tie, `°` diffusers already at the floor): on sw2, then NLL, mode TV, MMD. "
        "`room below diffusers`: whether the best diffusers configuration is above the fine solve by more than "
        "both seed spreads; where it is not, even the fine solve would tie with it.",
        "",
        "| NFE | best diffusers | excess sw2 | room below diffusers | best steindiff plain | excess sw2 | vs diffusers "
        "| best steindiff calibrated | excess sw2 | vs diffusers (sw2, nll, mode, mmd) | calibrated below diffusers "
        "(seeds) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    mark = {"helps": "+", "hurts": "−", "tie": "=", "failed": "✗", "n/a": "?"}

    def marks(v: dict | None, metrics: Sequence[str]) -> str:
        if not v:
            return "-"
        return " ".join(("°" if not v[m]["room"] and v[m]["verdict"] == "tie" else mark[v[m]["verdict"]])
                        for m in metrics if m in v)

    counts = {"helps": 0, "tie": 0, "hurts": 0, "room": 0, "room_vs_fine": 0, "helps_vs_fine": 0}
    all4 = ["sw2", "nll", "mode_tv", "mmd"]
    for nfe in nfes:
        b = summ["best"].get(nfe, {})
        d, s, c = b.get("diffusers"), b.get("steindiff"), b.get("calibrated")
        room = "-" if not d or "room_vs_fine" not in d else ("yes" if d["room_vs_fine"] else "no")
        cols = [f"{d['label']} | {_fmt(d['excess']['sw2'])} | {room}" if d else "- | - | -",
                f"{s['label']} | {_fmt(s['excess']['sw2'])} | {marks(s.get('vs_diffusers'), ['sw2'])}" if s
                else "- | - | -",
                f"{c['label']} | {_fmt(c['excess']['sw2'])} | {marks(c.get('vs_diffusers'), all4)}" if c
                else "- | - | -",
                f"{c['below_diffusers'][0]} of {c['below_diffusers'][1]}" if c and "below_diffusers" in c else "-"]
        lines.append(f"| {nfe} | " + " | ".join(cols) + " |")
        if c and "vs_diffusers" in c:
            v = c["vs_diffusers"]["sw2"]
            counts[v["verdict"] if v["verdict"] in counts else "tie"] += 1
            counts["room"] += int(v["room"])
            if d.get("room_vs_fine"):
                counts["room_vs_fine"] += 1
                counts["helps_vs_fine"] += v["verdict"] == "helps"
    lines += ["", f"Best calibrated against best diffusers on excess sw2: {counts['helps']} better, {counts['tie']} "
              f"ties, {counts['hurts']} worse, of {len(nfes)} NFE budgets ({counts['room']} with room by the "
              f"protocol's rule; {counts['room_vs_fine']} with room below diffusers' best, better in "
              f"{counts['helps_vs_fine']} of those).", ""]
    for metric, title in (("sw2", "Excess sliced W2"), ("nll", "Excess NLL (|nll - floor|)"),
                          ("mode_tv", "Excess mode TV"), ("traj_err", "Distance to the reference solve (traj_err)")):
        lines += [f"## diffusers: {title}, mean ± seed std", "",
                  "| configuration | " + " | ".join(f"NFE {k}" for k in nfes) + " |", "|---|" + "---|" * len(nfes)]
        for lab in dict.fromkeys(lab for (g, lab, _) in summ["cells"] if g == "diffusers"):
            vals = []
            for k in nfes:
                st = summ["cells"].get(("diffusers", lab, k))
                vals.append("-" if st is None else f"failed ({st['failed']})" if st["failed"]
                            else _fmt(st["excess"].get(metric), 3))
            lines.append(f"| {lab} | " + " | ".join(vals) + " |")
        lines.append("")
    odd = sorted({(r["label"], r["nfe_budget"], r["nfe"]) for r in peers_result["rows"]
                  if r["framework"] == "diffusers" and r["status"] == "ok" and r["nfe"] != r["nfe_budget"]})
    if odd:
        lines += ["Model passes other than the budget (Heun: 2 steps - 1): "
                  + "; ".join(f"{a} at {b}: {c}" for a, b, c in odd), ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench", required=True, metavar="FILE[,FILE]",
                   help="steindiff bench results on gmm:<preset>-flow (and -flow-unipc) models")
    p.add_argument("--json-out", metavar="FILE", help="write the diffusers rows as JSON")
    p.add_argument("--markdown", metavar="FILE", help="write the comparison as Markdown (default: standard output)")
    p.add_argument("--from-json", metavar="FILE", help="do not run: the Markdown of saved diffusers rows")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    try:
        bench = merge_benches([json.loads(Path(f).read_text()) for f in args.bench.split(",") if f])
        if args.from_json:
            result = json.loads(Path(args.from_json).read_text())
        else:
            result = run(bench, progress=not args.no_progress)
            argv_list = list(sys.argv[1:] if argv is None else argv)
            result["config"]["command"] = "python benchmarks/flow_peers.py " + " ".join(map(shlex.quote, argv_list))
    except (OSError, ValueError, KeyError) as e:
        print(f"flow_peers: error: {e}", file=sys.stderr)
        return 2
    if args.json_out and not args.from_json:
        save_json(args.json_out, result)
    md = markdown(result, bench, result["config"].get("command", ""))
    save_text(args.markdown, md) if args.markdown else print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
