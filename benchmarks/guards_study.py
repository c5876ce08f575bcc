"""Which data-free checks catch the calibration candidates that trade a secondary metric for the primary one?

For every cell (model x solver x NFE, Karras steps) this fits the calibrated sampler as a user would
(:func:`steindiff.trajectory.fit_trajectory` on calibration noise, the model passed as an opaque Python
function: no ``gmm:*`` special case), reads every candidate it produced from the record with the outcome of
every check of :data:`steindiff.trajectory.GUARDS` (computed on the validation half of the calibration
batch, against the fine solve's samples, from the model alone), then samples every candidate and the plain
solver from evaluation noise (seeds disjoint from the calibration seed) and scores them with the protocol's
metrics:

- exact mixtures (the study knows the mixture; the calibration does not): sliced-W2 (primary), NLL and
  mode TV (secondary);
- ``digits``: digits-FID (primary), KID, precision, recall (secondary);
- ``patches``: patch-FD (primary), spectrum and pixel sliced-W2 (secondary).

A candidate is *bad* when one of its secondary metrics is worse than the plain solver's beyond the seed
spread (the protocol's "hurts" rule, :func:`steindiff.bench.runner.verdict`, counting a metric made worse
where plain sits at its floor too).  For each check the study counts how many bad candidates it rejects
(the detection rate) and how many good ones it rejects (the false-alarm rate), at its default tolerance and
at others; and for each guard set, which candidate the calibration then keeps (:func:`choose_candidate`)
and how often the kept one is bad (a hidden trade) or better than plain on the primary metric.

    OMP_NUM_THREADS=1 python benchmarks/guards_study.py --models gmm:image64,gmm:image64-sharp,gmm:toy2d \\
        --json-out /tmp/guards-mixtures.json
    OMP_NUM_THREADS=1 python benchmarks/guards_study.py --models digits --json-out /tmp/guards-digits.json
    OMP_NUM_THREADS=1 python benchmarks/guards_study.py --models patches --solvers dpmpp_2m,euler,ipndm \\
        --nfe 4,6 --json-out /tmp/guards-patches.json
    python benchmarks/guards_study.py --from /tmp/guards-mixtures.json,/tmp/guards-digits.json,\\
/tmp/guards-patches.json --json-out docs/results/guards-study.json --markdown docs/results/guards-study.md

CPU scale: small calibration batches and refinement budgets per kind of model (:data:`SETTINGS`).

``--fit-method gradient`` studies the gradient fit instead (:func:`steindiff.gradient_fit.fit_trajectory_gradient`
of ``--fit-params``; one candidate against plain), with the calibration settings ``steindiff bench`` uses
for mixtures and digits (:func:`gradient_settings`), so those cells are the bench's as a user's model would
see them:

    OMP_NUM_THREADS=1 python benchmarks/guards_study.py --models gmm:image64 --fit-method gradient \\
        --solvers euler,heun,dpmpp_2m,dpmpp_3m,unipc,ipndm --nfe 3,4,5,6,8,10 --schedule logsnr \\
        --json-out /tmp/guards-gradient-logsnr.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from steindiff.bench.runner import _floors, excess, machine_info, verdict, worse_than
from steindiff.bench.runner import calibration_options as bench_calibration_options
from steindiff.calibration import CALIBRATION_DEFAULTS, CALIBRATION_SEED
from steindiff.gradient_fit import STARTS, check_params, fit_trajectory_gradient
from steindiff.guards import CHECKS, MARGINS, TOLERANCES, judge
from steindiff.io import atomic_path, save_json
from steindiff.metrics import image_model_metrics, mixture_metrics
from steindiff.metrics.image import digits_features, frechet_distance, kid, precision_recall
from steindiff.models.registry import ModelSpec, load_model
from steindiff.plan import SamplingPlan, make_plan
from steindiff.sampling import prior_noise, sample
from steindiff.schedules import logsnr_sigmas
from steindiff.trajectory import DEFAULT_GUARDS, GUARDS, choose_candidate, fit_trajectory, reference_solve

SCHEMA = "steindiff.guards-study/1"
#: Per kind of model: calibration batch (half validates), fine-solve steps, refinement budget, evaluation
#: samples per seed, state dtype.
SETTINGS = {
    "mixture": {"n_cal": 256, "ref_steps": 200, "max_solves": 120, "max_seconds": 20.0, "n_eval": 1000,
                "dtype": torch.float64},
    "digits": {"n_cal": 256, "ref_steps": 100, "max_solves": 80, "max_seconds": 30.0, "n_eval": 500,
               "dtype": torch.float32},
    "patches": {"n_cal": 64, "ref_steps": 100, "max_solves": 40, "max_seconds": 60.0, "n_eval": 128,
                "dtype": torch.float32},
}
#: Where the gradient fit's calibration departs from the bench's (:func:`gradient_settings`), per kind of model:
#: patches with a smaller calibration batch, 120 s and the fit's default Adam steps, at CPU scale.
GRADIENT_OVERRIDES: dict[str, dict] = {"patches": {"n_cal": 64, "max_seconds": 120.0, "max_iters": 300,
                                                   "batch_size": 64}}
PRIMARY = {"mixture": "sw2", "digits": "digits_fid", "patches": "patch_fd"}
SECONDARY = {"mixture": ("nll", "mode_tv"), "digits": ("digits_kid", "precision", "recall"),
             "patches": ("spectrum", "pixel_sw2")}
#: Tolerances tried for each check besides its default (its unit: guards.TOLERANCES).
SWEEP = {"residual": (0.0, 0.02, 0.05, 0.1, 0.2), "residual_tail": (0.0, 0.02, 0.05, 0.1, 0.2),
         "denoised": (0.0, 0.05, 0.1, 0.2), "modes": (0.0, 0.02, 0.05, 0.1), "spectrum": (0.0, 0.02, 0.05, 0.1),
         "elbo": (0.0, 0.01, 0.02, 0.05, 0.1, 0.2)}
#: Relative margins over plain's deviation tried for the two-sided checks (guards.MARGINS).
MARGIN_CHECKS, MARGIN_SWEEP = ("residual", "elbo"), (0.0, 0.1, 0.2, 0.3, 0.5, 1.0)
#: Guard sets whose choices are compared (distribution and significance are always on).
GUARD_SETS = {"distribution+significance": DEFAULT_GUARDS,
              **{f"+{c}": (c, *DEFAULT_GUARDS) for c in CHECKS},
              "+elbo+spectrum": ("elbo", "spectrum", *DEFAULT_GUARDS),
              "+residual+modes": ("residual", "modes", *DEFAULT_GUARDS),
              "+elbo+modes": ("elbo", "modes", *DEFAULT_GUARDS),
              "+residual+modes+spectrum": ("residual", "modes", "spectrum", *DEFAULT_GUARDS),
              "+residual+spectrum": ("residual", "spectrum", *DEFAULT_GUARDS),
              "+elbo+residual": ("elbo", "residual", *DEFAULT_GUARDS),
              # thresholds of their own (steindiff.trajectory.parse_guard)
              "+residual:margin=0": ("residual:margin=0", *DEFAULT_GUARDS),
              "+residual:margin=0.1": ("residual:margin=0.1", *DEFAULT_GUARDS),
              "+residual+modes:tolerance=0.02": ("residual", "modes:tolerance=0.02", *DEFAULT_GUARDS),
              "+residual:margin=0+modes:tolerance=0.02": ("residual:margin=0", "modes:tolerance=0.02",
                                                          *DEFAULT_GUARDS),
              "+residual:margin=0+modes:tolerance=0": ("residual:margin=0", "modes:tolerance=0", *DEFAULT_GUARDS),
              # the gradient fit's thresholds, waived where the candidate dominates plain after one more denoising
              # pass (its denoised distance at most 1/K of plain's)
              **{f"+residual:margin=0:dominance={k}+modes:tolerance=0.02:dominance={k}":
                 (f"residual:margin=0:dominance={k}", f"modes:tolerance=0.02:dominance={k}", *DEFAULT_GUARDS)
                 for k in (2, 3, 4, 6)},
              # the residual check alone waived so
              **{f"+residual:margin=0:dominance={k}+modes:tolerance=0.02":
                 (f"residual:margin=0:dominance={k}", "modes:tolerance=0.02", *DEFAULT_GUARDS) for k in (2, 3, 4, 6)}}


def gradient_settings(spec: ModelSpec, kind: str) -> dict:
    """The gradient fit's calibration batch, fine-solve steps and time budget: those ``steindiff bench`` uses
    (:func:`steindiff.bench.runner.calibration_options`), unless :data:`GRADIENT_OVERRIDES` says otherwise;
    calibration states in the library's default dtype (:data:`steindiff.calibration.CALIBRATION_DEFAULTS`)."""
    bench = bench_calibration_options(spec, "gradient")
    return {"n_cal": bench["n"], "ref_steps": bench["ref_steps"], "max_seconds": bench["max_seconds"],
            **bench.get("gradient_options", {}), "dtype": getattr(torch, CALIBRATION_DEFAULTS["dtype"]),
            **GRADIENT_OVERRIDES.get(kind, {})}


def kind_of(spec: ModelSpec) -> str:
    if spec.gmm is not None:
        return "mixture"
    return "patches" if spec.info.get("metrics") == "patches" else "digits"


def opaque(den: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """The model as a user's plain function: nothing of the built-in model shows through."""

    def model(x: torch.Tensor, sigma: torch.Tensor, **kw: Any) -> torch.Tensor:
        return den(x, sigma, **kw)

    return model


def _digits_scores(x: torch.Tensor, spec: ModelSpec, seed: int) -> dict[str, float]:
    """The sample side of :func:`steindiff.metrics.image.image_metrics` (its floors do not depend on the samples)."""
    info = spec.info
    if "_held_features" not in info:
        info["_held_features"] = digits_features(info["heldout"].reshape(-1, 1, 8, 8))[0]
    f_h = info["_held_features"]
    f, _ = digits_features(x.clamp(-1, 1))
    p, r = precision_recall(f_h, f, 3)
    return {"digits_fid": frechet_distance(f, f_h), "digits_kid": kid(f, f_h, seed=seed), "precision": p, "recall": r}


def metrics_of(spec: ModelSpec, kind: str, x: torch.Tensor, seed: int, floors: dict) -> dict[str, float]:
    """Excess of every metric the study uses (primary and secondary) for samples ``x`` of evaluation ``seed``
    (``floors``: this seed's floors, filled on first use for image models)."""
    if kind == "mixture":
        m = {**mixture_metrics(x, spec.gmm, seed=seed), **floors}
    elif kind == "digits" and floors:
        m = {**_digits_scores(x, spec, seed), **floors}
    else:
        m = image_model_metrics(x.clamp(-1, 1), spec, seed=seed)
        floors.update({k: v for k, v in m.items() if k.endswith("_floor")})
    return {k: excess(m, k) for k in (PRIMARY[kind], *SECONDARY[kind])}


def evaluate(spec: ModelSpec, kind: str, model: Callable, plan: SamplingPlan, noises: dict[int, torch.Tensor],
             floors: dict[int, dict]) -> dict[str, dict]:
    """Per metric, the excess over the evaluation seeds (``mean``, ``std``, ``per_seed``); ``None`` if a solve fails."""
    per_seed: dict[str, list[float]] = {}
    for seed, noise in noises.items():
        try:
            x = sample(model, noise, plan.sigmas, plan.get_solver(), stabilizer=plan.stabilizer()).x
            m = metrics_of(spec, kind, x, seed, floors[seed])
        except (FloatingPointError, ValueError):
            return {}
        for k, v in m.items():
            per_seed.setdefault(k, []).append(v)
    return {k: {"mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0, "per_seed": v}
            for k, v in per_seed.items()}


def fine_metrics(name: str, seeds: Sequence[int], n_eval: int, steps: int) -> dict[str, dict]:
    """The fine solve's metrics on the evaluation noise: the calibration's reference solve (``steps`` uniform
    log-SNR steps of dpmpp_2m, :func:`steindiff.trajectory.reference_solve`) from each evaluation seed's noise,
    scored as the candidates are (per metric ``mean``, ``std``, ``per_seed``)."""
    spec = load_model(name)
    kind = kind_of(spec)
    model = opaque(spec.denoiser)
    smax, smin = float(spec.process.sigma_max), float(spec.process.sigma_min)
    per_seed: dict[str, list[float]] = {}
    for seed in seeds:
        noise = prior_noise((n_eval, *spec.sample_shape), smax, spec.process, seed=seed, dtype=SETTINGS[kind]["dtype"])
        x = sample(model, noise, logsnr_sigmas(steps, smin, smax), "dpmpp_2m").x
        for k, v in metrics_of(spec, kind, x, seed, _floors(spec, n_eval, seed)).items():
            per_seed.setdefault(k, []).append(v)
    return {k: {"mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0, "per_seed": v}
            for k, v in per_seed.items()}


def as_fine(c: dict, fine: dict | None) -> bool:
    """Is every secondary metric that makes candidate ``c`` bad no worse than the fine solve's (the same hurts
    rule, against the fine solve)?  Then plain's better value there is its own discretisation error.  ``False``
    without the fine solve's metrics."""
    if not fine or not c.get("worse") or "failed" in c["worse"]:
        return False
    return all(not worse_than(fine[m], c["metrics"][m]) for m in c["worse"])


def run_model(name: str, solvers: Sequence[str], nfes: Sequence[int], schedule: str, seeds: Sequence[int],
              progress: bool = True, fit_method: str = "derivative-free",
              fit_params: Sequence[str] = ("steps", "model_sigmas"), budget: dict | None = None) -> list[dict]:
    """``budget``: the gradient fit's ``max_seconds``, ``max_iters`` and ``batch_size`` where they depart from
    :func:`gradient_settings`."""
    spec = load_model(name)
    kind = kind_of(spec)
    st = SETTINGS[kind]
    gradient = fit_method == "gradient"
    cal = {**gradient_settings(spec, kind), **(budget or {})} if gradient else st
    options = {k: cal[k] for k in ("max_iters", "batch_size", "start") if k in cal}
    model = opaque(spec.denoiser)
    dtype, n_cal = st["dtype"], cal["n_cal"]
    smax, smin = float(spec.process.sigma_max), float(spec.process.sigma_min)
    t0 = time.perf_counter()
    cal_noise = prior_noise((n_cal, *spec.sample_shape), smax, spec.process, seed=CALIBRATION_SEED, dtype=cal["dtype"])
    ref = reference_solve(model, cal_noise, smax, smin, steps=cal["ref_steps"], keep=n_cal // 2)
    ref_s = time.perf_counter() - t0
    print(f"{name}: reference solve {ref_s:.0f} s", flush=True)
    noises = {s: prior_noise((st["n_eval"], *spec.sample_shape), smax, spec.process, seed=s, dtype=dtype)
              for s in seeds}
    floors = {s: _floors(spec, st["n_eval"], s) for s in seeds}
    rows = []
    for solver, nfe in itertools.product(solvers, nfes):
        base = make_plan(spec.process, solver, nfe, schedule)
        t1 = time.perf_counter()
        if gradient:
            fit = fit_trajectory_gradient(model, base, cal_noise, sigma_min=smin, ref=ref, guards=GUARDS,
                                          params=fit_params, max_seconds=cal["max_seconds"], **options)
        else:
            fit = fit_trajectory(model, base, cal_noise, sigma_min=smin, ref=ref, guards=GUARDS,
                                 max_solves=st["max_solves"], max_seconds=st["max_seconds"])
        cal_s = time.perf_counter() - t1
        rec = fit.record
        t2 = time.perf_counter()
        cands = {}
        for cname, c in rec["candidates"].items():
            plan = SamplingPlan(solver, torch.tensor(c["sigmas"], dtype=torch.float64), "fitted", c["gammas"],
                                model_sigmas=c.get("model_sigmas"), history=c.get("history"))
            cands[cname] = {k: c.get(k) for k in ("val_rms", "val_sw2", "val_rank_z", "residual_noise", "checks")}
            cands[cname]["passed"] = {g: bool(c[f"passed_{g}_check"]) for g in GUARDS}
            cands[cname]["metrics"] = evaluate(spec, kind, model, plan, noises, floors)
        row = {"model": name, "kind": kind, "solver": solver, "schedule": schedule, "nfe": nfe,
               "fit_method": fit_method, "calibration_s": cal_s, "evaluation_s": time.perf_counter() - t2,
               "candidates": cands, "chosen_by_record": rec["chosen"]}
        if gradient:
            row["fit_params"] = list(fit_params)
            row["adam_steps"] = [t["iters"] for t in rec["gradient"]["tries"]]  # per learning rate
        label(row)
        rows.append(row)
        bad = [k for k, c in cands.items() if c.get("bad")]
        print(f"{name} {solver} {schedule} NFE {nfe}: calibration {cal_s:.0f} s, evaluation {row['evaluation_s']:.0f} "
              f"s; bad candidates: {', '.join(bad) or 'none'}", flush=True)
    for r in rows:
        r["reference_s"] = ref_s
    return rows


def label(row: dict) -> None:
    """Mark each candidate ``bad`` (a secondary metric worse than plain's beyond the spread) and its primary
    verdict against plain (:func:`verdict`)."""
    kind = row["kind"]
    plain = row["candidates"]["plain"]["metrics"]
    for name, c in row["candidates"].items():
        if name == "plain":
            continue
        m = c["metrics"]
        if not m or not plain:
            c.update(bad=bool(plain), worse=["failed"] if plain else [], primary="failed")
            continue
        worse = []
        for k in SECONDARY[kind]:
            v = verdict(plain[k], m[k])
            if v["verdict"] == "hurts" or v["worse_at_floor"]:
                worse.append(k)
        c.update(bad=bool(worse), worse=worse, primary=verdict(plain[PRIMARY[kind]], m[PRIMARY[kind]])["verdict"])


# -- analysis ---------------------------------------------------------------------------------------
def _rejects(c: dict, plain: dict, check: str, tol: float | None = None, margin: float | None = None) -> bool:
    """Does ``check`` reject candidate ``c``: the data-free checks judged anew from the recorded deviations
    (``tol``, ``margin``: default :data:`~steindiff.guards.TOLERANCES`, :data:`~steindiff.guards.MARGINS`, the
    library's current ones), ``distribution`` and ``significance`` as recorded."""
    if check not in CHECKS:
        return not c["passed"][check]
    if c.get("checks") is None:
        return True
    return not judge(check, c["checks"].get(check), (plain.get("checks") or {}).get(check), tol, margin)


def confusion(rows: Sequence[dict], check: str, tol: float | None = None, survivors: bool = False,
              margin: float | None = None) -> dict:
    """Detection and false-alarm counts of ``check`` over every non-plain candidate of ``rows`` (``tol``:
    judged anew from the recorded deviations at this tolerance; ``None``: the recorded outcome).  ``survivors``:
    only the candidates that pass the distribution and significance checks (those a further guard must stop).
    ``by_metric``: per secondary metric, the candidates worse in it and how many of them the check rejects."""
    tp = fn = fp = tn = 0
    by_metric: dict[str, list[int]] = {}
    for r in rows:
        plain = r["candidates"]["plain"]
        for name, c in r["candidates"].items():
            if name == "plain" or c.get("primary") == "failed":
                continue
            if survivors and not all(c["passed"][g] for g in DEFAULT_GUARDS):
                continue
            rej = _rejects(c, plain, check, tol, margin)
            if c["bad"]:
                tp, fn = tp + rej, fn + (not rej)
            else:
                fp, tn = fp + rej, tn + (not rej)
            for m in c["worse"]:
                d = by_metric.setdefault(m, [0, 0])
                d[0], d[1] = d[0] + 1, d[1] + rej
    return {"bad": tp + fn, "good": fp + tn, "rejected_bad": tp, "rejected_good": fp,
            "detection": tp / (tp + fn) if tp + fn else None, "false_alarm": fp / (fp + tn) if fp + tn else None,
            "by_metric": {m: {"worse": w, "rejected": k} for m, (w, k) in by_metric.items()}}


def choices(rows: Sequence[dict], guards: Sequence[str], margins: dict[str, float] | None = None,
            fine: dict | None = None) -> dict:
    """What the calibration keeps under ``guards`` in each cell: counts of cells whose kept candidate is plain,
    bad (a hidden trade; ``trades_as_fine``: of those, the ones bad only in metrics where they are no worse than
    the fine solve, :func:`as_fine`, given ``fine``, per model the fine solve's metrics), better / worse than
    plain on the primary metric; and the mean ratio of the kept configuration's excess primary metric to
    plain's.  ``margins``: checks judged anew at these margins."""
    out = {"cells": 0, "plain": 0, "trades": 0, "trades_as_fine": 0, "primary_helps": 0, "primary_hurts": 0,
           "ratios": []}
    for r in rows:
        plain = r["candidates"]["plain"]
        cands = {k: {"val_rms": c["val_rms"], "checks": c.get("checks"),
                     **{f"passed_{g}_check": k == "plain" or not _rejects(c, plain, g, None, (margins or {}).get(g))
                        for g in GUARDS}}
                 for k, c in r["candidates"].items()}
        k = choose_candidate(cands, guards)
        c = r["candidates"][k]
        out["cells"] += 1
        out["plain"] += k == "plain"
        if k != "plain":
            out["trades"] += bool(c["bad"])
            out["trades_as_fine"] += bool(c["bad"]) and as_fine(c, (fine or {}).get(r["model"]))
            out["primary_helps"] += c["primary"] == "helps"
            out["primary_hurts"] += c["primary"] in ("hurts", "failed")
        p = PRIMARY[r["kind"]]
        mp, mc = r["candidates"]["plain"]["metrics"].get(p), c["metrics"].get(p)
        if mp and mc and mp["mean"] > 0:
            out["ratios"].append(mc["mean"] / mp["mean"])
    out["primary_ratio_mean"] = float(np.mean(out.pop("ratios"))) if out.get("ratios") else None
    return out


def analyse(rows: Sequence[dict], fine: dict | None = None) -> dict:
    """``fine``: per model, the fine solve's metrics on the evaluation noise (:func:`fine_metrics`), if measured."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    groups = {**{m: [r for r in rows if r["model"] == m] for m in models}, "all": list(rows)}
    out: dict[str, Any] = {"checks": {}, "survivors": {}, "sweep": {}, "guard_sets": {}, "margins": {}}
    for g, rs in groups.items():
        out["checks"][g] = {c: confusion(rs, c) for c in ("distribution", "significance", *CHECKS)}
        out["survivors"][g] = {c: confusion(rs, c, survivors=True) for c in CHECKS}
        out["sweep"][g] = {c: {str(t): confusion(rs, c, t) for t in SWEEP[c]} for c in CHECKS}
        out["guard_sets"][g] = {name: choices(rs, gs, fine=fine) for name, gs in GUARD_SETS.items()}
        out["margins"][g] = {c: {str(m): {"survivors": confusion(rs, c, survivors=True, margin=m),
                                          "kept": choices(rs, (c, *DEFAULT_GUARDS), {c: m})} for m in MARGIN_SWEEP}
                             for c in MARGIN_CHECKS}
    return out


# -- report -----------------------------------------------------------------------------------------
def _pct(a: int, b: int) -> str:
    return f"{a}/{b}" + (f" ({100 * a / b:.0f}%)" if b else "")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def markdown(result: dict) -> str:
    rows, an = result["rows"], result["analysis"]
    groups = list(an["checks"])
    cfg = result["config"]
    gradient = cfg.get("fit_method") == "gradient"
    title = "Data-free guards of the calibrated sampler: which checks catch hidden trades"
    lines = [f"# {title}" + (" (the gradient fit)" if gradient else ""), "",
             "Regenerate with:", "", "```", *result["commands"], "```", "",
             f"Cells: {len(rows)} (models {', '.join(cfg['models'])}; solvers {', '.join(cfg['solvers'])}; NFE "
             f"{', '.join(map(str, cfg['nfe']))}; {cfg['schedule']} steps; evaluation seeds {cfg['seeds']}). Every "
             "model is calibrated as an opaque Python function. Settings per kind of model (calibration batch, half "
             "of it validating; fine-solve steps; refinement budget; evaluation samples per seed): "
             + "; ".join(f"{k}: n {v['n_cal']}, {v['ref_steps']} steps, "
                         + ((f"{v['max_iters']} Adam steps of {v['batch_size']} per learning rate within "
                             if "max_iters" in v else "") + f"{v['max_seconds']:.0f} s" if gradient else
                            f"{v['max_solves']} solves or {v['max_seconds']:.0f} s")
                         + f", {v['n_eval']} samples" for k, v in cfg["settings"].items()) + "."
             + (f" Candidates: the gradient fit of {' + '.join(cfg['fit_params'])} "
                "(steindiff.gradient_fit.fit_trajectory_gradient; mixtures and digits at the settings `steindiff "
                "bench` uses, patches with a smaller batch)"
                + (", from GITS's levels, which are a candidate too," if any(
                    v.get("start") == "gits" for v in cfg["settings"].values()) else ", from the plain levels,")
                + " against plain."
                if gradient else ""),
             f"Run time: {result['wall_s'] / 60:.0f} min of wall time, summed over the runs (calibration, evaluation "
             f"and metrics; {result['machine'].get('torch_threads')} torch thread per process, on a shared 2-core "
             "machine under other load: per-cell times are in the JSON).", "",
             "A candidate is *bad* when a secondary metric (mixtures: NLL, mode TV; digits: KID, precision, recall; "
             "patches: spectrum, pixel sliced-W2) is worse than the plain solver's beyond the seed spread (the "
             "protocol's hurts rule). Detection: bad candidates the check rejects; false alarms: good candidates "
             "it rejects.", ""]
    n_bad = {g: an["checks"][g]["residual"]["bad"] for g in groups}
    n_good = {g: an["checks"][g]["residual"]["good"] for g in groups}
    lines += ["## Bad candidates", "", *_table(["model", "candidates", "bad"],
                                               [[g, str(n_bad[g] + n_good[g]), str(n_bad[g])] for g in groups]), ""]
    lines += ["## Each check at its default tolerance and margin: detection / false alarms", "",
              "Margins (steindiff.guards.MARGINS): " + ", ".join(f"{k} {v}" for k, v in MARGINS.items()) + ".", ""]
    checks = list(an["checks"]["all"])
    tab = []
    for c in checks:
        tab.append([f"`{c}`" + (f" ({TOLERANCES[c]})" if c in TOLERANCES else "")]
                   + [f"{_pct(an['checks'][g][c]['rejected_bad'], an['checks'][g][c]['bad'])} / "
                      f"{_pct(an['checks'][g][c]['rejected_good'], an['checks'][g][c]['good'])}" for g in groups])
    lines += _table(["check (tolerance)", *groups], tab) + [""]
    lines += ["## Among the candidates that pass the distribution and significance checks", "",
              "The candidates a further guard must stop: detection / false alarms per check, and per secondary metric "
              "the candidates worse in it that the check rejects.", ""]
    tab = []
    for c in CHECKS:
        row = [f"`{c}`"]
        for g in groups:
            d = an["survivors"][g][c]
            row.append(f"{_pct(d['rejected_bad'], d['bad'])} / {_pct(d['rejected_good'], d['good'])}"
                       + "".join(f"; {m} {v['rejected']}/{v['worse']}" for m, v in sorted(d["by_metric"].items())))
        tab.append(row)
    lines += _table(["check", *groups], tab) + [""]
    lines += ["## Tolerance sweep (all models): detection / false alarms", ""]
    tab = []
    for c in CHECKS:
        for t, d in an["sweep"]["all"][c].items():
            per = [f"{d['rejected_bad']}/{d['bad']} / {d['rejected_good']}/{d['good']}"]
            per += [f"{an['sweep'][g][c][t]['rejected_bad']}/{an['sweep'][g][c][t]['bad']} / "
                    f"{an['sweep'][g][c][t]['rejected_good']}/{an['sweep'][g][c][t]['good']}" for g in groups[:-1]]
            tab.append([f"`{c}`", t, *per])
    lines += _table(["check", "tolerance", "all", *groups[:-1]], tab) + [""]
    lines += ["## Relative margins of the two-sided checks", "",
              "A candidate passes when its deviation from the fine solve is at most (1 + margin) times the plain "
              "solver's. Per model: survivors of distribution and significance, bad rejected / good rejected; and "
              "what the calibration keeps with the check added (trades / helps / plain, of the cells).", ""]
    tab = []
    for c in MARGIN_CHECKS:
        for m in map(str, MARGIN_SWEEP):
            row = [f"`{c}`", m]
            for g in groups:
                d = an["margins"][g][c][m]
                sv, k = d["survivors"], d["kept"]
                row.append(f"{sv['rejected_bad']}/{sv['bad']}, {sv['rejected_good']}/{sv['good']}; "
                           f"{k['trades']} / {k['primary_helps']} / {k['plain']} of {k['cells']}")
            tab.append(row)
    lines += _table(["check", "margin", *groups], tab) + [""]
    lines += ["## What the calibration keeps under each guard set", "",
              "Per guard set and model: cells where the kept candidate is a hidden trade (bad) / cells where it is "
              "better than plain on the primary metric beyond the spread / cells where it keeps plain; and the mean "
              "ratio of the kept configuration's excess primary metric to plain's.", ""]
    fine = result.get("fine") or {}
    if fine:
        lines[-2] += (" In brackets: of the hidden trades, those where every metric the kept candidate makes worse "
                      "is no worse than the fine solve's from the same evaluation noise (below).")
    tab = []
    for name in GUARD_SETS:
        tab.append([name] + [f"{d['trades']}" + (f" ({d.get('trades_as_fine', 0)})" if fine else "")
                             + f" / {d['primary_helps']} / {d['plain']} of {d['cells']}; "
                             f"{d['primary_ratio_mean']:.3g}" if d["primary_ratio_mean"] is not None else "–"
                             for d in (an["guard_sets"][g][name] for g in groups)])
    lines += _table(["guards", *groups], tab) + [""]
    if fine:
        lines += ["## The fine solve on the evaluation noise", "",
                  "The calibration's reference solve (dpmpp_2m, the fine-solve steps above, log-SNR steps), run "
                  "from each evaluation seed's noise and scored as the candidates are: the values a sampler that "
                  "follows the model's ODE exactly reaches. A hidden trade is *as the fine solve* when every "
                  "secondary metric it makes worse than plain is no worse than the fine solve's (the same hurts "
                  "rule, against the fine solve): plain's better value there is its own discretisation error. Such "
                  "a trade still counts as a trade above. Excess over the floor, mean ± standard deviation over "
                  "seeds.", ""]
        for model, ms in fine.items():
            lines.append(f"- {model}: " + ", ".join(f"{k} {v['mean']:.4g} ± {v['std']:.2g}" for k, v in ms.items()))
        lines.append("")
    lines += ["## Cells", "", "Per cell: the candidates that are bad (and the metrics they make worse), and which "
              "checks reject them.", ""]
    tab = []
    for r in rows:
        for name, c in r["candidates"].items():
            if name == "plain":
                continue
            rej = [g for g in ("distribution", "significance", *CHECKS) if _rejects(c, r["candidates"]["plain"], g)]
            worse = ", ".join(c["worse"]) or "–"
            if as_fine(c, fine.get(r["model"])):
                worse += " (as the fine solve)"
            tab.append([r["model"], r["solver"], r.get("schedule", cfg["schedule"]), str(r["nfe"]), name, c["primary"],
                        worse, ", ".join(rej) or "–"])
    lines += _table(["model", "solver", "schedule", "NFE", "candidate", "primary vs plain", "worse", "rejected by"],
                    tab)
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="gmm:image64,gmm:image64-sharp,gmm:toy2d,digits,patches")
    p.add_argument("--solvers", default="dpmpp_2m,unipc,ipndm,euler")
    p.add_argument("--nfe", default="3,4,5,6")
    p.add_argument("--schedule", default="karras")
    p.add_argument("--seeds", default="0,1,2", help="evaluation seeds")
    p.add_argument("--fit-method", choices=("derivative-free", "gradient"), default="derivative-free",
                   help="which fit produces the candidates (gradient: at the bench's settings, gradient_settings)")
    p.add_argument("--fit-params", default=None, metavar="P[,P...]",
                   help="--fit-method gradient: what to fit (steindiff.gradient_fit.PARAMS; default "
                        "steps,model_sigmas)")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="--fit-method gradient: the fit's time budget per cell (default: the bench's)")
    p.add_argument("--max-iters", type=int, default=None,
                   help="--fit-method gradient: Adam steps per learning rate (default: the bench's, "
                        "steindiff.bench.runner.GRADIENT_BUDGET)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="--fit-method gradient: teacher pairs per Adam step (default: the bench's)")
    p.add_argument("--fit-start", default=None, choices=STARTS,
                   help="--fit-method gradient: where the fit starts (default plain, as in the committed study, "
                        "though the library's default is gits: GITS's levels, also a candidate)")
    p.add_argument("--from", dest="from_files", default=None, metavar="FILE[,FILE...]",
                   help="merge saved results (their rows; a cell in a later file replaces the same cell in an "
                        "earlier one) and report, without running")
    p.add_argument("--fine", action="store_true",
                   help="also score the fine solve from the evaluation noise, per model (where a merged file lacks "
                        "it), to tell which hidden trades leave a metric no worse than the fine solve's")
    p.add_argument("--json-out", default=None)
    p.add_argument("--markdown", default=None)
    args = p.parse_args(argv)
    command = " ".join(["python benchmarks/guards_study.py", *(argv if argv is not None else sys.argv[1:])])
    if args.from_files:
        parts = [json.loads(Path(f).read_text()) for f in args.from_files.split(",")]
        # a cell run again in a later part replaces the earlier run (as its settings replace the earlier ones)
        cells = {(r["model"], r["solver"], r["schedule"], r["nfe"]): r for part in parts for r in part["rows"]}
        rows = list(cells.values())
        cfg = dict(parts[0]["config"])
        for k in ("models", "solvers", "nfe"):
            cfg[k] = list(dict.fromkeys(x for part in parts for x in part["config"][k]))
        cfg["schedule"] = ", ".join(dict.fromkeys(part["config"]["schedule"] for part in parts))
        methods = {part["config"].get("fit_method", "derivative-free") for part in parts}
        if len(methods) > 1:
            raise SystemExit(f"cannot merge studies of different fit methods ({', '.join(sorted(methods))})")
        result = {"schema": SCHEMA, "machine": parts[0]["machine"], "config": cfg,
                  "commands": [c for part in parts for c in part["commands"]] + [command],
                  "wall_s": sum(part["wall_s"] for part in parts), "rows": rows}
    else:
        torch.set_num_threads(1)
        t0 = time.perf_counter()
        models = [m for m in args.models.split(",") if m]
        solvers = [s for s in args.solvers.split(",") if s]
        nfes = [int(v) for v in args.nfe.split(",") if v]
        seeds = [int(v) for v in args.seeds.split(",") if v]
        if args.fit_params is not None and args.fit_method != "gradient":
            p.error("--fit-params needs --fit-method gradient")
        budget = {k: v for k, v in (("max_seconds", args.max_seconds), ("max_iters", args.max_iters),
                                    ("batch_size", args.batch_size)) if v is not None}
        if budget and args.fit_method != "gradient":
            p.error("--max-seconds, --max-iters and --batch-size need --fit-method gradient")
        if any(not v > 0 for v in budget.values()):
            p.error(f"the gradient fit's budget must be positive, got {budget}")
        if args.fit_start is not None and args.fit_method != "gradient":
            p.error("--fit-start needs --fit-method gradient")
        if args.fit_method == "gradient":
            budget["start"] = args.fit_start or "plain"
        params = check_params(args.fit_params or "steps,model_sigmas")
        rows = [r for m in models for r in run_model(m, solvers, nfes, args.schedule, seeds,
                                                     fit_method=args.fit_method, fit_params=params, budget=budget)]
        settings = {}
        for m in models:
            spec = load_model(m)
            kind = kind_of(spec)  # evaluation as SETTINGS; the gradient fit's calibration as the bench's
            settings[kind] = {**SETTINGS[kind], **({k: v for k, v in {**gradient_settings(spec, kind), **budget}.items()
                                                   if k != "dtype"} if args.fit_method == "gradient" else {})}
        result = {"schema": SCHEMA, "machine": machine_info(),
                  "config": {"models": models, "solvers": solvers, "nfe": nfes, "schedule": args.schedule,
                             "fit_method": args.fit_method,
                             **({"fit_params": list(params)} if args.fit_method == "gradient" else {}),
                             "seeds": seeds, "calibration_seed": CALIBRATION_SEED,
                             "settings": {k: {**v, "dtype": str(v["dtype"])} for k, v in settings.items()}},
                  "commands": [command], "wall_s": time.perf_counter() - t0, "rows": rows}
    if args.from_files:  # settings of every part
        result["config"]["settings"] = {k: v for part in parts for k, v in part["config"]["settings"].items()}
        fine = {m: f for part in parts for m, f in (part.get("fine") or {}).items()}
        if fine:
            result["fine"] = fine
    if args.fine:
        fine = result.setdefault("fine", {})
        for m in dict.fromkeys(r["model"] for r in result["rows"]):
            if m not in fine:
                kind = kind_of(load_model(m))
                st = result["config"]["settings"][kind]
                t1 = time.perf_counter()
                fine[m] = fine_metrics(m, result["config"]["seeds"], st["n_eval"], st["ref_steps"])
                print(f"{m}: fine solve on the evaluation noise {time.perf_counter() - t1:.0f} s", flush=True)
    result["analysis"] = analyse(result["rows"], result.get("fine"))
    if args.json_out:
        save_json(args.json_out, result)
    text = markdown(result)
    if args.markdown:
        with atomic_path(args.markdown) as tmp:
            Path(tmp).write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
