#!/usr/bin/env python
"""Wall time, CPU time and peak memory of whole ``steindiff calibrate`` runs, each in its own process under
``/usr/bin/time -v``, one after another: what one calibration costs a user on this machine.

Each run's process wall time and peak resident memory come from ``/usr/bin/time``; the calibration's own wall
and CPU time, its reference solve's wall time, the kept candidate and the validation ratio from the calibration
record (``--json``).  Run it with nothing else on the machine: the figures are absolute times.

    python benchmarks/calibration_time.py --out docs/results/calibration-time-digits-gradient-cpu.json \\
        -- "--model digits --solver dpmpp_2m --nfe 4 --fit-method gradient --start plain" \\
           "--model digits --solver dpmpp_2m --nfe 4 --fit-method gradient"
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

SCHEMA = "steindiff.calibration-time/1"


def timed(args: list[str], threads: int) -> dict:
    """One ``steindiff calibrate`` run (``args`` after ``calibrate``) under ``/usr/bin/time -v``."""
    with tempfile.TemporaryDirectory(prefix="steindiff-time-") as tmp:
        cmd = ["/usr/bin/time", "-v", "steindiff", "calibrate", *args, "--out", str(Path(tmp) / "c.json"),
               "--no-progress", "--json"]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed ({p.returncode}):\n{p.stderr[-2000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", p.stderr).group(1)
    secs = sum(float(v) * 60**i for i, v in enumerate(reversed(wall.split(":"))))
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1))
    cal = json.loads(p.stdout)["calibration"]
    return {"command": shlex.join(["/usr/bin/time", "-v", "steindiff", "calibrate", *args, "--out", "FILE",
                                   "--no-progress", "--json"]),
            "start": cal.get("start", {}).get("name"), "params": cal.get("params"), "process_wall_s": secs,
            "calibration_wall_s": cal["wall_s"], "calibration_cpu_s": cal["cpu_s"],
            "reference_wall_s": cal["reference"]["wall_s"], "max_rss_mb": rss_kb / 1024, "chosen": cal["chosen"],
            "val_ratio": cal["val_ratio"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("runs", nargs="+", help="the arguments of each `steindiff calibrate` run, one quoted string each")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: every core)")
    p.add_argument("--what", default="wall and CPU time of whole steindiff calibrate runs, one at a time")
    p.add_argument("--out", required=True, help="the JSON file to write")
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of one line per run")
    args = p.parse_args(argv)
    runs = []
    for r in args.runs:
        runs.append(timed(shlex.split(r), args.threads))
        if not args.json:
            x = runs[-1]
            print(f"{r}: {x['calibration_wall_s']:.0f} s wall, {x['calibration_cpu_s']:.0f} s CPU, "
                  f"{x['max_rss_mb']:.0f} MB peak, kept {x['chosen']}", flush=True)
    given = argv if argv is not None else sys.argv[1:]
    result = {"schema": SCHEMA, "what": args.what,
              "command": shlex.join(["python", "benchmarks/calibration_time.py", *given]),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": args.threads,
                          "gpu": None},
              "runs": runs}
    from steindiff.io import save_json
    save_json(args.out, result)
    if args.json:
        print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
