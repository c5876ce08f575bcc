"""GPU check (issue 10): steindiff end to end on a CUDA device, in one run of a few minutes.

    python benchmarks/gpu_check.py --out docs/results/gpu-check-h200.json    # on a GPU machine, < 5 minutes
    python benchmarks/gpu_check.py --device cpu --quick                      # tiny sizes on the CPU, seconds

What it does, on three models (``gmm:image64``, the shipped ``digits`` U-Net, and a 34.4M-parameter
``steindiff.models.UNet`` on 3x64x64 at batch 64, randomly initialized with a fixed seed), with
dpmpp_2m at NFE 5 (Karras):

1. ``timing``: the plain solver, a fixed gamma schedule (``GammaSchedule``, what a calibrated schedule
   costs) and every stabilizer (stein VJP P=1, also with ``jacobian_batch`` chunks on the U-Net and, on the
   U-Net, with ``jacobian_precision="bf16"`` (rows ``stein_vjp_p1_bf16``, ``stein_vjp_p1_bf16_jb48``, ``_jb32``), VJP
   P=5, JVP P=1, stein-tr, stein-energy, stein-sc), side by side in one process on the same noise:
   medians of ``--repeats`` CUDA-synchronised wall times after one warm-up round, and the peak memory
   (``torch.cuda.reset_peak_memory_stats`` / ``max_memory_allocated``); ratios to the plain solver.
   TF32 on (the usual float32 setting on NVIDIA cards).
2. ``agreement``: the same noise and probes on the CPU and on the device, TF32 off; relative error of
   the samples and of the per-step gammas against ``tolerance``.
3. ``commands``: every command that runs a model (sample, calibrate, diagnose, bench --cost, train and
   resume on the other device, demo, sample-dist and merge, sample-dist under torchrun with nccl),
   each with ``--device``, tiny sizes; exit codes and the tail of their error output.
4. ``targets``: issue 10's "done when" on the U-Net: stein VJP P=1 at most 2.5x the plain time and
   3x its peak memory (for each ``jacobian_batch`` and ``jacobian_precision`` measured).

A variant or command that fails (out of memory, an error) is a result, not a crash.  ``--budget-s``
skips what is left (recorded as skipped) once that many seconds have passed.  Prints the JSON; writes
it to ``--out FILE`` and/or ``--out-dir DIR`` (as ``gpu-check-<card>.json``).

Needs torch, numpy and tqdm (imported by steindiff; a stand-in is used if tqdm is missing) and
safetensors for the digits model (without it, digits is skipped with the reason).  scikit-learn and
matplotlib are used only by the ``demo`` command (recorded as failed without them).  Runs from a
checkout: the repository root is put on ``sys.path``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

STUBS: list[str] = []
try:
    import tqdm  # noqa: F401
except ImportError:  # a no-op stand-in: steindiff imports tqdm for its progress bars
    class _NoBar:
        def __init__(self, iterable=None, *args, **kwargs):
            self.iterable = iterable

        def __iter__(self):
            return iter(self.iterable if self.iterable is not None else [])

        def __getattr__(self, name):
            return lambda *a, **k: None

    import importlib.machinery

    _tq, _tqa = types.ModuleType("tqdm"), types.ModuleType("tqdm.auto")
    _tq.__spec__ = importlib.machinery.ModuleSpec("tqdm", None)
    _tqa.__spec__ = importlib.machinery.ModuleSpec("tqdm.auto", None)
    _tq.tqdm = _tqa.tqdm = _NoBar
    _tq.auto = _tqa
    sys.modules["tqdm"], sys.modules["tqdm.auto"] = _tq, _tqa
    STUBS.append("tqdm")

import torch  # noqa: E402

SCHEMA = "steindiff.gpu-check/1"
UNET_34M = dict(in_channels=3, model_channels=128, channel_mult=(1, 2, 2, 2), num_blocks=2, attn_levels=(2,))
UNET_QUICK = dict(in_channels=3, model_channels=8, channel_mult=(1, 2), num_blocks=1, attn_levels=(1,))
FIXED_GAMMAS = (0.9, 1.1, 1.0)  # a fixed schedule: costs what any calibrated schedule costs
TARGET_TIME, TARGET_MEM = 2.5, 3.0


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def reason(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    return f"failed: {type(e).__name__}: {msg[:400]}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class Budget:
    def __init__(self, seconds: float):
        self.t0, self.seconds = time.perf_counter(), seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def over(self) -> bool:
        return self.elapsed() > self.seconds


# ------------------------------------------------------------------------------------------------
# models


def build_model(name: str, device: torch.device, quick: bool):
    """A fresh ModelSpec on ``device``; every build of a name gives the same weights."""
    from steindiff.models import EDMPrecond, UNet, UNetConfig
    from steindiff.models.registry import ModelSpec, load_model
    from steindiff.noise import VEProcess

    if name == "gmm:image64":
        return load_model("gmm:image64").to(device)
    if name == "digits":
        # the checkpoint alone (load_model would also load the digits data set, which needs scikit-learn)
        from steindiff.models.checkpoint import build_denoiser, load_checkpoint
        from steindiff.models.trained import DIGITS_DIR

        net, config = load_checkpoint(DIGITS_DIR)
        den, process = build_denoiser(net, config)
        den.eval().requires_grad_(False)
        return ModelSpec("digits", den, process, tuple(config["data"]["shape"])).to(device)
    if name == "unet":
        torch.manual_seed(0)
        net = UNet(UNetConfig(**(UNET_QUICK if quick else UNET_34M)))
        # the zero-initialized output layers of a fresh U-Net would make its output 0: give them weights
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d) and not bool(m.weight.any()):
                m.reset_parameters()
        den = EDMPrecond(net, sigma_data=0.5).eval().requires_grad_(False)
        size = 8 if quick else 64
        return ModelSpec(f"unet-{net.num_parameters() / 1e6:.1f}M", den, VEProcess(0.002, 80.0),
                         (3, size, size)).to(device)
    raise ValueError(name)


def model_plan(quick: bool) -> list[dict]:
    """Per model: batch, dtype, the jacobian_batch values timed for stein VJP P=1 (in fp32, and in bf16 where
    ``bf16_jacobian_batches`` lists them: ``None`` is the whole batch), agreement batch."""
    return [
        {"name": "unet", "n": 3 if quick else 64, "dtype": torch.float32,
         "jacobian_batches": [2] if quick else [48, 32, 16],
         "bf16_jacobian_batches": [None, 2] if quick else [None, 48, 32],
         "agree_n": 2 if quick else 4, "agree_variants": ["plain", "calibrated", "stein_vjp_p1", "stein-energy"]},
        {"name": "gmm:image64", "n": 16 if quick else 1000, "dtype": torch.float64, "jacobian_batches": [],
         "agree_n": 8 if quick else 500, "agree_variants": None},
        {"name": "digits", "n": 4 if quick else 400, "dtype": torch.float32, "jacobian_batches": [],
         "timing": not quick,
         "agree_n": 2 if quick else 64, "agree_variants": ["plain", "stein_vjp_p1"] if quick else None},
    ]


def variants(steps: int, jacobian_batches: list[int],
             bf16_jacobian_batches: list[int | None] = ()) -> list[tuple[str, Callable]]:
    from steindiff.stabilizers import make_stabilizer
    from steindiff.stabilizers.schedule import GammaSchedule

    def stab(name: str, **kw) -> Callable:
        return lambda spec: make_stabilizer(name, spec, **kw)

    out: list[tuple[str, Callable]] = [
        ("plain", lambda spec: None),
        ("calibrated",
         lambda spec: GammaSchedule([FIXED_GAMMAS[k % 3] for k in range(steps)], "ve", {"name": "fixed"})),
        ("stein_vjp_p1", stab("stein", probes=1)),
    ]
    out += [(f"stein_vjp_p1_jb{jb}", stab("stein", probes=1, jacobian_batch=jb)) for jb in jacobian_batches]
    # the Jacobian pass under bf16 autocast (the solver's step stays in the state's precision)
    out += [("stein_vjp_p1_bf16" + (f"_jb{jb}" if jb else ""),
             stab("stein", probes=1, jacobian_batch=jb, jacobian_precision="bf16")) for jb in bf16_jacobian_batches]
    out += [
        ("stein_vjp_p5", stab("stein", probes=5)),
        ("stein_jvp_p1", stab("stein", probes=1, divergence="jvp")),
        ("stein-tr", stab("stein-tr")),
        ("stein-energy", stab("stein-energy")),
        ("stein-sc", stab("stein-sc")),
    ]
    return out


def setup(plan: dict, device: torch.device, quick: bool):
    from steindiff import get_sigmas, prior_noise
    from steindiff.solvers import get_solver, steps_for_nfe

    spec = build_model(plan["name"], device, quick)
    sigmas = get_sigmas("karras", steps_for_nfe(get_solver("dpmpp_2m"), 5), spec.process)
    noise = prior_noise((plan["n"], *spec.sample_shape), float(sigmas[0]), spec.process, seed=0, dtype=plan["dtype"])
    return spec, sigmas, noise


# ------------------------------------------------------------------------------------------------
# 1. timing and peak memory


def run_once(spec, noise: torch.Tensor, sigmas, make: Callable) -> tuple[Any, float]:
    from steindiff import sample

    device = noise.device
    stab = make(spec)
    sync(device)
    t0 = time.perf_counter()
    res = sample(spec.denoiser, noise, sigmas, "dpmpp_2m", stabilizer=stab)
    sync(device)
    return res, time.perf_counter() - t0


def time_model(plan: dict, device: torch.device, repeats: int, quick: bool, budget: Budget) -> dict:
    spec, sigmas, noise_cpu = setup(plan, device, quick)
    noise = noise_cpu.to(device)
    steps = len(sigmas) - 1
    params = sum(p.numel() for p in spec.denoiser.parameters()) if isinstance(spec.denoiser, torch.nn.Module) else None
    out: dict[str, Any] = {"model": spec.name, "parameters": params, "shape": list(spec.sample_shape),
                           "batch": plan["n"],
                           "dtype": str(plan["dtype"]).removeprefix("torch."), "solver": "dpmpp_2m", "nfe": 5,
                           "steps": steps,
                           "schedule": "karras", "repeats": repeats}
    timed = variants(steps, plan["jacobian_batches"], plan.get("bf16_jacobian_batches", []))
    rows = {name: {"variant": name, "status": "ok", "times_s": [], "peaks": []} for name, _ in timed}
    warmup = 0 if quick else 1
    out["warmup_rounds"] = warmup
    for rnd in range(warmup + repeats):  # warm-up rounds untimed
        for name, make in timed:
            r = rows[name]
            if r["status"] != "ok":
                continue
            if budget.over():
                r["status"] = "skipped: time budget"
                continue
            err = None
            try:
                if device.type == "cuda":
                    sync(device)
                    torch.cuda.reset_peak_memory_stats(device)
                    r["allocated_before_bytes"] = int(torch.cuda.memory_allocated(device))
                res, dt = run_once(spec, noise, sigmas, make)
                if rnd >= warmup:
                    r["times_s"].append(dt)
                    if device.type == "cuda":
                        r["peaks"].append(int(torch.cuda.max_memory_allocated(device)))
                r.update(nfe=res.nfe, extra_passes=res.extra_passes,
                         gammas=[float(t.get("gamma", 1.0)) for t in res.trace] or None,
                         finite=bool(torch.isfinite(res.x).all()))
                del res
            except Exception as e:  # out of memory and any other failure: a result
                err = reason(e)
            if err is not None:
                r["status"] = err
                free(device)
                log(f"  {spec.name} {name}: {err[:160]}")
    base_t = statistics.median(rows["plain"]["times_s"]) if rows["plain"]["times_s"] else None
    base_m = max(rows["plain"]["peaks"]) if rows["plain"]["peaks"] else None
    for r in rows.values():
        t = statistics.median(r["times_s"]) if r["times_s"] else None
        m = max(r.pop("peaks")) if r["peaks"] else None
        r.update(median_s=t, time_ratio=(t / base_t) if (t is not None and base_t) else None, peak_mem_bytes=m,
                 mem_ratio=(m / base_m) if (m is not None and base_m) else None)
    out["rows"] = list(rows.values())
    del spec, noise
    free(device)
    return out


# ------------------------------------------------------------------------------------------------
# 2. agreement of the device with the CPU


def tf32(enabled: bool):
    """TF32 on or off inside the block (:func:`steindiff.device.tf32`; imported late, as steindiff is here)."""
    from steindiff.device import tf32 as _tf32

    return _tf32(enabled)


def agree_model(plan: dict, device: torch.device, quick: bool, budget: Budget) -> dict:
    plan = {**plan, "n": plan["agree_n"]}
    spec_c, sigmas, noise = setup(plan, torch.device("cpu"), quick)
    spec_d = build_model(plan["name"], device, quick)
    tol = 1e-7 if plan["dtype"] == torch.float64 else 2e-3
    names = plan["agree_variants"]
    rows = []
    with tf32(False):
        for name, make in variants(len(sigmas) - 1, []):
            if names is not None and name not in names:
                continue
            if budget.over():
                rows.append({"variant": name, "status": "skipped: time budget"})
                continue
            err, row = None, {"variant": name}
            try:
                rc, _ = run_once(spec_c, noise, sigmas, make)
                rd, _ = run_once(spec_d, noise.to(device), sigmas, make)
                xc, xd = rc.x.double(), rd.x.double().cpu()
                rel = float((xd - xc).norm() / xc.norm().clamp_min(1e-30))
                gc_ = [float(t.get("gamma", 1.0)) for t in rc.trace]
                gd = [float(t.get("gamma", 1.0)) for t in rd.trace]
                # a step x - gamma u amplifies rounding by |gamma|: step k is held to tol times the
                # amplification of the steps before it (the first step to tol itself)
                amp, ok_g, gerr = [1.0], True, []
                for a_, b_ in zip(gc_, gd):
                    e_ = abs(a_ - b_) / max(1.0, abs(a_))
                    gerr.append(e_)
                    ok_g = ok_g and e_ <= tol * amp[-1]
                    amp.append(amp[-1] * max(1.0, abs(a_)))
                row.update(status="ok", rel_err=rel, max_abs_err=float((xd - xc).abs().max()),
                           gamma_rel_err=max(gerr, default=0.0), amplification=amp[-1], gammas_cpu=gc_ or None,
                           nfe_equal=rc.nfe == rd.nfe and rc.extra_passes == rd.extra_passes,
                           agree=bool(ok_g and rel <= tol * amp[-1] and rc.nfe == rd.nfe))
            except Exception as e:
                err = reason(e)
            if err is not None:
                row.update(status=err, agree=False)
                free(device)
            rows.append(row)
    out = {"model": spec_c.name, "batch": plan["n"], "dtype": str(plan["dtype"]).removeprefix("torch."), "tf32": False,
           "tolerance": tol, "tolerance_rule": "relative error of the samples <= tolerance x amplification (product of "
           "max(1, |gamma_k|) over the steps); gamma_k's relative error <= tolerance x the amplification before step k",
           "rows": rows, "all_agree": all(r.get("agree") for r in rows if r["status"] != "skipped: time budget")}
    del spec_c, spec_d
    free(device)
    return out


# ------------------------------------------------------------------------------------------------
# 3. the commands


def run_cli(argv: list[str]) -> dict:
    from steindiff.cli import main

    out, err = io.StringIO(), io.StringIO()
    t0, threads = time.perf_counter(), torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(argv)
    except SystemExit as e:  # argparse
        rc = e.code if isinstance(e.code, int) else 2
    except Exception as e:
        rc, err = 1, io.StringIO(reason(e))
    finally:
        torch.set_num_threads(threads)  # demo sets its own
    return {"argv": " ".join(argv), "rc": rc, "wall_s": round(time.perf_counter() - t0, 2),
            "stderr_tail": err.getvalue()[-600:] or None}


def commands(device: torch.device, quick: bool, tmp: Path, budget: Budget, everything: bool = True) -> list[dict]:
    """Each command once on ``device`` (exit codes); without ``everything`` only sample, train and
    resume, sample-dist and merge, and a bad device (the others have their own CPU tests)."""
    import numpy as np

    dev = str(device)
    n_big, n_small = ("32", "8") if quick else ("500", "64")
    np.save(tmp / "images.npy", np.random.default_rng(0).uniform(-1, 1, (64, 1, 8, 8)).astype(np.float32))
    other = "cpu" if device.type == "cuda" else dev
    q = ["--no-progress"]
    runs: list[tuple[list[str], int]] = [  # (argv, expected exit code)
        (["sample", "--model", "digits", "--stabilizer", "stein", "--device", dev, "--n", n_small, "--nfe", "6",
          "--json", *q], 0),
        (["sample", "--model", "digits", "--stabilizer", "stein", "--probes", "1", "--jacobian-precision", "bf16",
          "--jacobian-batch", "4" if quick else "32", "--device", dev, "--n", n_small, "--nfe", "6", "--json", *q], 0),
        (["sample", "--model", "gmm:image64", "--stabilizer", "stein", "--jacobian-batch", "7" if quick else "128",
          "--device", dev,
          "--n", n_big, "--nfe", "5", "--out", str(tmp / "s.npz"), "--json", *q], 0),
        # the calibrated sampler fitted on this device (trajectory objective, digits U-Net), then applied
        (["calibrate", "--model", "digits", "--solver", "dpmpp_2m", "--nfe", "5", "--n", "16" if quick else "256",
          "--ref-steps", "20" if quick else "100", "--max-seconds", "5" if quick else "40",
          "--out", str(tmp / "cal.json"), "--device", dev, "--json", *q], 0),
        (["sample", "--model", "digits", "--solver", "dpmpp_2m", "--nfe", "5", "--gamma-schedule",
          str(tmp / "cal.json"),
          "--device", dev, "--n", n_big, "--json", *q], 0),
        (["calibrate", "--model", "gmm:image64", "--solver", "euler", "--nfe", "5", "--objective", "variant",
          "--stabilizer", "stein-energy", "--n", n_big, "--out", str(tmp / "cal-energy.json"), "--device", dev,
          "--json", *q], 0),
        (["diagnose", "--model", "digits", "--nfe", "4", "--n", n_small, "--iters", "4", "--stabilizer", "stein",
          "--device", dev,
          "--json", *q], 0),
        (["bench", "--model", "gmm:image64", "--cost", "--solvers", "dpmpp_2m", "--nfe", "5", "--stabilizers",
          "none,stein",
          "--cost-probes", "1", "--repeats", "1", "--n", n_big, "--device", dev, "--json-out", str(tmp / "bench.json"),
          *q], 0),
        (["train", "--data", str(tmp / "images.npy"), "--out", str(tmp / "ckpt"), "--iters", "6", "--batch-size", "16",
          "--channels", "8", "--channel-mult", "1,2", "--attn-levels", "1", "--device", dev, "--precision", "bf16",
          "--log-every", "2", "--ckpt-every", "3", "--json", *q], 0),
        (["train", "--data", str(tmp / "images.npy"), "--out", str(tmp / "ckpt"), "--resume", "--iters", "8",
          "--batch-size", "16",
          "--channels", "8", "--channel-mult", "1,2", "--attn-levels", "1", "--device", other, "--log-every", "2",
          "--json", *q], 0),
        (["sample", "--model", str(tmp / "ckpt"), "--stabilizer", "stein", "--n", "8", "--nfe", "4", "--device", dev,
          "--json", *q], 0),
        (["demo", "--n", "16", "--nfe", "4", "--stabilizers", "none,stein", "--out", str(tmp / "demo"), "--device", dev,
          "--json", *q], 0),
        (["demo", "--n", "16", "--nfe", "5", "--stabilizers", "none,calibrated", "--out", str(tmp / "demo-cal"),
          "--calibration-dir", str(tmp / "cache"), "--device", dev, "--json", *q], 0),
        (["sample-dist", "--model", "gmm:image64", "--num-samples", n_small, "--stabilizer", "stein", "--out-dir",
          str(tmp / "dist"),
          "--device", dev, "--json", *q], 0),
        (["merge", str(tmp / "dist"), "--out", str(tmp / "merged.npz"), "--json"], 0),
        (["sample", "--model", "gmm:image64", "--device", "cuda:99", "--n", "4", *q], 2),
    ]
    if not everything:
        runs = [r for r in runs
                if r[0][0] in ("sample", "train", "sample-dist", "merge") and "--gamma-schedule" not in r[0]]
    rows = []
    for argv, expected in runs:
        if budget.over():
            rows.append({"argv": " ".join(argv), "status": "skipped: time budget"})
            continue
        r = run_cli(argv)
        r.update(expected_rc=expected, ok=r["rc"] == expected)
        rows.append(r)
        free(device)
        if not r["ok"]:
            log(f"  command failed (rc {r['rc']}): {r['argv'][:120]}: {(r['stderr_tail'] or '')[-200:]}")
    if device.type == "cuda" and not budget.over():  # the nccl path, one rank per GPU (at most 2)
        nproc = min(2, torch.cuda.device_count())
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
               "steindiff",
               "sample-dist", "--model", "gmm:image64", "--num-samples", "64", "--stabilizer", "stein", "--backend",
               "nccl",
               "--out-dir", str(tmp / "nccl"), "--json", "--no-progress"]
        path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env = {**os.environ, "PYTHONPATH": path}
        t0 = time.perf_counter()
        try:
            p = subprocess.run(cmd, cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=150)
            r = {"argv": " ".join(cmd[2:]), "rc": p.returncode, "stderr_tail": p.stderr[-600:] or None}
            if p.returncode == 0:
                r["merge_rc"] = run_cli(["merge", str(tmp / "nccl"), "--out", str(tmp / "nccl.npz"), "--json"])["rc"]
        except subprocess.TimeoutExpired:
            r = {"argv": " ".join(cmd[2:]), "rc": None, "stderr_tail": "timed out after 150 s"}
        r.update(wall_s=round(time.perf_counter() - t0, 2), expected_rc=0, ok=r["rc"] == 0, nproc=nproc)
        rows.append(r)
    return rows


# ------------------------------------------------------------------------------------------------


def environment(device: torch.device) -> dict:
    from steindiff.device import describe_device

    env = {**describe_device(device), "python": sys.version.split()[0], "cpu_count": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "stubs": STUBS}
    try:
        import numpy as np

        env["numpy"] = np.__version__
    except ImportError:
        env["numpy"] = None
    for mod in ("safetensors", "sklearn", "matplotlib", "scipy"):
        try:
            env[mod] = getattr(__import__(mod), "__version__", "present")
        except ImportError:
            env[mod] = None
    try:  # a copied working tree may carry stale git metadata: STEINDIFF_COMMIT names the commit it was copied from
        env["git_commit"] = os.environ.get("STEINDIFF_COMMIT") or subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=str(ROOT), capture_output=True, text=True, timeout=10
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["git_commit"] = None
    return env


def targets(timing: list[dict]) -> dict:
    """Issue 10's done-when on the U-Net: stein VJP P=1 at most 2.5x time and 3x peak memory of plain."""
    unet = next((t for t in timing if str(t.get("model", "")).startswith("unet")), None)
    rows = []
    for r in (unet or {}).get("rows", []):
        if r["variant"].startswith("stein_vjp_p1"):
            ok = (r["time_ratio"] is not None and r["time_ratio"] <= TARGET_TIME
                  and r["mem_ratio"] is not None and r["mem_ratio"] <= TARGET_MEM)
            rows.append({"variant": r["variant"], "time_ratio": r["time_ratio"], "mem_ratio": r["mem_ratio"],
                         "meets": ok})
    return {"model": (unet or {}).get("model"), "batch": (unet or {}).get("batch"), "max_time_ratio": TARGET_TIME,
            "max_mem_ratio": TARGET_MEM, "rows": rows, "met_by": [r["variant"] for r in rows if r["meets"]]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (for a CPU test of this script)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats after the warm-up (default 3; quick 1)")
    ap.add_argument("--budget-s", type=float, default=240.0, help="skip what is left after this many seconds")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: timing, agreement, commands")
    ap.add_argument("--all-commands", action="store_true", help="with --quick: run every command, not only a few")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's own; 1 with --quick, for small "
                         "tensors on shared machines)")
    ap.add_argument("--out", default=None, help="write the JSON here")
    ap.add_argument("--out-dir", default=None, help="write the JSON into this folder as gpu-check-<card>.json")
    args = ap.parse_args(argv)
    threads0 = torch.get_num_threads()
    try:
        return _run(args, argv)
    finally:
        torch.set_num_threads(threads0)


def _run(args: argparse.Namespace, argv: list[str] | None) -> int:
    try:
        from steindiff.device import DeviceError, resolve_device
        from steindiff.io import save_json, to_jsonable
    except ImportError as e:
        print(f"gpu_check: cannot import steindiff ({e}); it needs torch, numpy and tqdm", file=sys.stderr)
        return 3

    try:
        device = resolve_device(args.device)
    except DeviceError as e:
        print(f"gpu_check: {e}", file=sys.stderr)
        return 2
    for path in (args.out,):
        if path is not None and not Path(path).resolve().parent.is_dir():
            print(f"gpu_check: the folder of --out {path!r} does not exist", file=sys.stderr)
            return 2
    if args.out_dir is not None and not Path(args.out_dir).is_dir():
        print(f"gpu_check: --out-dir {args.out_dir!r} is not a folder", file=sys.stderr)
        return 2
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    threads = args.threads if args.threads is not None else (1 if args.quick else None)
    if threads is not None:
        torch.set_num_threads(max(1, threads))
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    budget = Budget(args.budget_s)
    result: dict[str, Any] = {"schema": SCHEMA, "command": " ".join([Path(sys.argv[0]).name,
                                                                     *(argv if argv is not None else sys.argv[1:])]),
                              "quick": args.quick, "environment": environment(device), "timing": [], "agreement": [],
                              "commands": []}
    log(f"device {device} ({result['environment'].get('gpu', 'cpu')}), torch {torch.__version__}")
    plans = model_plan(args.quick)
    if "timing" not in skip:
        with tf32(True):
            for plan in (p for p in plans if p.get("timing", True)):
                log(f"timing {plan['name']} (batch {plan['n']})")
                try:
                    result["timing"].append(time_model(plan, device, repeats, args.quick, budget))
                except Exception as e:  # the model itself could not be built or moved
                    result["timing"].append({"model": plan["name"], "status": reason(e)})
                    free(device)
    if "agreement" not in skip:
        for plan in plans:
            log(f"agreement {plan['name']} (batch {plan['agree_n']}, CPU vs {device})")
            try:
                result["agreement"].append(agree_model(plan, device, args.quick, budget))
            except Exception as e:
                result["agreement"].append({"model": plan["name"], "status": reason(e), "all_agree": False})
                free(device)
    if "commands" not in skip:
        log("commands")
        with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
            result["commands"] = commands(device, args.quick, Path(tmp), budget,
                                          everything=not args.quick or args.all_commands)
    result["targets"] = targets(result["timing"])
    result["summary"] = {
        "agreement_ok": all(a.get("all_agree") for a in result["agreement"]) if result["agreement"] else None,
        "commands_ok": all(c.get("ok") for c in result["commands"]) if result["commands"] else None,
        "target_met": bool(result["targets"]["met_by"]) if result["targets"]["rows"] else None,
        "failed_variants": [f"{t.get('model')}:{r['variant']}: {r['status']}" for t in result["timing"]
                            for r in t.get("rows", []) if r["status"] != "ok"],
    }
    result["wall_s"] = round(budget.elapsed(), 1)
    print(json.dumps(to_jsonable(result), indent=1))
    if args.out is not None:
        save_json(args.out, result)
    if args.out_dir is not None:
        card = result["environment"].get("gpu") or "cpu"
        save_json(Path(args.out_dir) / f"gpu-check-{re.sub(r'[^a-z0-9]+', '-', card.lower()).strip('-')}.json", result)
    for t in result["timing"]:  # a short table on stderr (the JSON has everything)
        for r in t.get("rows", []):
            mem = f"{r['peak_mem_bytes'] / 2**30:.2f} GiB ({r['mem_ratio']:.2f}x)" if r.get("peak_mem_bytes") else "-"
            tr = f"{r['time_ratio']:.2f}x" if r.get("time_ratio") is not None else "-"
            log(f"  {t.get('model')} {r['variant']:20s} {tr:>7s} {mem:>20s}  {r['status'][:80]}")
        if "status" in t:
            log(f"  {t.get('model')}: {t['status'][:200]}")
    for a in result["agreement"]:
        log(f"  agreement {a.get('model')}: {a.get('all_agree')} " + " ".join(
            f"{r['variant']}={r.get('rel_err', r['status'])!s:.9}" for r in a.get("rows", [])))
    log(f"  targets: {result['targets']['rows']}")
    log(f"  summary: {result['summary']}")
    log(f"done in {result['wall_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
