"""Benchmark reports: a compact Markdown table per model and PNG plots (written atomically).

Input: a ``steindiff.bench/1`` object and its :func:`~steindiff.bench.runner.summarize` output.
Each model's tables and plots lead with its primary metric (``summary["primary"]``: ``sw2`` for
mixtures, ``digits_fid`` for image models, ``patch_fd`` for photo patches).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ..io import atomic_path
from ..plotting import colormap, figure, panels, save_figure
from .runner import IMAGE_METRICS, METRICS, label_of

__all__ = ["markdown", "write_markdown", "write_plots", "label_of"]

MARK = {"helps": "+", "hurts": "−", "tie": "=", "failed": "✗", "n/a": "?"}
NAMES = {"sw2": "excess sliced-W2", "mode_tv": "excess mode TV", "nll": "|NLL − NLL of true data| per dim",
         "traj_err": "trajectory error (RMS per dim vs 1000-step reference)", "mmd": "excess MMD",
         "digits_fid": "excess digits-FID", "digits_kid": "excess digits-KID", "class_tv": "excess class TV",
         "precision": "precision deficit (floor − precision)", "recall": "recall deficit (floor − recall)",
         "memorization": "excess memorization rate", "patch_fd": "excess patch-FD",
         "spectrum": "excess spectrum distance (RMS log10 power error over 8 frequency bands)",
         "pixel_sw2": "excess pixel sliced-W2"}
#: Metric tables of the Markdown report and plots, per primary metric.
TABLES = {"sw2": ("sw2", "nll", "mode_tv"),
          "digits_fid": ("digits_fid", "digits_kid", "class_tv", "precision", "recall", "traj_err"),
          "patch_fd": ("patch_fd", "spectrum", "pixel_sw2", "traj_err")}
PLOTS = {"sw2": ("sw2", "nll"), "digits_fid": ("digits_fid", "traj_err"), "patch_fd": ("patch_fd", "spectrum")}


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None or not math.isfinite(x):
        return "–"
    if x != 0 and (abs(x) >= 1e4 or abs(x) < 1e-3):
        return f"{x:.{digits - 1}e}"
    return f"{x:.{digits}g}"


def _labels(cells: Sequence[dict]) -> list[str]:
    order = {"none": 0, "stein": 1, "stein-exact": 2, "stein-sc": 3, "stein-oracle": 4}
    return sorted({label_of(c) for c in cells}, key=lambda s: (order.get(s.split("/")[0], 9), s))


def _models(result: dict, summary: dict) -> Iterator[tuple[str, list[dict], list[str], str, dict[str, str]]]:
    """Per model of the summary: its cells, their stabilizer labels, its primary metric and the metric names
    (:data:`NAMES`, with the reference steps of image models in the trajectory-error name)."""
    steps = result.get("config", {}).get("reference", {}).get("image_model_steps")
    for model in sorted({c["model"] for c in summary["cells"]}):
        mc = [c for c in summary["cells"] if c["model"] == model]
        p = summary.get("primary", {}).get(model, "sw2")
        names = NAMES
        if p != "sw2" and steps is not None:
            names = {**NAMES, "traj_err": f"trajectory error (RMS per dim vs {steps}-step reference)"}
        yield model, mc, _labels(mc), p, names


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{x:.0f}"


def _pm(e: dict) -> str:
    """``mean±std`` of an excess metric over seeds."""
    return f"{_fmt(e['mean'])}±{_fmt(e['std'], 2)}"


def _tally(d: dict) -> str:
    """Verdict counts ``helps/ties/hurts/failed (room N`` (the caller closes the parenthesis)."""
    return f"{d['helps']}/{d['tie']}/{d['hurts']}/{d['failed']} (room {d['room']}"


def _with_probes(e: dict) -> str:
    return e["stabilizer"] + (f" P={e['probes']}" if e["probes"] else "")


def _cell_text(c: dict | None, metric: str) -> str:
    if c is None:
        return ""
    e = c["excess"].get(metric)
    if e is None:
        return "✗ failed" if c["n_failed"] else "–"
    txt = _pm(e)
    v = c.get("verdicts", {}).get(metric)
    if v is not None:
        mark = MARK[v["verdict"]] if v["room"] else ("°!" if v["worse_at_floor"] else "°")
        txt += f" {mark}"
    return txt


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def markdown(result: dict, summary: dict, *, metrics: Sequence[str] | None = None, title: str | None = None,
             command: str | None = None) -> str:
    """The report as Markdown: per model, verdict counts, best vanilla per NFE, per-cell tables of the
    excess ``metrics`` (mean ± seed std, verdict mark; default :data:`TABLES` of the model's primary
    metric), gamma statistics, cost ratios and failures."""
    cfg, mach = result.get("config", {}), result.get("machine", {})
    lines = [f"# {title or 'SteinDiff benchmark'}", ""]
    if command:
        lines += ["Regenerate with:", "", "```", command, "```", ""]
    if cfg and result.get("rows"):
        ref = cfg.get("reference", {})
        img = ref.get("image_model_steps")
        kinds = set(summary.get("primary", {}).values())
        steps = (f"{img}" if "sw2" not in kinds
                 else f"{ref.get('steps')} ({img} for image models)") if img is not None else f"{ref.get('steps')}"
        lines.append(f"Schema `{result.get('schema')}`; N = {cfg.get('n')} samples per configuration, seeds "
                     f"{cfg.get('seeds')}, {cfg.get('probes')} Hutchinson probes for `stein`, "
                     f"{mach.get('dtype', 'float64')} states, "
                     f"trajectory reference: {ref.get('solver')} with {steps} Karras steps from the same noise.")
        if kinds - {"sw2"}:
            lines.append("Image metrics (`steindiff.metrics.image`, `steindiff.metrics.patches`, samples clamped to "
                         "[-1, 1]) against the held-out images; each excess is over the same metric of as many real "
                         "training images (precision and recall: floor minus value). digits-FID/KID and patch-FD use "
                         "the project's own small classifiers and are comparable only with each other.")
    if result.get("cost"):
        lines.append(f"Cost measurement: N = {cfg.get('n')} samples, {cfg.get('repeats')} interleaved repeats after "
                     "one untimed warm-up round, float64 states; ratios are medians measured side by side in one "
                     "process.")
    if mach:
        lines.append(f"Machine: {mach.get('platform')}, {mach.get('cpu_count')} CPUs, {mach.get('torch_threads')} "
                     f"torch threads, torch {mach.get('torch')}; run took {_fmt(mach.get('wall_s_total'))} s.")
    if result.get("rows"):
        lines += ["",
                  "Marks (protocol's comparison rules, against vanilla at the same solver, schedule, NFE and noise): "
                  "`+` helps (lower by more than the seed spread), `−` hurts (higher by more than 2% of vanilla plus "
                  "the spread), `=` tie, `°` vanilla already at the floor (a tie, no room; `°!` the stabilizer is past "
                  "the hurt threshold there), `✗` failed. Values: mean ± standard deviation over seeds. The spread "
                  "of a comparison is vanilla's seed standard deviation in the cell."]
    lines.append("")
    for model, mc, labels, p, names in _models(result, summary):
        lines += [f"## {model}", ""]
        counts = summary["counts"].get(model, {})
        if counts:
            order = METRICS + IMAGE_METRICS if p == "sw2" else TABLES[p] + ("memorization",)
            mnames = [m for m in order if any(m in d for d in counts.values())]
            lines += ["### Verdicts against vanilla (helps / ties / hurts / failed; cells with room; % helped of "
                      "those)", ""]
            rows = [[lab] + ["" if (d := counts[lab].get(m)) is None else f"{_tally(d)}, {_pct(d['helps_pct'])}%)"
                             for m in mnames] for lab in labels if lab in counts]
            lines += _table(["stabilizer"] + [names[m].split(" (")[0] for m in mnames], rows) + [""]
        for cs in (c for c in summary.get("calibration", []) if c["model"] == model):
            lines += _calibration_markdown(cs)
        for ps in (c for c in summary.get("peers", []) if c["model"] == model):
            lines += _peer_markdown(ps)
        best = [b for b in summary["best_vanilla"] if b["model"] == model]
        if best:
            lines += ["### Best vanilla configuration per NFE (all solvers and schedules)", ""]
            rows = [[str(b["nfe_budget"]), b["solver"], b["schedule"], str(b["nfe"]), _pm(b[f"excess_{p}"])]
                    for b in best]
            lines += _table(["NFE budget", "solver", "schedule", "NFE", f"excess {p}"], rows) + [""]
            vsb = {}
            for c in mc:
                if "vs_best_vanilla" in c:
                    d = vsb.setdefault(label_of(c), {"helps": 0, "tie": 0, "hurts": 0, "failed": 0, "room": 0})
                    d[c["vs_best_vanilla"]["verdict"]] = d.get(c["vs_best_vanilla"]["verdict"], 0) + 1
                    d["room"] += int(c["vs_best_vanilla"]["room"])
            if vsb:
                lines += [f"Excess {p} against the best vanilla configuration with no more NFE "
                          "(helps / ties / hurts / failed, cells with room):", ""]
                lines += _table(["stabilizer", "vs best vanilla"], [[k, _tally(d) + ")"] for k, d in vsb.items()])
                lines.append("")
        by = {(c["solver"], c["schedule"], c["nfe_budget"], label_of(c)): c for c in mc}
        keys = sorted({(c["solver"], c["schedule"], c["nfe_budget"]) for c in mc},
                      key=lambda k: (_order(result, "solvers", k[0]), _order(result, "schedules", k[1]), k[2]))
        for m in (TABLES.get(p, (p,)) if metrics is None else metrics):
            if not any(m in c["excess"] for c in mc):
                continue
            lines += [f"### {names[m]}", ""]
            rows = []
            for k in keys:
                nfe = by.get((*k, "none"), {}).get("nfe")
                rows.append([k[0], k[1], f"{k[2]}" + (f" ({nfe})" if nfe is not None and nfe != k[2] else "")]
                            + [_cell_text(by.get((*k, lab)), m) for lab in labels])
            lines += _table(["solver", "schedule", "NFE"] + labels, rows) + [""]
        gam = [g for g in summary["gammas"] if g["model"] == model]
        if gam:
            lines += ["### Gamma per step (all steps of all configurations)", ""]
            rows = [[f"{g['stabilizer']}/{g['coords']}", *(_fmt(g[k]) for k in ("median", "p10", "p90", "min", "max")),
                     f"{100 * g['frac_outside_0.5_1.5']:.0f}%"] for g in gam]
            lines += _table(["stabilizer", "median", "p10", "p90", "min", "max", "outside [0.5, 1.5]"], rows) + [""]
        fails: dict[tuple, int] = {}
        for r in result.get("rows", []):
            if r["model"] == model and r["status"] != "ok" and not r.get("reused"):
                k = (f"{r['stabilizer']}/{r['coords']}", re.sub(r"[-0-9.e+]+\b", "#", r["status"])[:120])
                fails[k] = fails.get(k, 0) + 1
        if fails:
            lines += ["### Failures (numbers replaced by #)", ""]
            lines += _table(["stabilizer", "count", "reason"],
                            [[k[0], str(v), k[1].replace("|", "/")] for k, v in sorted(fails.items())]) + [""]
    lines += _cost_markdown(summary.get("cost", {}))
    return "\n".join(lines).rstrip() + "\n"


def _calibration_markdown(cs: dict) -> list[str]:
    """The calibrated sampler's section: its cost, its choices, its distance to the ODE's solution, and the
    best calibrated configuration against the best vanilla one at each NFE."""
    st = cs["standalone_s"] or {}
    chosen = ", ".join(f"{k} {v}" for k, v in sorted(cs["chosen"].items()))
    lines = ["### The calibrated sampler (cal:trajectory)", "",
             f"{cs['cells']} cells calibrated (candidate kept on validation: {chosen}); calibration time per cell on "
             f"its own (fit plus its reference solve): median {_fmt(st.get('median'))} s, max {_fmt(st.get('max'))} s. "
             "Distance to the fine solve on validation noise, calibrated / plain: median "
             f"{_fmt(cs['val_ratio_median'])}; trajectory error on the evaluation seeds, calibrated / plain: median "
             f"{_fmt(cs['traj_err_ratio_median'])}.", ""]
    if cs["best_per_nfe"]:
        rows = [[str(b["nfe_budget"]), f"{b['best_vanilla']['solver']} / {b['best_vanilla']['schedule']}",
                 _fmt(b["best_vanilla"]["excess"]),
                 f"{b['best_calibrated']['solver']} / {b['best_calibrated']['schedule']}",
                 _fmt(b["best_calibrated"]["excess"]), _fmt(b["ratio"])] for b in cs["best_per_nfe"]]
        lines += [f"Best configuration per NFE budget, excess {cs['metric']} (mean over seeds):", ""]
        lines += _table(["NFE", "best vanilla", "excess", "best calibrated", "excess", "ratio"], rows) + [""]
    return lines


def _peer_markdown(ps: dict) -> list[str]:
    """A peer's section: what its fit minimised, its cost, its best configuration per NFE, and the calibrated
    sampler against it cell by cell."""
    fit = ps["fit_s"] or {}
    v = ps["calibrated_vs_peer"]
    lines = [f"### {ps['peer']} (a peer)", "",
             f"{ps['cells']} cells fitted from the calibration noise and its fine solve (fit minimised: "
             f"{ps['distance']}); fit time per cell (without the fine solve): median {_fmt(fit.get('median'))} s, "
             f"max {_fmt(fit.get('max'))} s."]
    if sum(v[k] for k in ("helps", "tie", "hurts", "failed")):
        lines.append(f"cal:trajectory/ve against {ps['peer']} at the same solver, schedule and NFE (excess "
                     f"{ps['metric']}, helps / ties / hurts / failed): {_tally(v)}).")
    lines.append("")
    if ps["best_per_nfe"]:
        lines += _table(["NFE", f"best {ps['peer']}", f"excess {ps['metric']}"],
                        [[str(b["nfe_budget"]), f"{b['solver']} / {b['schedule']}", _fmt(b["excess"])]
                         for b in ps["best_per_nfe"]]) + [""]
    return lines


def _order(result: dict, key: str, value: str) -> int:
    lst = result.get("config", {}).get(key, [])
    return lst.index(value) if value in lst else len(lst)


def _cost_markdown(cost: dict) -> list[str]:
    lines: list[str] = []
    if cost.get("side_by_side"):
        lines += ["## Cost: wall-clock per sample, side by side (medians of interleaved repeats)", ""]
        rows = [[e["model"], e["solver"], str(e["nfe_budget"]), _with_probes(e), str(e["nfe"]), str(e["extra_passes"]),
                 _fmt(e["wall_s_per_sample"]), _fmt(e["ratio"])] for e in cost["side_by_side"]]
        lines += _table(["model", "solver", "NFE budget", "stabilizer", "NFE", "extra passes", "s / sample",
                         "ratio to none"], rows) + [""]
        if cost.get("model"):
            lines += ["Cost model `ratio(P) = a + b·P` fitted to the `stein` ratios (a: fixed overhead of the "
                      "differentiable step, b: one more probe, in units of a vanilla solve):", ""]
            lines += _table(["model", "solver", "NFE budget", "a", "b"],
                            [[m["model"], m["solver"], str(m["nfe_budget"]), _fmt(m["a"]), _fmt(m["b"])]
                             for m in cost["model"]]) + [""]
    if cost.get("grid"):
        lines += ["## Cost within the grid (ratio to the vanilla solve of the same configuration, run just before it; "
                  "single runs, and the stabilizers' timings include the per-step `rho` diagnostic, an exact "
                  "divergence of the mixture's denoiser: the side-by-side `--cost` figures leave it out)", ""]
        rows = [[g["model"], _with_probes(g), _fmt(g["median_ratio"]), f"{_fmt(g['min_ratio'])}–{_fmt(g['max_ratio'])}",
                 str(g["pairs"])] for g in cost["grid"]]
        lines += _table(["model", "stabilizer", "median ratio", "range", "pairs"], rows) + [""]
    return lines


def write_markdown(path: str, result: dict, summary: dict, **kw: Any) -> None:
    """Write :func:`markdown` to ``path`` atomically."""
    text = markdown(result, summary, **kw)
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


# -- plots ----------------------------------------------------------------------------------------
def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", s).strip("-")


def write_plots(result: dict, summary: dict, outdir: str, metrics: Sequence[str] | None = None) -> list[str]:
    """PNG plots into ``outdir`` (created if missing); returns the paths.

    ``{metric}_vs_nfe_{model}_{schedule}.png``: excess metric against NFE budget, one panel per solver,
    one line per stabilizer (error bars: seed std; log y, values <= 0 drawn at the bottom).
    ``gamma_{model}_{schedule}_{coords}.png``: gamma against step for every non-vanilla stabilizer (rows) and solver
    (columns), one line per NFE (mean over seeds).  ``cost_quality_{model}.png``: excess of the primary metric against
    wall-clock seconds per sample.  ``metrics``: default :data:`PLOTS` of the model's primary metric.
    """
    from matplotlib.ticker import MaxNLocator

    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[str] = []
    solvers_cfg = result.get("config", {}).get("solvers", [])
    for model, mc, labels, p, names in _models(result, summary):
        colors = {lab: colormap("tab10")(i % 10) for i, lab in enumerate(labels)}
        solvers = sorted({c["solver"] for c in mc}, key=lambda s: solvers_cfg.index(s) if s in solvers_cfg else 99)
        for schedule in sorted({c["schedule"] for c in mc}):
            for metric in (PLOTS.get(p, (p,)) if metrics is None else metrics):
                sc = [c for c in mc if c["schedule"] == schedule and metric in c["excess"]]
                if not sc:
                    continue
                lo = _floor_value(sc, metric)
                fig, axes = panels(len(solvers))
                nfe_ticks = sorted({c["nfe_budget"] for c in sc})
                for ax, solver in zip(axes, solvers):
                    for lab in labels:
                        pts = sorted((c["nfe_budget"], c["excess"][metric]) for c in sc
                                     if c["solver"] == solver and label_of(c) == lab)
                        if not pts:
                            continue
                        x = [p[0] for p in pts]
                        y = np.maximum([p[1]["mean"] for p in pts], lo)
                        e = np.asarray([p[1]["std"] for p in pts])
                        ls = "--" if lab.endswith("/vp") else "-"
                        ax.errorbar(x, y, yerr=[np.minimum(e, y - lo), e], label=lab, color=colors[lab], ls=ls,
                                    marker="o", ms=3, lw=2.2 if lab == "none" else 1.2, capsize=2)
                    ax.set(yscale="log", ylim=(lo * 0.8, None), xlabel="NFE", xticks=nfe_ticks)  # the grid's NFEs
                    ax.set_title(f"{solver} / {schedule}", fontsize=10)
                    ax.grid(alpha=0.3)
                axes[0].set_ylabel(names[metric].split(" (")[0])
                axes[0].legend(fontsize=7)
                fig.suptitle(f"{model}: {names[metric]} vs NFE (mean ± seed std; values <= 0 drawn at the bottom)",
                             fontsize=11)
                fig.tight_layout()
                paths.append(save_figure(fig, out / f"{metric}_vs_nfe_{_slug(model)}_{schedule}.png", dpi=80))
            for coords in sorted({c["coords"] for c in mc if c["coords"] != "-"}):
                stabs = [lab for lab in labels if lab.endswith(f"/{coords}")]
                gc = [c for c in mc if c["schedule"] == schedule and label_of(c) in stabs and "gamma_mean" in c]
                if not gc:
                    continue
                nfes = sorted({c["nfe_budget"] for c in gc})
                gamma = {(c["solver"], label_of(c), c["nfe_budget"]): c["gamma_mean"] for c in gc}
                cmap = colormap("viridis")(np.linspace(0, 0.9, len(nfes)))
                fig, axes = figure(len(stabs), len(solvers), figsize=(3.4 * len(solvers), 2.8 * len(stabs)),
                                   squeeze=False)
                for i, lab in enumerate(stabs):
                    for j, solver in enumerate(solvers):
                        ax = axes[i][j]
                        ax.axhspan(0.5, 1.5, color="0.9")
                        ax.axhline(1.0, color="0.5", lw=0.8)
                        for k, nfe in enumerate(nfes):
                            g = gamma.get((solver, lab, nfe))
                            if g is not None:
                                ax.plot(range(len(g)), g, marker="o", ms=2.5, lw=1, color=cmap[k], label=f"NFE {nfe}")
                        ax.set_yscale("symlog", linthresh=1.0)
                        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
                        ax.set_title(f"{lab} · {solver}", fontsize=9)
                        if i == len(stabs) - 1:
                            ax.set_xlabel("step")
                        if j == 0:
                            ax.set_ylabel("gamma")
                axes[0][0].legend(fontsize=6)
                fig.suptitle(f"{model}, {schedule}, {coords}: gamma per step (seed mean; band [0.5, 1.5])", fontsize=11)
                fig.tight_layout()
                paths.append(save_figure(fig, out / f"gamma_{_slug(model)}_{schedule}_{coords}.png", dpi=80))
        # equal compute: quality against wall-clock seconds per sample
        qc = [c for c in mc if p in c["excess"] and c["wall_s_per_sample"]]
        if qc:
            fig, ax = figure(figsize=(6.5, 4.5))
            lo = _floor_value(qc, p)
            for lab in labels:
                pts = [(c["wall_s_per_sample"], max(c["excess"][p]["mean"], lo)) for c in qc if label_of(c) == lab]
                if pts:
                    ax.scatter(*zip(*pts), s=10, color=colors[lab], label=lab, alpha=0.7)
            ax.set(xscale="log", yscale="log", ylim=(lo * 0.8, None), xlabel="wall-clock seconds per sample (this run)",
                   ylabel=names[p].split(" (")[0])
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            ax.set_title(f"{model}: quality against compute (every cell)", fontsize=10)
            fig.tight_layout()
            paths.append(save_figure(fig, out / f"cost_quality_{_slug(model)}.png", dpi=80))
    return paths


def _floor_value(cells: Sequence[dict], metric: str) -> float:
    """Bottom of a log axis: a tenth of the smallest positive mean, at least 1e-5 (values at or below
    the floor are drawn there)."""
    pos = [c["excess"][metric]["mean"] for c in cells if c["excess"][metric]["mean"] > 0]
    return max(1e-5, 0.1 * min(pos)) if pos else 1e-3
