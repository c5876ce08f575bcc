"""``steindiff demo``: the main job.  With the shipped digits model, compare at equal NFE the plain
solver, the calibrated sampler (SteinDiff's step scale fitted once to the model's own ODE solution;
the shipped models ship their calibrations) and the paper's literal Stein stabilizer: print the table,
write an image grid and a metric plot.  With ``--model patches`` (32x32 photo patches) the energy-matching
stabilizer joins them, and a spectrum plot shows residual noise (high frequencies up) and blur (down)."""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch

from ..calibration import calibrated_plan
from ..generate import generate
from ..io import save_json
from ..plan import make_plan
from ..plotting import figure, image_grid, save_figure
from ..schedules import SCHEDULES
from ..solvers import SOLVERS
from ..stabilizers import STABILIZERS, make_stabilizer, registry
from . import UsageError, emit
from .common import add_common, add_device, add_jacobian_batch, device_from_args, model_on_device, steps_for

DEFAULT_OUT = "demo-out"  # also in .gitignore
CALIBRATED = "calibrated"  # the demo's name for the trajectory-calibrated sampler
#: Defaults per kind of image model (``info["metrics"]``): sized for about 2 minutes on 2 CPU cores.
DEFAULTS = {"digits": {"nfe": "3,5,8", "n": 400, "stabilizers": f"none,{CALIBRATED},stein", "probes": 5},
            "patches": {"nfe": "4,8", "n": 80, "stabilizers": f"none,{CALIBRATED},stein,stein-energy", "probes": 1}}
#: Columns of the table: the first is the plotted metric.
COLUMNS = {"digits": ["digits_fid", "digits_kid", "class_tv", "precision", "recall"],
           "patches": ["patch_fd", "spectrum", "spectrum_high", "pixel_sw2"]}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo",
                       help="plain, calibrated and Stein-stabilized sampling side by side on a shipped model",
                       description=__doc__)
    p.add_argument("--model", default="digits", help="digits or patches (shipped) or a trained checkpoint directory")
    p.add_argument("--solver", default="dpmpp_2m", help=f"the solver of every row, one of: {', '.join(SOLVERS)}")
    p.add_argument("--nfe", default=None, help="comma-separated NFE budgets (default: digits 3,5,8; patches 4,8)")
    p.add_argument("--schedule", default="logsnr", choices=list(SCHEDULES), help="time schedule of every row")
    p.add_argument("--stabilizers", default=None,
                   help=f"comma-separated, from: {CALIBRATED} (the calibrated sampler), {', '.join(STABILIZERS)} "
                        f"(default: digits {DEFAULTS['digits']['stabilizers']}; patches "
                        f"{DEFAULTS['patches']['stabilizers']})")
    p.add_argument("--probes", type=int, default=None,
                   help="Hutchinson probes per step of the Stein stabilizers (default: digits 5, patches 1)")
    p.add_argument("--calibration-dir", default=None,
                   help="where calibrations not shipped with the model are cached (default: "
                        "$XDG_CACHE_HOME/steindiff/calibrations)")
    p.add_argument("--n", type=int, default=None, help="samples per configuration (metrics; default: digits 400, "
                                                        "patches 80)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (small convolutions run fastest on one thread on shared machines)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise and of the probes")
    p.add_argument("--out", default=DEFAULT_OUT,
                   help="output directory for grid.png, metrics.png, results.json (patches: spectrum.png)")
    add_jacobian_batch(p)
    add_device(p)
    add_common(p)
    p.set_defaults(func=run)


def _parse(args: argparse.Namespace, kind: str) -> tuple[list[int], list[str]]:
    """The NFE budgets and stabilizers, checked; unset options take the defaults of the kind of model."""
    for key, value in DEFAULTS[kind].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:
        nfes = [int(v) for v in args.nfe.split(",") if v]
    except ValueError:
        raise UsageError(f"--nfe must be comma-separated integers, got {args.nfe!r}") from None
    stabs = [s for s in args.stabilizers.split(",") if s]
    bad = [s for s in stabs if s not in STABILIZERS and s != CALIBRATED]
    if bad:
        raise UsageError(f"unknown stabilizer(s) {', '.join(map(repr, bad))}; choose from {CALIBRATED}, "
                         f"{', '.join(STABILIZERS)}")
    if not nfes or min(nfes) < 1 or args.n < 8 or args.probes < 1:
        raise UsageError("need at least one NFE >= 1, --n >= 8 and --probes >= 1")
    if args.solver not in SOLVERS:
        raise UsageError(f"unknown solver {args.solver!r}; choose one of {', '.join(SOLVERS)}")
    for nfe in nfes:
        steps_for(args.solver, nfe)
    return nfes, stabs


def run(args: argparse.Namespace) -> int:
    if args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    device = device_from_args(args)
    torch.set_num_threads(args.threads)
    spec = model_on_device(args.model, device)
    nfes, stabs = _parse(args, spec.info.get("metrics", "digits"))
    out = Path(args.out)
    created = [d for d in (out, *out.parents) if not d.exists()]  # removed again if the run does not finish
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create output directory {str(out)!r}: {e}") from None
    try:
        return _run(args, spec, out, nfes, stabs)
    except BaseException:  # Ctrl-C or a failure: leave no empty folder behind
        for d in created:
            with contextlib.suppress(OSError):
                d.rmdir()  # only if empty
        raise


def _run(args: argparse.Namespace, spec, out: Path, nfes: list[int], stabs: list[str]) -> int:
    from tqdm import tqdm

    from ..metrics import image_model_metrics

    kind = spec.info.get("metrics", "digits")
    t_start = time.perf_counter()
    rows, grids = [], []
    n_show = 12
    # one bar over every configuration, labelled with the one running (not one bar per solve)
    with tqdm(total=len(nfes) * len(stabs), disable=args.no_progress, desc=f"demo {args.solver}", unit="run",
              dynamic_ncols=True) as bar:
        for nfe in nfes:
            for name in stabs:
                bar.set_postfix_str(f"NFE {nfe} {name}")
                plan = make_plan(spec.process, args.solver, nfe, args.schedule)
                if name == CALIBRATED or registry.resolves_to_calibrated(name):
                    # the calibrated row is what the demo shows: fitted whatever it costs (announced with its time)
                    plan = calibrated_plan(spec, plan, cache_dir=args.calibration_dir, progress=not args.no_progress,
                                           calibrate_missing="always", notice=lambda m: bar.write(m, file=sys.stderr))
                    stab = None  # the plan's gammas
                else:
                    stab = make_stabilizer(name, spec, seed=args.seed, jacobian_batch=args.jacobian_batch,
                                           jacobian_precision=args.jacobian_precision, probes=args.probes)
                try:
                    gen = generate(spec, plan, n=args.n, seed=args.seed, stabilizer=stab)
                    x = gen.x.clamp(-1, 1)
                    m = image_model_metrics(x, spec, seed=args.seed)
                    status = "ok"
                except (FloatingPointError, ValueError, RuntimeError) as e:
                    gen, x, m, status = None, None, {}, f"failed: {e}"
                rows.append({"nfe": gen.nfe if gen else nfe, "nfe_budget": nfe, "stabilizer": name, "status": status,
                             "sigmas": plan.sigmas.tolist(), "extra_passes": gen.extra_passes if gen else None,
                             "wall_s_per_sample": gen.wall_s / args.n if gen else None,
                             "gammas": [r.get("gamma") for r in gen.trace] if gen else None, "metrics": m})
                grids.append((f"NFE {nfe} {name}",
                              x[:n_show] if x is not None else torch.zeros(n_show, *spec.sample_shape)))
                bar.update(1)
    grid_png, plot_png = out / "grid.png", out / "metrics.png"
    _save_grid(grids, grid_png)
    _save_plot(rows, nfes, stabs, plot_png, args.solver, spec.name, COLUMNS[kind][0])
    result = {"schema": "steindiff.demo/1", "model": spec.name, "solver": args.solver, "schedule": args.schedule,
              "n": args.n, "seed": args.seed, "probes": args.probes, "device": str(spec.device or "cpu"),
              "rows": rows, "grid": str(grid_png), "plot": str(plot_png)}
    written = [grid_png, plot_png]
    if kind == "patches":
        result["spectrum_plot"] = str(out / "spectrum.png")
        written.append(_save_spectrum(rows, nfes, stabs, out / "spectrum.png", f"{spec.name}, {args.solver}"))
    result["wall_s"] = time.perf_counter() - t_start
    save_json(out / "results.json", result)
    emit(args, result, _table(rows, args, spec.name, COLUMNS[kind]) + f"\nwrote {', '.join(map(str, written))}, "
         f"{out / 'results.json'} ({result['wall_s']:.0f} s)")
    return 0


def _table(rows: list[dict], args: argparse.Namespace, model: str, cols: list[str]) -> str:
    # the patches grid waits for GPU-trained weights (README, "Photographs: the patches model")
    results = ("docs/results/calibrated-digits.md" if cols[0] == "digits_fid"
               else "not measured yet for this model (README, 'Photographs: the patches model')")
    auto = " (what --stabilizer auto runs)" if registry.AUTO == registry.CALIBRATED else ""
    head = (f"{model}, {args.solver} / {args.schedule}, {args.n} samples per row; floors: real vs real. "
            f"calibrated{auto}: fitted once per NFE (shipped with the model), no extra pass; stein: the paper's "
            f"Algorithm 1 ({args.probes} Hutchinson probe(s) per step). Where calibration helps and where it does "
            f"not, over every solver and schedule: {results}")
    lines = [head, f"{'NFE':>4} {'stabilizer':14s} {'+JVP':>5} " + " ".join(f"{c:>10s}" for c in cols) + "  gammas"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"{r['nfe']:>4} {r['stabilizer']:14s} {r['status']}")
            continue
        g = " ".join(f"{v:.2f}" for v in r["gammas"]) if r["gammas"] else "1 (plain)"
        lines.append(f"{r['nfe']:>4} {r['stabilizer']:14s} {r['extra_passes']:>5} "
                     + " ".join(f"{r['metrics'][c]:>10.4f}" for c in cols) + f"  {g}")
    ok = next((r for r in rows if r["status"] == "ok"), None)
    if ok:
        lines.append(f"{'':4} {'floor':14s} {'':5} " + " ".join(f"{ok['metrics'][c + '_floor']:>10.4f}" for c in cols))
    return "\n".join(lines)


def _save_grid(grids, path: Path) -> None:
    fig, axes = figure(len(grids), 1, figsize=(6, 0.75 * len(grids) + 0.3), squeeze=False)
    for ax, (label, x) in zip(axes[:, 0], grids):
        ax.imshow(image_grid(x.cpu(), nrow=x.shape[0]), cmap="gray", vmin=0, vmax=255)
        ax.set_axis_off()
        ax.set_title(label, fontsize=7, loc="left")
    fig.tight_layout()
    save_figure(fig, path, dpi=150)


def _save_plot(rows, nfes, stabs, path: Path, solver: str, model: str, metric: str) -> None:
    fig, ax = figure(figsize=(5, 3.5))
    for name in stabs:
        pts = [(r["nfe"], r["metrics"][metric]) for r in rows if r["stabilizer"] == name and r["status"] == "ok"]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=name)
    floor = next((r["metrics"][f"{metric}_floor"] for r in rows if r["status"] == "ok"), None)
    if floor is not None:
        ax.axhline(floor, color="gray", ls="--", label="real vs real")
    ax.set_yscale("log")
    ax.set_xlabel("NFE")
    ax.set_ylabel({"digits_fid": "digits-FID", "patch_fd": "patch-FD"}.get(metric, metric) + " (lower is better)")
    ax.set_title(f"{model}, {solver}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def _save_spectrum(rows, nfes, stabs, path: Path, title: str) -> Path:
    """Per NFE, the log10 power ratio of the samples to the held-out patches in each frequency band
    (:func:`~steindiff.metrics.patches.spectrum_error`): above 0 residual noise, below 0 blur."""
    fig, axes = figure(1, len(nfes), figsize=(3.2 * len(nfes), 3), squeeze=False, sharey=True)
    for ax, nfe in zip(axes[0], nfes):
        for name in stabs:
            r = next((r for r in rows if r["stabilizer"] == name and r["nfe_budget"] == nfe and r["status"] == "ok"),
                     None)
            if r is not None:
                bands = r["metrics"]["spectrum_bands"]
                ax.plot([(i + 0.5) / (2 * len(bands)) for i in range(len(bands))], bands, marker="o", ms=3, label=name)
        ax.axhline(0, color="gray", ls="--", label="held-out real")
        ax.set_title(f"NFE {nfe}", fontsize=9)
        ax.set_xlabel("frequency (cycles / pixel)")
    axes[0][0].set_ylabel("log10 power / real")
    axes[0][0].legend(fontsize=6)
    fig.suptitle(f"{title}: power spectrum against real patches (up: noise, down: blur)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    return path
