#!/usr/bin/env python
"""The calibrated sampler's gradient fit against the derivative-free fit and the plain solvers.

For each model, solver, schedule and NFE, every configuration is calibrated once through the public API
(``steindiff.calibrate`` on calibration noise, seed 12345), then sampled from the evaluation seeds' noise
(disjoint from the calibration noise) and judged with every metric of the benchmark
(``steindiff.bench.runner``: mixtures ``sw2`` (primary), ``nll``, ``mode_tv``, ``mmd``, ``traj_err``; digits
``digits_fid`` (primary), ``digits_kid``, ``precision``, ``recall``, ``traj_err``; photo patches ``patch_fd``
(primary), ``spectrum``, ``pixel_sw2``, ``traj_err``; the primary is the runner's
:func:`~steindiff.bench.runner.primary_metric`), each as its excess over its floor.  The models are driven as a
user's own would be: an exact mixture wrapped in a plain ``torch.nn.Module`` (no ``gmm:*`` special case applies:
no residual guard, no mixture fast path), the image U-Nets (digits, patches) as shipped but without their
shipped calibrations.

Configurations (``--configs``, comma-separated, each ``name[@option=value...]``):

- ``plain``: the plain solver;
- ``derivative-free``: the library's derivative-free fit (``fit_method="derivative-free"``), option ``solves=``
  (its budget of whole solves; default 200 mixtures, 120 images); with ``--df-shipped`` (digits) the
  calibrations shipped with the model are used instead of refitting;
- ``grad:<params>``: the gradient fit of ``<params>`` (``+``-separated from steps, gamma, model_sigmas,
  history; several sets separated by ``/`` are each fitted and compete in the validation), with options
  ``ball=`` (soft teacher forcing radius), ``residual=`` (residual-noise weight),
  ``teacher=<solver>:<steps>`` (the fine solve it fits to), ``n=`` (calibration batch), ``lr=``, ``iters=``,
  ``batch=``, ``lap=<w0/w1/...>`` (the distance in the bands of a Laplacian pyramid with these weights, finest
  first: :class:`steindiff.distances.LaplacianPyramid`), ``feat=<s0/s1/...>`` (the distance in the model's own
  network's activations at these noise levels: :class:`steindiff.distances.DenoiserFeatures`) with ``pix=<w>``
  (its pixel L2 weight), ``guards=<g1/g2/...>`` (the calibration's guards instead of the default; ``none``: the
  candidate closest to the teacher is kept whatever the checks say), ``start=gits`` (the fit starts from GITS's
  levels, which also compete as a candidate; without it the fit starts from the plain levels, as in the study's
  committed rows, whatever the library's default);
- ``peer:<name>``: a peer of :mod:`steindiff.bench.peers` (``peer:ld3``, ``peer:gits``), fitted by
  :func:`steindiff.bench.peers.fit_peer` from the same calibration noise and the same teacher as the fits above
  (the peer's own settings: LD3 takes the first 100 teacher pairs, GITS the trajectories the teacher keeps);
  option ``iters=`` (LD3) caps LD3's Adam steps (the paper's 300 otherwise).

Per NFE the summary gives the best plain configuration over solvers and schedules, the fine solve (the
teacher-grade reference: 1000 dpmpp_3m Karras steps for mixtures, 100 for images), each configuration's best
over solvers and schedules, and the gap closed ``(best plain - best calibrated) / (best plain - fine solve)``
on the primary metric; per cell the protocol's verdict of each configuration against plain on every metric
(``steindiff.bench.runner.verdict``), and of each fitted configuration against ``peer:ld3`` when it ran.
Calibration CPU time (``time.process_time``) is recorded per fit; the
teacher's once per model (each cell reuses it, as ``steindiff bench`` does).

    python benchmarks/gradient_fit_study.py --models gmm:image64 --json-out out.json --markdown out.md
    python benchmarks/gradient_fit_study.py --merge a.json b.json --json-out all.json --markdown all.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

import steindiff as sd
from steindiff.bench import runner
from steindiff.bench.auto import auto_rule
from steindiff.bench.peers import PREFIX, fit_peer, peer_name
from steindiff.bench.runner import (
    _floors,
    _noise,
    _reference,
    above_fine,
    excess,
    machine_info,
    primary_metric,
    verdict,
    worse_than,
)
from steindiff.calibration import CALIBRATION_SEED, cache_file, calibration_key, plan_from_schedule
from steindiff.distances import DenoiserFeatures, LaplacianPyramid
from steindiff.gradient_fit import PARAMS, STARTS
from steindiff.io import save_json
from steindiff.metrics import image_model_metrics, mixture_metrics, traj_err
from steindiff.models.registry import ModelSpec, load_model
from steindiff.stabilizers.schedule import load_gamma_schedule
from steindiff.trajectory import passes_guard, reference_solve

SCHEMA = "steindiff.gradient-fit-study/1"
PARAM_SETS = ("steps", "steps+gamma", "steps+model_sigmas", "steps+gamma+model_sigmas", "steps+history",
              "steps+gamma+model_sigmas+history")
DEFAULT_CONFIGS = ("plain", "derivative-free", *(f"grad:{p}" for p in PARAM_SETS))
MIXTURE_METRICS = ("sw2", "nll", "mode_tv", "mmd", "traj_err")
#: Digits: the digits metrics the study reports (the runner's ``class_tv`` and ``memorization`` left out).
DIGITS_METRICS = ("digits_fid", "digits_kid", "precision", "recall", "traj_err")
#: Photo patches: the runner's image metrics that are not digits metrics (``patch_fd``, ``spectrum``, ``pixel_sw2``).
PATCH_METRICS = (*(m for m in runner.IMAGE_METRICS if m not in runner.DIGITS_METRICS), "traj_err")
#: Per kind of model: calibration batch, teacher (solver, steps), gradient-fit budget.
DEFAULTS = {"mixture": {"n": 512, "teacher": ("dpmpp_2m", 200), "iters": 300, "batch": 64},
            "image": {"n": 256, "teacher": ("dpmpp_2m", 100), "iters": 150, "batch": 32}}


class OpaqueMixture(torch.nn.Module):
    """An exact mixture's denoiser as a user would hand it over: a module with its parameters as buffers."""

    def __init__(self, gmm):
        super().__init__()
        self._gmm = gmm
        for k in ("means", "weights", "basis", "lam", "s2"):
            self.register_buffer(k, getattr(gmm, k).clone())

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return self._gmm.denoise(x, sigma)


def parse_config(text: str) -> dict:
    """``name[@k=v...]`` to ``{"name", "method", "params", options...}``."""
    name, *opts = text.split("@")
    cfg: dict = {"label": text, "name": name}
    if name in ("plain", "derivative-free"):
        cfg["method"] = name
    elif name.startswith(PREFIX):
        peer_name(name)  # raises for an unknown peer
        cfg["method"] = "peer"
    elif name.startswith("grad:"):
        sets = [ps.split("+") for ps in name[5:].split("/")]
        bad = [p for ps in sets for p in ps if p not in PARAMS]
        if bad or not all(sets):
            raise ValueError(f"config {text!r}: unknown parameter(s) {bad}; choose from {', '.join(PARAMS)}")
        cfg.update(method="gradient", params=sets[0] if len(sets) == 1 else sets, start="plain")
    else:
        raise ValueError(f"unknown configuration {text!r}: plain, derivative-free, peer:<name> or "
                         "grad:<params>[@k=v]")
    for o in opts:
        k, _, v = o.partition("=")
        if k == "teacher":
            solver, _, steps = v.partition(":")
            cfg["teacher"] = (solver, int(steps))
        elif k in ("ball", "residual", "lr"):
            cfg[k] = float(v)
        elif k in ("n", "iters", "batch", "solves"):
            cfg[k] = int(v)
        elif k == "lap":
            cfg["lap"] = tuple(float(w) for w in v.split("/"))
        elif k == "feat":
            cfg["feat"] = tuple(float(w) for w in v.split("/"))
        elif k == "pix":
            cfg["pix"] = float(v)
        elif k == "guards":
            cfg["guards"] = tuple(g for g in v.split("/") if g and g != "none")
        elif k == "start":
            if v not in STARTS:
                raise ValueError(f"config {text!r}: start must be one of {', '.join(STARTS)}")
            cfg["start"] = v
        else:
            raise ValueError(f"config {text!r}: unknown option {k!r} (ball, residual, teacher, n, lr, iters, batch, "
                             "solves, lap, feat, pix, guards, start)")
    if "lap" in cfg and "feat" in cfg:
        raise ValueError(f"config {text!r}: lap= and feat= are two distances, choose one")
    allowed = {"gradient": None, "derivative-free": ("teacher=", "n=", "solves=", "guards="),
               "peer": ("teacher=", "n=", "iters=") if name == "peer:ld3" else ("teacher=", "n=")}.get(
        cfg["method"], ("teacher=", "n="))
    if allowed is not None and any(not o.startswith(allowed) for o in opts):
        raise ValueError(f"config {text!r}: only gradient fits take fit options (derivative-free: solves=; "
                         "peer:ld3: iters=)")
    return cfg


def user_model(spec: ModelSpec) -> ModelSpec:
    """``spec`` as a user's model: no mixture, no shipped calibrations, no reference data."""
    den = OpaqueMixture(spec.gmm) if spec.gmm is not None else spec.denoiser
    return ModelSpec(name=f"user:{spec.name}", denoiser=den, process=spec.process, sample_shape=spec.sample_shape)


def metric_names(spec: ModelSpec) -> tuple[str, ...]:
    """The metrics the study reports for ``spec``, its primary (:func:`~steindiff.bench.runner.primary_metric`)
    first: :data:`MIXTURE_METRICS`, :data:`DIGITS_METRICS` or :data:`PATCH_METRICS`."""
    if runner.model_kind(spec) is None:
        raise ValueError(f"model {spec.name!r} is neither a mixture nor an image model with reference images: "
                         "the study has no metric for it")
    primary = primary_metric(spec)
    names = next((m for m in (MIXTURE_METRICS, DIGITS_METRICS, PATCH_METRICS) if m[0] == primary), None)
    if names is None:
        raise ValueError(f"model {spec.name!r}: the study has no metric set for its primary metric {primary!r}")
    return names


def metrics_of(spec: ModelSpec, x: torch.Tensor, seed: int, ref: torch.Tensor, floors: dict) -> dict:
    if spec.gmm is not None:
        return {**mixture_metrics(x, spec.gmm, seed=seed, ref=ref, mmd=True), **floors}
    m = image_model_metrics(x.clamp(-1, 1), spec, seed=seed)
    m["traj_err"] = traj_err(x, ref)
    return m


def _stats(v: list[float]) -> dict:
    return {"mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0, "per_seed": v}


def run_model(name: str, cells: list[tuple[str, str, int]], configs: list[dict], seeds: list[int], n_eval: int,
              df_shipped: bool, progress: bool, log: bool = False, teacher_cache: str | None = None) -> dict:
    spec = load_model(name)
    kind = "mixture" if spec.gmm is not None else "image"
    d = DEFAULTS[kind]
    dtype = torch.float64 if kind == "mixture" else torch.float32
    user = user_model(spec)
    names = metric_names(spec)
    teachers: dict[tuple, dict] = {}

    def teacher(cfg: dict):
        key = (*cfg.get("teacher", d["teacher"]), cfg.get("n", d["n"]))
        if key not in teachers:
            cached = Path(teacher_cache) / f"{name.replace(':', '_')}-{key[0]}-{key[1]}-{key[2]}.pt" \
                if teacher_cache else None
            if cached is not None and cached.exists():
                teachers[key] = torch.load(cached, weights_only=False)
                teachers[key].setdefault("noise", sd.prior_noise((key[2], *spec.sample_shape),
                                                                 float(spec.process.sigma_max), spec.process,
                                                                 seed=CALIBRATION_SEED, dtype=dtype))
                return teachers[key]
            t0, w0 = time.process_time(), time.perf_counter()
            noise = sd.prior_noise((key[2], *spec.sample_shape), float(spec.process.sigma_max), spec.process,
                                   seed=CALIBRATION_SEED, dtype=dtype)
            ref = reference_solve(user.denoiser, noise, float(spec.process.sigma_max), float(spec.process.sigma_min),
                                  solver=key[0], steps=key[1], keep=key[2] // 2)
            teachers[key] = {"ref": ref, "noise": noise, "cpu_s": time.process_time() - t0,
                             "wall_s": time.perf_counter() - w0,
                             "solver": key[0], "steps": key[1], "n": key[2], "convergence_rms": ref.convergence}
            if cached is not None:
                cached.parent.mkdir(parents=True, exist_ok=True)
                torch.save(teachers[key], cached)
        return teachers[key]

    fits, rows = [], []
    plans: dict[tuple, sd.SamplingPlan] = {}
    bar = tqdm(total=len(cells) * len(configs) + len(seeds), disable=not progress, desc=f"study {name}")
    for solver, schedule, nfe in cells:
        base = sd.make_plan(spec.process, solver, nfe, schedule)
        for cfg in configs:
            rec = {"model": name, "solver": solver, "schedule": schedule, "nfe": nfe, "config": cfg["label"]}
            if cfg["method"] == "plain":
                plans[(solver, schedule, nfe, cfg["label"])] = base
            elif cfg["method"] == "derivative-free" and df_shipped:
                path = cache_file(Path(spec.info["calibrations"]), calibration_key(spec, base))
                sched = load_gamma_schedule(path)
                plan = plan_from_schedule(sched, base)
                c = sched.meta["calibration"]
                plans[(solver, schedule, nfe, cfg["label"])] = plan
                rec.update(source="shipped", chosen=c["chosen"], val_ratio=c["val_ratio"], wall_s=c["wall_s"],
                           cpu_s=None, teacher=[c["reference"]["solver"], c["reference"]["steps"]], n=c["n"])
            elif cfg["method"] == "peer":
                tch = teacher(cfg)
                t0, w0 = time.process_time(), time.perf_counter()
                plan = fit_peer(cfg["name"], user.denoiser, base, tch["noise"], tch["ref"],
                                sigma_min=float(spec.process.sigma_min),
                                **({"max_iters": cfg["iters"]} if "iters" in cfg else {}))
                plans[(solver, schedule, nfe, cfg["label"])] = plan
                pname = plan.meta["peer"]["name"]
                rec.update(source="fitted", chosen="peer", val_ratio=None, cpu_s=time.process_time() - t0,
                           wall_s=time.perf_counter() - w0, teacher=[tch["solver"], tch["steps"]], n=tch["n"],
                           distance=plan.meta["peer"]["distance"],
                           record={k: v for k, v in plan.meta.get(pname, {}).items() if k != "path"},
                           sigmas=plan.sigmas.tolist(), model_sigmas=plan.model_sigmas)
            else:
                tch = teacher(cfg)
                opts = {"n": tch["n"], "seed": CALIBRATION_SEED, "dtype": dtype, "ref": tch["ref"],
                        "ref_solver": tch["solver"], "ref_steps": tch["steps"], "max_seconds": 1e9}
                if "guards" in cfg:
                    opts["guards"] = cfg["guards"]
                if cfg["method"] == "gradient":
                    opts.update(fit_method="gradient", params=cfg["params"], teacher_ball=cfg.get("ball", 0.0),
                                residual_weight=cfg.get("residual", 0.0),
                                **({"loss": "features", "features": LaplacianPyramid(cfg["lap"])}
                                   if "lap" in cfg else {}),
                                **({"loss": "features", "features": DenoiserFeatures(
                                    user.denoiser, cfg["feat"], pixel_weight=cfg.get("pix", 0.0))}
                                   if "feat" in cfg else {}),
                                gradient_options={"max_iters": cfg.get("iters", d["iters"]),
                                                  "batch_size": cfg.get("batch", d["batch"]),
                                                  **({"lr": cfg["lr"]} if "lr" in cfg else {}),
                                                  "start": cfg["start"]})
                else:
                    opts.update(max_solves=cfg.get("solves", 200 if kind == "mixture" else 120))
                t0, w0 = time.process_time(), time.perf_counter()
                sched = sd.calibrate(user, base, **opts)
                cpu, wall = time.process_time() - t0, time.perf_counter() - w0
                c = sched.meta["calibration"]
                plans[(solver, schedule, nfe, cfg["label"])] = plan_from_schedule(sched, base)
                g = c.get("gradient", {})
                rec.update(source="fitted", chosen=c["chosen"], val_ratio=c["val_ratio"], cpu_s=cpu, wall_s=wall,
                           teacher=[tch["solver"], tch["steps"]], n=tch["n"], iters=g.get("iters"),
                           best_iter=g.get("best_iter"), stopped=g.get("stopped"),
                           candidates={k: v["val_rms"] for k, v in c["candidates"].items()},
                           failed_guards={k: [g for g in c.get("guards", [])
                                              if not passes_guard(v, c["candidates"]["plain"], g)]
                                          for k, v in c["candidates"].items() if k != "plain"},
                           requires=sched.requires)
            fits.append(rec)
            bar.update()
            if log:
                print(f"fit {name} {solver}/{schedule}/{nfe} {cfg['label']}: chosen {rec.get('chosen', '-')}, "
                      f"val ratio {rec.get('val_ratio') or 1:.3f}, cpu {rec.get('cpu_s') or 0:.1f} s, "
                      f"stopped {rec.get('stopped')}", file=sys.stderr, flush=True)
    for seed in seeds:
        noise = _noise(spec, n_eval, seed)
        cached = Path(teacher_cache) / f"{name.replace(':', '_')}-fine-{seed}-{n_eval}.pt" if teacher_cache else None
        if cached is not None and cached.exists():
            ref = torch.load(cached)
        else:
            ref = _reference(spec, noise, "dpmpp_3m", 1000)
            if cached is not None:
                cached.parent.mkdir(parents=True, exist_ok=True)
                torch.save(ref, cached)
        floors = _floors(spec, n_eval, seed)
        fine = metrics_of(spec, ref, seed, ref, floors)
        rows.append({"model": name, "seed": seed, "config": "fine", "metrics": fine,
                     "excess": {m: excess(fine, m) for m in names}})
        for (solver, schedule, nfe, label), plan in plans.items():
            x = sd.sample(user.denoiser, noise, plan.sigmas, plan.get_solver(), stabilizer=plan.stabilizer()).x
            row = {"model": name, "seed": seed, "solver": solver, "schedule": schedule, "nfe": nfe, "config": label}
            try:
                m = metrics_of(spec, x, seed, ref, floors)
                row.update(metrics=m, excess={k: excess(m, k) for k in names}, status="ok")
            except ValueError as e:  # non-finite samples are a result
                row.update(metrics={}, excess={}, status=f"failed: {e}")
            rows.append(row)
        bar.update()
    bar.close()
    return {"model": name, "kind": kind, "metrics": list(names), "primary": names[0],
            "teachers": [{k: v for k, v in t.items() if k not in ("ref", "noise")} for t in teachers.values()],
            "fits": fits, "rows": rows, "seeds": seeds, "n_eval": n_eval,
            "reference": {"solver": "dpmpp_3m", "steps": 1000 if kind == "mixture" else 100, "schedule": "karras"}}


def _cell_key(r: dict) -> tuple:
    return r["solver"], r["schedule"], r["nfe"], r["config"]


def merge_models(parts: list[dict]) -> list[dict]:
    """Runs of the same model on other cells or configurations (shards) as one: their fits and rows together,
    the fine solve's rows and the teachers once, and a configuration that ran in several shards (``plain``
    beside each set of fits) once per cell."""
    out: dict[str, dict] = {}
    for m in parts:
        if m["model"] not in out:
            out[m["model"]] = {**m, "fits": list(m["fits"]), "rows": list(m["rows"]), "teachers": list(m["teachers"])}
            continue
        o = out[m["model"]]
        if o["seeds"] != m["seeds"] or o["n_eval"] != m["n_eval"]:
            raise ValueError(f"cannot merge runs of {m['model']} with other evaluation seeds or sizes")
        fit_keys = {_cell_key(f) for f in o["fits"]}
        row_keys = {(_cell_key(r), r["seed"]) for r in o["rows"] if r["config"] != "fine"}
        o["fits"] += [f for f in m["fits"] if _cell_key(f) not in fit_keys]
        o["rows"] += [r for r in m["rows"] if r["config"] != "fine" and (_cell_key(r), r["seed"]) not in row_keys]
        seen = {(t["solver"], t["steps"], t["n"]) for t in o["teachers"]}  # one teacher, whatever it cost
        o["teachers"] += [t for t in m["teachers"] if (t["solver"], t["steps"], t["n"]) not in seen]
        o["wall_s"] = o.get("wall_s", 0) + m.get("wall_s", 0)
    return list(out.values())


def summarize(result: dict) -> dict:
    """Per model: cell statistics, verdicts against plain, best per NFE and the gap closed."""
    out = {}
    for mres in result["models"]:
        metrics, primary = mres["metrics"], mres["primary"]
        groups: dict[tuple, list[dict]] = {}
        fine_rows = []
        for r in mres["rows"]:
            if r["config"] == "fine":
                fine_rows.append(r)
            else:
                groups.setdefault((r["solver"], r["schedule"], r["nfe"], r["config"]), []).append(r)
        cells = {}
        for key, rs in groups.items():
            ok = all(r.get("status") == "ok" for r in rs)
            cells[key] = {m: (_stats([r["excess"][m] for r in rs]) if ok else None) for m in metrics}
        fine = {m: _stats([r["excess"][m] for r in fine_rows]) for m in metrics}
        configs = list(dict.fromkeys(k[3] for k in cells))
        verdicts = {}
        for (solver, schedule, nfe, label), st in cells.items():
            if label == "plain":
                continue
            plain = cells[(solver, schedule, nfe, "plain")]
            verdicts[f"{solver}/{schedule}/{nfe}/{label}"] = {m: verdict(plain[m], st[m])["verdict"] for m in metrics}
        nfes = sorted({k[2] for k in cells})
        best = {}
        for nfe in nfes:
            per = {}
            for label in configs:
                cand = [(st[primary]["mean"], st[primary]["std"], f"{k[0]}/{k[1]}")
                        for k, st in cells.items() if k[2] == nfe and k[3] == label and st[primary] is not None]
                if cand:
                    per[label] = dict(zip(("mean", "std", "where"), min(cand)))
            bp, fs = per["plain"], fine[primary]
            room = above_fine(bp, fs)
            for label, b in per.items():
                b["gap_closed"] = (bp["mean"] - b["mean"]) / (bp["mean"] - fs["mean"]) if bp["mean"] != fs["mean"] \
                    else None
            ours = [lb for lb in per if lb != "plain" and not lb.startswith(PREFIX)]  # the calibrated sampler's
            top = min(ours, key=lambda lb: per[lb]["mean"]) if ours else None
            best[str(nfe)] = {"room": room, "fine": fs, "configs": per,
                              "best_calibrated": None if top is None else {"config": top, **per[top]}}
        tally = {}
        for label in configs:
            if label == "plain":
                continue
            vs = [v for k, v in verdicts.items() if k.endswith("/" + label)]
            tally[label] = {m: {w: sum(v[m] == w for v in vs) for w in ("helps", "tie", "hurts", "failed")}
                            for m in metrics}
        fits = [f for f in mres["fits"] if f.get("cpu_s") is not None]
        cost = {}
        for label in configs:
            cs = [f["cpu_s"] for f in fits if f["config"] == label]
            if cs:
                cost[label] = {"median_cpu_s": statistics.median(cs), "max_cpu_s": max(cs),
                               "chosen_not_plain": sum(f["chosen"] != "plain" for f in mres["fits"]
                                                       if f["config"] == label),
                               "fits": sum(f["config"] == label for f in mres["fits"])}
        # each other configuration against each LD3 run (any options) in the same cell, on the primary metric
        versus: dict[str, dict] = {}
        for ld3 in (lb for lb in configs if lb.split("@")[0] == "peer:ld3"):
            for label in configs:
                if label == "plain" or label.split("@")[0] == "peer:ld3":
                    continue
                vs = [verdict(cells[k[:3] + (ld3,)][primary], st[primary])
                      for k, st in cells.items() if k[3] == label and k[:3] + (ld3,) in cells]
                # LD3 at its floor leaves no room to beat it, but a configuration can still be worse there
                words = ["hurts" if v["worse_at_floor"] else v["verdict"] for v in vs]
                # cells where LD3 is itself above the fine solve beyond both spreads (the gap's room rule): in the
                # others a sampler that follows the model's ODE can at best tie it
                above = [above_fine(cells[k[:3] + (ld3,)][primary], fine[primary])
                         for k, st in cells.items() if k[3] == label and k[:3] + (ld3,) in cells]
                versus.setdefault(ld3, {})[label] = {**{w: words.count(w) for w in ("helps", "tie", "hurts",
                                                                                     "failed", "n/a")},
                                                     "room": sum(bool(v["room"]) for v in vs),
                                                     "above_fine": sum(above),
                                                     "helps_above_fine": sum(a and w == "helps"
                                                                             for a, w in zip(above, words))}
        # the evidence rule of --stabilizer auto (steindiff.bench.auto) over this model's cells
        rule_cells = [{"model": mres["model"], "solver": k[0], "schedule": k[1], "nfe_budget": k[2],
                       "stabilizer": k[3], "coords": "-", "primary": primary,
                       "verdicts": {m: verdict(cells[k[:3] + ("plain",)][m], st[m]) for m in metrics}}
                      for k, st in cells.items() if k[3] != "plain"]
        evidence = {label: auto_rule(rule_cells, label) for label in configs if label != "plain"}
        # hidden trades, each worse metric marked by whether the model's own fine solve is as bad there
        trades = {}
        for key, v in verdicts.items():
            solver, schedule, nfe, label = key.split("/", 3)
            st = cells[(solver, schedule, int(nfe), label)]
            worse = [m for m in metrics if m != primary and v[m] == "hurts"]
            if worse:
                trades[key] = {m: not worse_than(fine[m], st[m]) for m in worse}
        out[mres["model"]] = {"primary": primary, "fine": fine, "best": best, "tally": tally, "cost": cost,
                              "versus_ld3": versus, "evidence": evidence, "rule_cells": rule_cells,
                              "trades": trades,
                              "cells": {"/".join(map(str, k)): v for k, v in cells.items()}, "verdicts": verdicts}
    return out


EVIDENCE_TEXT = ("`steindiff.bench.auto.auto_rule`, as `benchmarks/select_auto.py` applies it to benchmark grids: "
                 "a configuration qualifies when on the primary metric it is worse than plain in no cell, helps in "
                 "at least 80% of the cells at NFE <= 8 that have room, and its secondary metrics are none worse "
                 "in at least 90% of the cells.")


def _evidence_table(evidence: dict) -> list[str]:
    lines = ["| config | cells | worse on the primary metric | helps at NFE <= 8 (of cells with room) | "
             "secondaries not worse | qualifies |", "|---|---|---|---|---|---|"]
    for label, r in evidence.items():
        worse = f"{r['worse_cells']}" + (f" ({r['first_worse']})" if r["first_worse"] else "")
        lines.append(f"| {label} | {r['cells']} | {worse} | {r['helps_small_nfe']}/{r['room_small_nfe']} "
                     f"({r['helps_pct']:.0f}%) | {r['cells'] - r['secondary_worse_cells']}/{r['cells']} "
                     f"({r['secondary_ok_pct']:.0f}%) | {'yes' if r['qualifies'] else 'no'} |")
    return lines


def evidence_over_models(summary: dict) -> dict:
    """The evidence rule over every model's cells together (the rule is stated for the whole grid)."""
    cells = [c for s in summary.values() for c in s["rule_cells"]]
    labels = list(dict.fromkeys(c["stabilizer"] for c in cells))
    return {label: auto_rule(cells, label) for label in labels}


def markdown(result: dict, summary: dict) -> str:
    lines = ["# The gradient fit of the calibrated sampler: a study", "",
             "Regenerate with:", "", "```", result["command"], "```", "",
             f"Machine: {result['machine'].get('platform')}, {result['machine'].get('cpu_count')} CPUs, "
             f"{result['torch_threads']} torch thread(s) per process; `OMP_NUM_THREADS={result['omp_num_threads']}`. "
             "Models driven as a user's own (`benchmarks/gradient_fit_study.py`: an exact mixture as a plain "
             "`torch.nn.Module`, so no `gmm:*` special case applies). Evaluation seeds per model below, "
             f"calibration noise seed {CALIBRATION_SEED}. Values are excess over "
             "the metric's floor, mean ± standard deviation over seeds; lower is better (precision, recall: floor "
             "minus value). The fits minimise the L2 distance to the teacher's samples unless the configuration "
             "says otherwise; none uses a metric's features.", ""]
    for mres in result["models"]:
        s = summary[mres["model"]]
        p = s["primary"]
        lines += [f"## {mres['model']}", "",
                  "Teacher(s): " + "; ".join(f"{t['solver']} {t['steps']} log-SNR steps on {t['n']} calibration "
                                             f"samples, {t['cpu_s']:.0f} s CPU, converged to {t['convergence_rms']:.2g}"
                                             for t in mres["teachers"]) + f". Fine solve: {mres['reference']}. "
                  f"Evaluation seeds {mres['seeds']}, {mres['n_eval']} samples each.", "",
                  f"### Gap closed on {p} (best over solvers and schedules at each NFE)", "",
                  "| config | " + " | ".join(f"NFE {k}" for k in s["best"]) + " |",
                  "|---|" + "---|" * len(s["best"])]
        labels = list(next(iter(s["best"].values()))["configs"])
        for label in labels:
            cells = []
            for nfe, b in s["best"].items():
                c = b["configs"].get(label)
                if c is None:
                    cells.append("-")
                    continue
                gap = "" if label == "plain" or c["gap_closed"] is None else f", {100 * c['gap_closed']:.0f}%"
                cells.append(f"{c['mean']:.4g}±{c['std']:.2g} ({c['where']}{gap})")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        if any(b.get("best_calibrated") for b in s["best"].values()):
            lines.append("| best calibrated | " + " | ".join(
                "-" if b["best_calibrated"] is None else
                f"{b['best_calibrated']['config']}, {100 * (b['best_calibrated']['gap_closed'] or 0):.0f}%"
                for b in s["best"].values()) + " |")
        lines.append("| fine solve | " + " | ".join(f"{b['fine']['mean']:.4g}±{b['fine']['std']:.2g}"
                                                   + ("" if b["room"] else " (no room)") for b in s["best"].values())
                     + " |")
        lines += ["", "### Verdicts against plain in the same cell (helps / ties / hurts, protocol rules), all metrics",
                  "", "| config | " + " | ".join(mres["metrics"]) + " |", "|---|" + "---|" * len(mres["metrics"])]
        for label, t in s["tally"].items():
            lines.append(f"| {label} | " + " | ".join(f"{t[m]['helps']}/{t[m]['tie']}/{t[m]['hurts']}"
                                                      + (f" ({t[m]['failed']} failed)" if t[m]["failed"] else "")
                                                      for m in mres["metrics"]) + " |")
        for ld3, against in s.get("versus_ld3", {}).items():
            lines += ["", f"### Against {ld3} in the same cell on {p} (better / ties / worse, protocol rules with "
                      "LD3's seed spread; worse at LD3's floor counts as worse). LD3 has room where its excess "
                      "is above its own seed spread: only there can a configuration be better than it. LD3 is "
                      "above the fine solve where its excess exceeds the fine solve's by more than both seed "
                      "spreads (the gap's room rule): elsewhere a sampler that follows the model's ODE can at best "
                      "tie it", "",
                      "| config | better | ties | worse | failed | LD3 has room | better where LD3 has room "
                      "| LD3 above the fine solve | better where LD3 is above the fine solve |",
                      "|---|---|---|---|---|---|---|---|---|"]
            for label, v in against.items():
                room, above = v.get("room"), v.get("above_fine")
                share = "-" if not room else f"{v['helps']}/{room} ({100 * v['helps'] / room:.0f}%)"
                share_fine = "-" if not above else \
                    f"{v['helps_above_fine']}/{above} ({100 * v['helps_above_fine'] / above:.0f}%)"
                lines.append(f"| {label} | {v['helps']} | {v['tie'] + v['n/a']} | {v['hurts']} | {v['failed']} | "
                             f"{'-' if room is None else room} | {share} | {'-' if above is None else above} | "
                             f"{share_fine} |")
        lines += ["", "### The evidence rule of `--stabilizer auto` on this model's cells", "",
                  EVIDENCE_TEXT, ""] + _evidence_table(s["evidence"])
        trades = s["trades"]
        lines += ["", "### Hidden trades: cells where a secondary metric is worse than plain beyond spread", "",
                  "A metric marked *(as the fine solve)* is no worse there than the model's own fine solve from the "
                  "same noise (the same hurts rule, against the fine solve): the plain solver's better value is its "
                  "own discretisation error, which the calibrated sampler removes. It still counts as a trade.", ""]
        lines += [f"- {k}: {', '.join(m + (' (as the fine solve)' if as_fine else '') for m, as_fine in ms.items())}"
                  for k, ms in trades.items()] or ["- none"]
        for label in s["tally"]:
            mine = [ms for k, ms in trades.items() if k.endswith("/" + label)]
            if mine:
                lines.append(f"- {label}: a trade in {len(mine)} cell{'s' * (len(mine) != 1)}, "
                             f"{sum(all(ms.values()) for ms in mine)} of them only in metrics where it is as the "
                             "fine solve")
        lines += ["", "### Calibration cost (CPU seconds per cell, the shared teacher not included) and choices", "",
                  "| config | median CPU s | max CPU s | chosen over plain |", "|---|---|---|---|"]
        for label, c in s["cost"].items():
            lines.append(f"| {label} | {c['median_cpu_s']:.1f} | {c['max_cpu_s']:.1f} | "
                         f"{c['chosen_not_plain']}/{c['fits']} |")
        lines += ["", f"### {p} per cell", "", "| solver | schedule | NFE | " + " | ".join(labels) + " |",
                  "|---|---|---|" + "---|" * len(labels)]
        keys = sorted({tuple(k.split("/")[:3]) for k in s["cells"]}, key=lambda t: (t[0], t[1], int(t[2])))
        for solver, schedule, nfe in keys:
            vals = []
            for label in labels:
                st = s["cells"].get(f"{solver}/{schedule}/{nfe}/{label}", {}).get(p)
                vals.append("failed" if st is None else f"{st['mean']:.4g}±{st['std']:.2g}")
            lines.append(f"| {solver} | {schedule} | {nfe} | " + " | ".join(vals) + " |")
        lines.append("")
    if len(summary) > 1:
        lines += ["## The evidence rule of `--stabilizer auto` over all models together", "",
                  EVIDENCE_TEXT + " Cells of configurations run on only some models count where they ran.", ""]
        lines += _evidence_table(evidence_over_models(summary)) + [""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--models", default=None,
                   help="comma-separated model names (default gmm:image64,digits; with --merge, keep only these)")
    p.add_argument("--solvers", default="dpmpp_2m,unipc")
    p.add_argument("--schedules", default="karras,logsnr")
    p.add_argument("--nfe", default="4,5,6")
    p.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                   help="comma-separated configurations (module docstring)")
    p.add_argument("--seeds", default=None, help="evaluation seeds (default: 0,1,2 for mixtures, 3,4,5 for images)")
    p.add_argument("--n", type=int, default=None,
                   help="samples per evaluation seed (default 1000 mixtures, 400 images)")
    p.add_argument("--df-shipped", action="store_true",
                   help="derivative-free: use the model's shipped calibrations instead of refitting")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--merge", nargs="+", default=None, help="merge the JSON files of earlier runs instead of running")
    p.add_argument("--json-out", default="docs/results/gradient-fit-study.json")
    p.add_argument("--markdown", default="docs/results/gradient-fit-study.md")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of text")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--log", action="store_true", help="one line per fit on standard error")
    p.add_argument("--teacher-cache", default=None,
                   help="folder where the teachers' fine solves, and the evaluation seeds' fine solves, are kept and "
                        "reused (shards of one model share them)")
    args = p.parse_args(argv)
    command = "python benchmarks/gradient_fit_study.py " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        if args.merge:
            parts = [json.load(open(f)) for f in args.merge]
            keep = None if args.models is None else set(args.models.split(","))
            models = merge_models([m for part in parts for m in part["models"] if keep is None or m["model"] in keep])
            if not models:
                raise ValueError(f"no runs of {args.models} in {', '.join(args.merge)}")
            result = {**parts[0], "models": models,
                      "command": " && ".join([*(part["command"] for part in parts), command])}
        else:
            configs = [parse_config(c) for c in args.configs.split(",") if c]
            cells = [(s, sc, int(k)) for s in args.solvers.split(",") for sc in args.schedules.split(",")
                     for k in args.nfe.split(",")]
            torch.set_num_threads(args.threads)
            result = {"schema": SCHEMA, "machine": machine_info(), "torch_threads": args.threads,
                      "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "command": command, "models": []}
            for name in (args.models or "gmm:image64,digits").split(","):
                kind_image = not name.startswith("gmm:")
                seeds = [int(s) for s in (args.seeds or ("3,4,5" if kind_image else "0,1,2")).split(",")]
                n = args.n or (400 if kind_image else 1000)
                t0 = time.perf_counter()
                res = run_model(name, cells, configs, seeds, n, args.df_shipped and kind_image, not args.no_progress,
                                args.log, args.teacher_cache)
                res["wall_s"] = time.perf_counter() - t0
                result["models"].append(res)
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    save_json(args.json_out, result)  # the raw rows first: a summary that fails loses nothing
    summary = summarize(result)
    result["summary"] = summary
    save_json(args.json_out, result)
    text = markdown(result, summary)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    if args.json:
        print(json.dumps(summary, indent=1, default=float))
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
