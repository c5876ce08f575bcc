"""``steindiff bench``: the benchmark protocol's grid on the mixture suite and on the digits and patches U-Nets.

Runs every configuration model x seed x solver x schedule x NFE x stabilizer x coords (lists are
comma-separated), then writes the ``steindiff.bench/1`` results (``--json-out FILE``; ``--json`` prints
them to stdout instead of the text summary), a Markdown report (``--markdown FILE``) and PNG plots
(``--plots DIR``).  ``--cost`` measures wall-clock ratios stabilizer/none side by side instead of
running the grid (stein at each ``--cost-probes`` count, repeats interleaved, medians; on CUDA also
the peak memory, ``torch.cuda.max_memory_allocated``, and its ratio to none; results under ``"cost"``).  ``--from FILE``
rebuilds the report and plots from saved results without sampling.  Every name and output path is checked before any
work (exit code 2); a configuration that fails is recorded in its row (``status``), not fatal.  Exit codes: 0 success, 1
runtime failure, 2 usage.

Models: exact-score mixtures (``gmm:<preset>``; float64 states, metrics against the true
distribution, primary metric sw2) or ``digits`` and ``patches`` (the shipped 8x8 digits and 32x32
photo-patch U-Nets, or checkpoint folders trained on their data; float32 states, image metrics against
the held-out images, primary metric digits_fid or patch_fd, trajectory reference of at most 100 steps;
stein-oracle and stein-exact need a mixture and are refused).  The small U-Nets run fastest on one thread on a
shared CPU: OMP_NUM_THREADS=1.
"""

from __future__ import annotations

import argparse
import json
import shlex
import time
from pathlib import Path
from typing import Any

from ..bench.peers import PEERS, PREFIX
from ..gradient_fit import DEFAULT_PARAMS, FIT_METHODS, PARAMS, STARTS, check_param_sets, params_record
from ..io import save_json, to_jsonable
from ..schedules import SCHEDULES
from ..solvers import SOLVERS
from ..stabilizers import STABILIZERS
from ..trajectory import check_guards
from . import UsageError, common, usage_errors

PROTOCOL_SOLVERS = "euler,heun,dpmpp_2m,dpmpp_3m,unipc,ipndm"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="run the benchmark grid on exact-score mixtures or the shipped U-Nets",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", "--models", dest="models", default="gmm:image64",
                   help="comma-separated gmm:<preset> names, digits, patches or a checkpoint folder")
    p.add_argument("--solvers", default=PROTOCOL_SOLVERS, help=f"comma-separated, from: {', '.join(SOLVERS)}")
    p.add_argument("--nfe", default="3,4,5,6,8,10", help="comma-separated NFE budgets")
    p.add_argument("--schedules", default="karras,logsnr", help=f"comma-separated, from: {', '.join(SCHEDULES)}")
    p.add_argument("--coords", default="ve,vp", help="stabilizer coordinates, comma-separated: ve, vp")
    p.add_argument("--stabilizers", default="none,stein,stein-sc,stein-oracle",
                   help=f"comma-separated, from: {', '.join(STABILIZERS)}, cal:trajectory (the calibrated sampler: "
                        "the model's shipped calibration, else fitted once per cell on other noise; auto is this one, "
                        "as in `sample --stabilizer auto`), or cal:<stabilizer> (its gamma schedule calibrated on "
                        "another batch, then applied), or peer:<name> (as --peers)")
    p.add_argument("--peers", default=None, metavar="NAME[,NAME...]",
                   help="learned-schedule peers to run beside the grid, rows labelled peer:<name>, fitted per cell "
                        f"from the calibration noise and fine solve that cal:trajectory uses, from: {', '.join(PEERS)}")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (initial noise and probes)")
    p.add_argument("--n", type=int, default=1000, help="samples per configuration")
    p.add_argument("--probes", type=int, default=5, help="Hutchinson probes per step for stein")
    p.add_argument("--mmd", action="store_true", help="also compute the RBF MMD and its floor")
    p.add_argument("--ref-solver", default="dpmpp_3m", help="solver of the trajectory reference")
    p.add_argument("--ref-steps", type=int, default=1000,
                   help="steps of the trajectory reference (Karras; at most 100 for image models)")
    p.add_argument("--calibration-dir", default=None, metavar="DIR",
                   help="cal:trajectory: cache the fitted calibrations here (reused when present; the format of "
                        "`sample --stabilizer auto`'s cache); default: a temporary folder")
    p.add_argument("--calibration-solves", type=int, default=None, metavar="N",
                   help="cal:trajectory: solves of the refinement per cell (default: 200 for mixtures, 120 for image "
                        "models)")
    p.add_argument("--calibration-seconds", type=float, default=None, metavar="S",
                   help="cal:trajectory: time budget of the refinement per cell, which stops it first on a slow "
                        "machine (default: 45 for mixtures, 40 for image models); raise it for a fit that ends on "
                        "--calibration-solves alone, the same on every machine")
    p.add_argument("--calibration-guards", default=None, metavar="G[,G...]",
                   help="cal:trajectory: the checks a fitted candidate must pass to replace the plain solver, as "
                        "`steindiff calibrate --guards` takes them (default: the fit method's, docs/guards.md)")
    p.add_argument("--fit-method", default=None, choices=FIT_METHODS,
                   help="cal:trajectory: how the calibration is fitted (default: derivative-free, as --stabilizer "
                        "auto; gradient: backpropagation through the solve, for models with gradients)")
    p.add_argument("--fit-params", default=None, metavar="P[,P...][/P,...]",
                   help=f"cal:trajectory with --fit-method gradient: what to fit, from {', '.join(PARAMS)} (default "
                        f"{','.join(DEFAULT_PARAMS)}; several sets separated by /, each a candidate)")
    p.add_argument("--fit-start", default=None, choices=STARTS,
                   help="cal:trajectory with --fit-method gradient: where the fit starts (default gits: the levels "
                        "GITS finds on the teacher's trajectories, also a candidate; plain: the plain schedule's)")
    p.add_argument("--cost", action="store_true", help="measure wall-clock ratios stabilizer/none instead of the grid "
                   "(first schedule and coords, first seed)")
    p.add_argument("--cost-probes", default="1,5", help="probe counts of stein for --cost")
    p.add_argument("--repeats", type=int, default=5, help="interleaved repeats for --cost")
    common.add_jacobian_batch(p)
    common.add_device(p)
    p.add_argument("--from", dest="from_file", default=None, metavar="FILE[,FILE...]",
                   help="read results from FILE (a steindiff.bench/1 JSON) instead of running; several files, "
                        "comma-separated, are shards of one grid (e.g. one per solver, run in parallel) and are merged")
    p.add_argument("--json-out", default=None, metavar="FILE", help="write the results JSON to FILE ('-': stdout)")
    p.add_argument("--json", action="store_true", help="print the results JSON instead of the text summary")
    p.add_argument("--markdown", default=None, metavar="FILE", help="write the Markdown report")
    p.add_argument("--plots", default=None, metavar="DIR", help="write PNG plots into DIR (created if missing)")
    p.add_argument("--title", default=None, help="title of the Markdown report")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run)


def _list(value: str, what: str, kind=str) -> list:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise UsageError(f"--{what}: empty list")
    try:
        return [kind(v) for v in items]
    except ValueError:
        raise UsageError(f"--{what}: expected comma-separated {kind.__name__} values, got {value!r}") from None


def run(args: argparse.Namespace) -> int:
    from ..bench import SCHEMA, merge_results, run_cost, run_grid, summarize, validate_grid, write_markdown, write_plots
    from ..bench.runner import machine_info

    common.check_outputs(*(p for p in (args.json_out, args.markdown) if p != "-"))
    common.check_output_dir(args.plots, "--plots")
    common.check_output_dir(args.calibration_dir, "--calibration-dir")
    if args.from_file is not None:
        shards = []
        for path in args.from_file.split(","):
            try:
                shard = json.loads(Path(path).read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise UsageError(f"--from {path!r}: {e}") from None
            if not isinstance(shard, dict) or shard.get("schema") != "steindiff.bench/1":
                raise UsageError(f"--from {path!r}: not a steindiff.bench/1 results file")
            shards.append(shard)
        try:
            result = merge_results(shards)
        except ValueError as e:
            raise UsageError(f"--from: {e}") from None
        if len(shards) > 1:  # the shards' commands, then this merge
            merge = _spell(["steindiff", "bench", "--from", args.from_file], _outputs(args))
            result["command"] = "\n".join(filter(None, [result.get("command"), merge]))
    else:
        grid = dict(models=_list(args.models, "model"), solvers=_list(args.solvers, "solvers"),
                    nfes=_list(args.nfe, "nfe", int), schedules=_list(args.schedules, "schedules"),
                    coords=_list(args.coords, "coords"), stabilizers=_list(args.stabilizers, "stabilizers"),
                    seeds=_list(args.seeds, "seeds", int))
        if args.peers is not None:
            peers = [PREFIX + p for p in _list(args.peers, "peers")]
            grid["stabilizers"] += [p for p in peers if p not in grid["stabilizers"]]
        cost_probes = _list(args.cost_probes, "cost-probes", int)
        if args.ref_solver not in SOLVERS:
            raise UsageError(f"--ref-solver: unknown solver {args.ref_solver!r}")
        if args.ref_steps < 1 or args.repeats < 1 or min(cost_probes) < 1:
            raise UsageError("--ref-steps, --repeats and --cost-probes must be >= 1")
        calibration = {}
        if args.calibration_solves is not None:
            if args.calibration_solves < 1:
                raise UsageError(f"--calibration-solves must be >= 1, got {args.calibration_solves}")
            calibration["max_solves"] = args.calibration_solves
        if args.calibration_seconds is not None:
            if not args.calibration_seconds > 0 or args.calibration_seconds == float("inf"):
                raise UsageError(f"--calibration-seconds must be a positive number, got {args.calibration_seconds}")
            calibration["max_seconds"] = args.calibration_seconds
        if args.calibration_guards is not None:
            with usage_errors(ValueError):
                calibration["guards"] = list(check_guards(args.calibration_guards))
        for flag, v in (("--fit-params", args.fit_params), ("--fit-start", args.fit_start)):
            if v is not None and args.fit_method != "gradient":
                raise UsageError(f"{flag} needs --fit-method gradient")
        if args.fit_method == "gradient":
            with usage_errors(ValueError):
                calibration.update(fit_method="gradient",
                                   params=params_record(check_param_sets(args.fit_params or DEFAULT_PARAMS)))
            if args.fit_start is not None:
                calibration["gradient_options"] = {"start": args.fit_start}
        device = common.device_from_args(args)
        with usage_errors(ValueError, TypeError):
            validate_grid(grid["models"], grid["solvers"], grid["nfes"], grid["schedules"], grid["coords"],
                          grid["stabilizers"], grid["seeds"], args.n, args.probes, jacobian_batch=args.jacobian_batch,
                          jacobian_precision=args.jacobian_precision)
        progress = not args.no_progress
        if args.cost:
            machine, t0 = machine_info(device), time.perf_counter()
            entries = run_cost(grid["models"], grid["solvers"], grid["nfes"], grid["schedules"][0], grid["stabilizers"],
                               cost_probes, args.n, args.repeats, grid["coords"][0], grid["seeds"][0], progress,
                               device=device, jacobian_batch=args.jacobian_batch,
                               jacobian_precision=args.jacobian_precision, calibration=calibration or None)
            machine["wall_s_total"] = time.perf_counter() - t0
            result = {"schema": SCHEMA, "machine": machine,
                      "config": {**grid, "n": args.n, "cost_probes": cost_probes, "repeats": args.repeats},
                      "rows": [], "cost": entries}
        else:
            result = run_grid(**grid, n=args.n, probes=args.probes, progress=progress, mmd=args.mmd,
                              ref_solver=args.ref_solver, ref_steps=args.ref_steps, device=device,
                              jacobian_batch=args.jacobian_batch, jacobian_precision=args.jacobian_precision,
                              calibration_dir=args.calibration_dir, calibration=calibration or None)
        result["command"] = _command(args)
    summary = summarize(result)
    if args.json_out not in (None, "-"):
        save_json(args.json_out, result)
    if args.markdown is not None:
        write_markdown(args.markdown, result, summary, title=args.title, command=result.get("command"))
    plots = write_plots(result, summary, args.plots) if args.plots is not None else []
    if args.json or args.json_out == "-":
        print(json.dumps(to_jsonable(result), indent=1))
    else:
        print(_text(result, summary, args, plots))
    return 0


def _text(result: dict, summary: dict, args: argparse.Namespace, plots: list[str]) -> str:
    rows = result.get("rows", [])
    failed = sum(r["status"] != "ok" for r in rows)
    lines = [f"steindiff bench: {len(rows)} configurations ({failed} failed), {len(summary['cells'])} cells"]
    for model, per in summary["counts"].items():
        p = summary["primary"].get(model, "sw2")
        for label, d in per.items():
            s = d.get(p)
            if s:
                lines.append(f"  {model} {label:16s} excess {p} vs vanilla: {s['helps']} helps, {s['tie']} ties "
                             f"({s['at_floor']} at floor), {s['hurts']} hurts, {s['failed']} failed")
    for e in summary["cost"].get("side_by_side", []):
        if e["stabilizer"] != "none":
            p = f" P={e['probes']}" if e["probes"] else ""
            mem = f", peak memory {e['mem_ratio']:.2f}x none" if e.get("mem_ratio") is not None else ""
            lines.append(f"  cost {e['model']} {e['solver']} NFE {e['nfe_budget']} {e['stabilizer']}{p}: "
                         f"{e['ratio']:.2f}x none{mem}" if e["ratio"] is not None
                         else f"  cost {e['stabilizer']}{p}: {e['status']}")
    for path in (args.json_out, args.markdown):
        if path not in (None, "-"):
            lines.append(f"  wrote {path}")
    if plots:
        lines.append(f"  wrote {len(plots)} plots into {args.plots}")
    return "\n".join(lines)


def _command(args: argparse.Namespace) -> str:
    """The command line that regenerates these results (every grid option spelled out)."""
    opts = [("--model", args.models), ("--solvers", args.solvers), ("--nfe", args.nfe), ("--schedules", args.schedules),
            ("--coords", args.coords), ("--stabilizers", args.stabilizers), ("--peers", args.peers),
            ("--seeds", args.seeds), ("--n", args.n)]
    if args.cost:
        opts += [("--cost", True), ("--cost-probes", args.cost_probes), ("--repeats", args.repeats)]
    else:
        opts += [("--probes", args.probes), ("--ref-solver", args.ref_solver), ("--ref-steps", args.ref_steps),
                 ("--mmd", args.mmd)]
    opts += [("--jacobian-batch", args.jacobian_batch),
             ("--jacobian-precision", None if args.jacobian_precision == "fp32" else args.jacobian_precision),
             ("--device", None if args.device == "auto" else args.device),
             ("--calibration-dir", args.calibration_dir), ("--calibration-solves", args.calibration_solves),
             ("--calibration-seconds", args.calibration_seconds), ("--fit-method", args.fit_method),
             ("--fit-params", args.fit_params), ("--fit-start", args.fit_start)]
    return _spell(["steindiff", "bench"], opts + _outputs(args))


def _outputs(args: argparse.Namespace) -> list[tuple[str, str | None]]:
    return [("--json-out", args.json_out), ("--markdown", args.markdown), ("--plots", args.plots),
            ("--title", args.title)]


def _spell(head: list[str], opts: list[tuple[str, Any]]) -> str:
    """``head`` and ``opts`` as one shell-quoted command line: an option set to True is a flag, one set to
    None or False is left out."""
    parts = list(head)
    for opt, v in opts:
        if v is True:
            parts.append(opt)
        elif v is not None and v is not False:
            parts += [opt, str(v)]
    return " ".join(shlex.quote(p) for p in parts)
