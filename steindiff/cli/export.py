"""``steindiff export``: a calibration's noise levels in the forms other tools take, each with a usage line.

    steindiff export cal.json --format diffusers     # sigmas= for the pipeline's own Euler scheduler
    steindiff export cal.json --format kdiffusion    # VE sigmas ending in 0
    steindiff export cal.json --format comfyui       # a list for ComfyUI's ManualSigmas node

A calibration of ``calibrate-pipeline`` records its pipeline's scheduler config and resolution shift; for another
calibration pass ``--scheduler-config`` (a scheduler_config.json, or a pipeline folder) for the diffusers format.
Other tools apply the noise levels only: where the calibration's gammas are not 1, the usage line says so.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..io import save_json
from . import UsageError, common, emit, usage_errors

FORMATS = ("diffusers", "kdiffusion", "comfyui")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a calibration's noise levels for diffusers, k-diffusion or ComfyUI",
                       description=__doc__)
    p.add_argument("calibration", metavar="CAL.json", help="a calibration file (calibrate or calibrate-pipeline)")
    p.add_argument("--format", default="all", choices=[*FORMATS, "all"], help="the target tool (all: every format)")
    p.add_argument("--scheduler-config", default=None, metavar="PATH",
                   help="the pipeline's scheduler_config.json or pipeline folder (diffusers format, when the "
                        "calibration does not record it)")
    p.add_argument("--mu", type=float, default=None,
                   help="the resolution shift of a flow scheduler with dynamic shifting (when not recorded)")
    p.add_argument("--out", default=None, metavar="FILE.json", help="also write the exports to this JSON file")
    common.add_common(p)  # --no-progress is accepted for uniformity: exporting has no long work to show
    p.set_defaults(func=run)


def _scheduler_config(path: str | None) -> dict | None:
    if path is None:
        return None
    p = Path(path)
    if p.is_dir():
        p = p / "scheduler" / "scheduler_config.json" if (p / "scheduler").is_dir() else p / "scheduler_config.json"
    try:
        cfg = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read --scheduler-config {path!r}: {e}") from None
    if not isinstance(cfg, dict):
        raise UsageError(f"--scheduler-config {path!r} is not a scheduler config (a JSON object)")
    return cfg


def run(args: argparse.Namespace) -> int:
    from ..integrations.export import export_calibration

    if not Path(args.calibration).is_file():
        raise UsageError(f"calibration file {args.calibration!r} does not exist")
    cfg = _scheduler_config(args.scheduler_config)
    common.check_outputs(args.out)
    fmts = FORMATS if args.format == "all" else (args.format,)
    with usage_errors(ValueError, TypeError):
        exports = [export_calibration(args.calibration, f, scheduler_config=cfg, mu=args.mu) for f in fmts]
    if args.out is not None:
        save_json(args.out, {"calibration": args.calibration, "exports": [e.as_dict() for e in exports]})
    lines = []
    for e in exports:
        values = e.text if e.text is not None else "[" + ", ".join(f"{v:.9g}" for v in e.sigmas) + "]"
        lines += [f"{e.format}: SIGMAS = {values}", f"  {e.usage}"]
    emit(args, {"calibration": args.calibration, "out": args.out, "exports": [e.as_dict() for e in exports]},
         "\n".join(lines))
    return 0
