"""``jacobian_precision`` (issue 10): the bf16 Jacobian pass against fp32, on the CPU, in one process.

    python benchmarks/jacobian_precision.py --out /tmp/jp.json          # about a minute on 2 CPU cores

1. ``accuracy``: along a plain dpmpp_2m trajectory (NFE 5, Karras), at each step's input state, the
   one-probe Hutchinson estimate of ``div T`` (what ``stein`` with ``probes=1`` uses) from the stabilizer's
   own Jacobian pass, in fp32 and in bf16 with the same probe, for ``--draws`` probe draws.  Per step: the
   probe spread (standard deviation over the draws) of a sample's estimate and of the batch mean (the
   statistic ``gamma`` uses), and the fp32-bf16 difference against it.  A Hutchinson estimate is a
   Monte-Carlo estimate: the bf16 rounding is worth it only while it stays small next to this spread.
   Models: the shipped ``digits`` U-Net (1x8x8) and a randomly initialized small U-Net (3x16x16).
2. ``gamma``: full stein P=1 solves, fp32 against bf16 on the same probes, and the spread of gamma over
   probe seeds in fp32.
3. ``timing``: plain, stein VJP P=1 fp32 and bf16 on the small U-Net, side by side (interleaved
   repeats, medians), ratios to plain, of the wall time and of the process's CPU time (``time.process_time``,
   which other processes on a shared machine disturb less).  CPU bf16 may be slower than fp32 (no bf16 units
   on most CPUs): the numbers that matter come from a GPU (``benchmarks/gpu_check.py``).

Runs from a checkout: the repository root is put on ``sys.path``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

SMALL_UNET = dict(in_channels=3, model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_levels=(1,))


def build(name: str):
    """``(denoiser, process, sample shape)`` of ``digits`` or the small random U-Net."""
    from steindiff.models import EDMPrecond, UNet, UNetConfig
    from steindiff.noise import VEProcess

    if name == "digits":
        from steindiff.models.checkpoint import build_denoiser, load_checkpoint
        from steindiff.models.trained import DIGITS_DIR

        net, config = load_checkpoint(DIGITS_DIR)
        den, process = build_denoiser(net, config)
        return den.eval().requires_grad_(False), process, tuple(config["data"]["shape"])
    torch.manual_seed(0)
    net = UNet(UNetConfig(**SMALL_UNET))
    for m in net.modules():  # weights for the zero-initialized output layers: a non-trivial network
        if isinstance(m, torch.nn.Conv2d) and not bool(m.weight.any()):
            m.reset_parameters()
    return EDMPrecond(net, sigma_data=0.5).eval().requires_grad_(False), VEProcess(0.002, 80.0), (3, 16, 16)


def _setup(name: str, n: int):
    from steindiff import get_sigmas, prior_noise

    den, process, shape = build(name)
    sigmas = get_sigmas("karras", 5, process)  # dpmpp_2m at NFE 5
    x = prior_noise((n, *shape), float(sigmas[0]), process, seed=0)
    return den, sigmas, x


def accuracy(name: str, n: int, draws: int) -> dict:
    from steindiff.sampling import steps
    from steindiff.stabilizers import SteinStabilizer

    den, sigmas, x = _setup(name, n)
    rows = []
    for ev in steps(den, x, sigmas, "dpmpp_2m"):
        q = {}
        for prec in ("fp32", "bf16"):  # the same seeds: the same probes in both precisions
            stabs = [SteinStabilizer(probes=1, seed=r, jacobian_precision=prec) for r in range(draws)]
            q[prec] = torch.stack([s._run_operator(ev.op, ev.x)[1] for s in stabs])  # (draws, n), float64
        d = (q["bf16"] - q["fp32"]).abs()
        spread = q["fp32"].std(0)  # per sample, over the probe draws
        m32, m16 = q["fp32"].mean(1), q["bf16"].mean(1)  # batch means, per draw
        spread_mean = float(m32.std())
        rows.append({
            "step": ev.i, "sigma": ev.op.sigma, "div_mean": float(m32.mean()),
            "probe_spread_sample_median": float(spread.median()),
            "probe_spread_batch_mean": spread_mean,
            "diff_sample_median": float(d.median()), "diff_sample_max": float(d.max()),
            "rel_diff_sample_median": float((d / q["fp32"].abs()).median()),
            "diff_over_spread_sample_median": float((d / spread).median()),
            "diff_over_spread_sample_max": float((d / spread).max()),
            "diff_batch_mean_max": float((m16 - m32).abs().max()),
            "diff_over_spread_batch_mean_max": float((m16 - m32).abs().max()) / spread_mean,
        })
    return {"model": name, "n": n, "draws": draws, "steps": rows,
            "max_diff_over_spread_sample": max(r["diff_over_spread_sample_max"] for r in rows),
            "max_diff_over_spread_batch_mean": max(r["diff_over_spread_batch_mean_max"] for r in rows)}


def gammas(name: str, n: int, seeds: int) -> dict:
    from steindiff import sample
    from steindiff.stabilizers import make_stabilizer

    den, sigmas, x = _setup(name, n)

    def run(prec: str, seed: int) -> list[float]:
        stab = make_stabilizer("stein", None, probes=1, seed=seed, jacobian_precision=prec)
        return [r["gamma"] for r in sample(den, x, sigmas, "dpmpp_2m", stabilizer=stab).trace]

    g32 = [run("fp32", s) for s in range(seeds)]
    g16 = run("bf16", 0)
    spread = [statistics.stdev(col) for col in zip(*g32)]
    diff = [abs(a - b) for a, b in zip(g16, g32[0])]
    return {"model": name, "n": n, "seeds": seeds, "gamma_fp32_seed0": g32[0], "gamma_bf16_seed0": g16,
            "gamma_spread_over_seeds_fp32": spread, "abs_diff": diff,
            "diff_over_spread": [d / s if s > 0 else None for d, s in zip(diff, spread)]}


def timing(n: int, repeats: int) -> dict:
    from steindiff import sample
    from steindiff.stabilizers import make_stabilizer

    den, sigmas, x = _setup("unet", n)
    variants = {"plain": None, "stein_vjp_p1": "fp32", "stein_vjp_p1_bf16": "bf16"}
    times: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    for rnd in range(repeats + 1):  # round 0: warm-up, untimed
        for k, prec in variants.items():
            stab = None if prec is None else make_stabilizer("stein", None, probes=1, jacobian_precision=prec)
            t0, c0 = time.perf_counter(), time.process_time()
            sample(den, x, sigmas, "dpmpp_2m", stabilizer=stab)
            if rnd:
                times[k].append(time.perf_counter() - t0)
                cpu[k].append(time.process_time() - c0)
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    return {"model": "unet-small " + json.dumps(SMALL_UNET), "n": n, "repeats": repeats,
            "threads": torch.get_num_threads(), "median_s": med,
            "time_ratio": {k: v / med["plain"] for k, v in med.items()}, "median_cpu_s": med_cpu,
            "cpu_time_ratio": {k: v / med_cpu["plain"] for k, v in med_cpu.items()}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=16, help="batch size (accuracy and gamma)")
    ap.add_argument("--draws", type=int, default=8, help="probe draws per step (accuracy)")
    ap.add_argument("--seeds", type=int, default=4, help="probe seeds of the fp32 gamma spread")
    ap.add_argument("--timing-n", type=int, default=8, help="batch size of the timing")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats (after one warm-up round)")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: accuracy, gamma, timing")
    ap.add_argument("--out", default=None, help="write the JSON here")
    args = ap.parse_args(argv)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    out: dict = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    if "accuracy" not in skip:
        out["accuracy"] = [accuracy(m, args.n, args.draws) for m in ("digits", "unet")]
    if "gamma" not in skip:
        out["gamma"] = [gammas(m, args.n, args.seeds) for m in ("digits", "unet")]
    if "timing" not in skip:
        out["timing"] = timing(args.timing_n, args.repeats)
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
