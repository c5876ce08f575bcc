"""``steindiff calibrations``: the calibrations shipped with the models and those in the cache, with what each
was fitted for (model, solver, schedule, NFE, options), when, how long it took and where it is.
``--stabilizer auto`` uses one when the model, solver, schedule, NFE and options of the run match it; the
shipped models sample, unless told otherwise, with a configuration that ships one (listed first)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from . import common, emit


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrations", help="list the shipped and cached calibrations (what --stabilizer auto uses)",
                       description=__doc__)
    p.add_argument("--model", default=None,
                   help="only this model's: digits, patches, gmm:<preset> or a checkpoint folder (default: all)")
    p.add_argument("--calibration-dir", default=None,
                   help="the cache to list (default: $XDG_CACHE_HOME/steindiff/calibrations)")
    common.add_common(p)
    p.set_defaults(func=run)


def _declared(folder: Path) -> dict | None:
    """A model folder's ``sampling_defaults.json`` (``None`` when it has none or it is unreadable)."""
    from ..models.trained import SAMPLING_DEFAULTS_FILE

    try:
        return json.loads((folder / SAMPLING_DEFAULTS_FILE).read_text())
    except (OSError, ValueError):
        return None


def run(args: argparse.Namespace) -> int:
    from ..calibration import default_cache_dir, list_calibrations, options_summary
    from ..models.trained import SHIPPED

    cache = Path(args.calibration_dir) if args.calibration_dir is not None else default_cache_dir()
    models = dict(SHIPPED)  # model name -> its folder (calibrations/, sampling_defaults.json)
    wanted = None
    if args.model is not None:
        wanted = args.model if args.model in SHIPPED or args.model.startswith("gmm:") else os.fspath(Path(args.model))
        models = {wanted: SHIPPED.get(wanted, Path(wanted))} if not wanted.startswith("gmm:") else {}
    rows = []
    for name, folder in models.items():
        rows += list_calibrations(folder / "calibrations", "shipped" if name in SHIPPED else "model folder")
    rows += list_calibrations(cache, "cache")
    if wanted is not None:
        rows = [r for r in rows if r.get("model") in (wanted, args.model) or (
            "error" in r and r["where"] != "cache")]
    defaults = {}
    for name, folder in models.items():
        d = _declared(folder)
        if d is not None:
            ships = any(r.get("model") == name and r["where"] != "cache"
                        and all(r.get(k) == d.get(k) for k in ("solver", "schedule", "nfe")) for r in rows)
            defaults[name] = {**d, "ships_calibration": ships}
    summary = {"cache": str(cache), "sampling_defaults": defaults, "calibrations": rows}
    lines = [f"calibrations shipped with the models and cached in {cache}: --stabilizer auto uses one when the run's "
             "model, solver, schedule, NFE and options match it"]
    for name, d in defaults.items():
        ships = "a calibration ships for it" if d["ships_calibration"] else "no calibration ships for it"
        lines.append(f"  {name} samples with {d.get('solver')} / {d.get('schedule')} / NFE {d.get('nfe')} unless told "
                     f"otherwise ({ships})")
    if not rows:
        lines.append("none" + (f" for {args.model}" if args.model else ""))
    folder = None
    for r in rows:
        if str(Path(r["path"]).parent) != folder:
            folder = str(Path(r["path"]).parent)
            lines += ["", f"{r['where']}: {folder}",
                      f"  {'model':10s} {'solver':9s} {'schedule':8s} {'NFE':>3s} {'kept':16s} {'fitted':25s} "
                      f"{'took':>7s}  options"]
        if "error" in r:
            lines.append(f"  unreadable: {r['error']}")
            continue
        took = f"{r['wall_s']:.0f} s" if isinstance(r.get("wall_s"), (int, float)) else "-"
        kept, fitted = r.get("chosen") or r.get("objective"), r.get("fitted_at") or "not recorded"
        lines.append(f"  {str(r['model']):10s} {str(r['solver']):9s} {str(r['schedule']):8s} {str(r['nfe']):>3s} "
                     f"{str(kept):16s} {fitted:25s} {took:>7s}  {options_summary(r['options'])}")
    emit(args, summary, "\n".join(lines))
    return 0
