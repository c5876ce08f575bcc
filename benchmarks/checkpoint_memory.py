#!/usr/bin/env python
"""Peak memory of the gradient fit's backward pass with and without per-step checkpointing.

Each setting runs in a fresh process: a few Adam steps of ``steindiff.gradient_fit.gradient_fit`` on a model's
calibration-like noise (the teacher's samples replaced by the plain solve's: memory does not depend on them),
and the process's peak resident memory above what it held before the fit is reported (on CUDA,
``torch.cuda.max_memory_allocated``), with the CPU seconds per Adam step.

    python benchmarks/checkpoint_memory.py --model digits --solver unipc --nfe 6 --batch 128
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def one(model: str, solver: str, nfe: int, batch: int, iters: int, checkpoint: bool, device: str) -> dict:
    import torch

    import steindiff as sd
    from steindiff.gradient_fit import gradient_fit
    from steindiff.models.registry import load_model

    torch.set_num_threads(1)
    spec = load_model(model).to(device)
    dtype = torch.float64 if spec.gmm is not None else torch.float32
    base = sd.make_plan(spec.process, solver, nfe, "karras")
    noise = sd.prior_noise((batch + 8, *spec.sample_shape), float(base.sigmas[0]), spec.process, seed=0, dtype=dtype,
                           device=device)
    with torch.no_grad():
        target = sd.sample(spec.denoiser, noise, base.sigmas, solver).x
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.process_time()
    gradient_fit(spec.denoiser, base, noise[:batch], target[:batch], val_noise=noise[batch:], val_target=target[batch:],
                 sigma_floor=float(spec.process.sigma_min), params="steps,gamma,model_sigmas,history", max_iters=iters,
                 batch_size=batch, val_every=iters, checkpoint=checkpoint, max_seconds=1e9)
    cpu = (time.process_time() - t0) / iters
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024  # Linux: KiB
    return {"checkpoint": checkpoint, "peak_extra_bytes": int(peak), "cpu_s_per_step": cpu}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--model", default="digits")
    p.add_argument("--solver", default="unipc")
    p.add_argument("--nfe", type=int, default=6)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--one", choices=["on", "off"], help=argparse.SUPPRESS)  # a child process's setting
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.model, args.solver, args.nfe, args.batch, args.iters, args.one == "on", args.device)))
        return 0
    rows = []
    for setting in ("off", "on"):
        cmd = [sys.executable, __file__, "--one", setting, "--model", args.model, "--solver", args.solver, "--nfe",
               str(args.nfe), "--batch", str(args.batch), "--iters", str(args.iters), "--device", args.device]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(out.stderr, file=sys.stderr)
            return 1
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    meta = {k: getattr(args, k) for k in ("model", "solver", "nfe", "batch", "iters", "device")}
    if args.json:
        print(json.dumps({"meta": meta, "rows": rows}, indent=1))
    else:
        print(f"gradient fit of {args.model}, {args.solver} at NFE {args.nfe}, batch {args.batch}, {args.device}:")
        for r in rows:
            print(f"  checkpoint {'on ' if r['checkpoint'] else 'off'}: peak memory above the model's "
                  f"{r['peak_extra_bytes'] / 2**20:7.1f} MiB, {r['cpu_s_per_step']:.2f} CPU s per Adam step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
