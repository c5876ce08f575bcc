"""How much TF32 spoils the calibrated sampler's finite-difference Jacobian, measured on the CPU.

The refinement (:func:`steindiff.trajectory.refine`) differentiates whole solves by forward differences
with a relative step of 1e-3 in float32.  On a GPU, PyTorch runs convolutions in TF32 by default (inputs
rounded to 10 mantissa bits, about 5e-4 relative): the same size as the step.  This script emulates TF32
on the CPU (every ``Conv2d``/``Linear`` input and weight rounded to TF32, float32 accumulation, as the
tensor cores do) and compares, for one cell of an image model, the Jacobian of the final samples with
respect to the fitted parameters (gammas and log-gaps of the noise levels) by the refinement's forward
differences in exact float32 and in emulated TF32 with the same Jacobian by central differences of the
model in float64 (the truth), at two points: the plain plan (where the fit starts) and the calibration
shipped with the model for that cell, if any (near a fitted optimum).  The emulation is a lower bound on
the GPU's error: cuDNN may add its own (Winograd, FFT), which it does not model.

    python benchmarks/tf32_fd_check.py --model digits --cell unipc/karras/4 --json-out docs/results/tf32-fd-check.json
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import numpy as np
import torch

from steindiff.calibration import CALIBRATION_SEED, calibrated_plan
from steindiff.io import save_json
from steindiff.models.registry import load_model
from steindiff.plan import SamplingPlan, make_plan
from steindiff.sampling import prior_noise, sample
from steindiff.trajectory import _Params


def tf32_round(x: torch.Tensor) -> torch.Tensor:
    """``x`` (float32) rounded to TF32: 10 explicit mantissa bits, to nearest (ties away from zero)."""
    i = x.contiguous().view(torch.int32)
    return ((i + 0x1000) & ~0x1FFF).view(torch.float32)


def in_dtype(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of ``module`` computing in ``dtype`` (a preconditioned network's own ``dtype`` set too)."""
    m = copy.deepcopy(module).to(dtype)
    if hasattr(m, "dtype"):
        m.dtype = dtype
    return m


def emulate_tf32(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``module`` whose ``Conv*``/``Linear`` layers see TF32-rounded inputs and weights."""
    m = in_dtype(module, torch.float32)
    for layer in m.modules():
        if isinstance(layer, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear)):
            with torch.no_grad():
                layer.weight.copy_(tf32_round(layer.weight))
            layer.register_forward_pre_hook(lambda _mod, args: (tf32_round(args[0]), *args[1:]))
    return m


def final_samples(model, noise: torch.Tensor, P: _Params, base: SamplingPlan, theta: np.ndarray) -> torch.Tensor:
    sigmas, gammas = P.decode(theta)
    plan = SamplingPlan(base.solver, sigmas, "fitted", gammas, base.coords, base.solver_options)
    with torch.no_grad():
        return sample(model, noise, plan.sigmas, plan.get_solver(), stabilizer=plan.stabilizer()).x.double()


def theta_of(P: _Params, plan: SamplingPlan) -> np.ndarray:
    """The inverse of :meth:`_Params.decode` for ``fit="both"``: a plan's gammas and noise levels as theta."""
    sig = [float(s) for s in plan.sigmas]
    pos = [(np.log(P.s0) - np.log(s)) / P.L for s in sig[1:-1]]
    return np.concatenate([np.asarray(plan.gammas[: P.ng], dtype=float), np.log(np.diff([0.0, *pos, 1.0]))])


def jacobian(model, noise, P, base, theta0, *, step: float, central: bool) -> np.ndarray:
    """Columns ``d x_N / d theta_j`` by differences of whole solves (scipy's ``2-point`` step rule)."""
    f0 = None if central else final_samples(model, noise, P, base, theta0).reshape(-1)
    cols = []
    for j in range(theta0.size):
        h = step * max(1.0, abs(theta0[j]))
        up = theta0.copy()
        up[j] += h
        f_up = final_samples(model, noise, P, base, up).reshape(-1)
        if central:
            dn = theta0.copy()
            dn[j] -= h
            cols.append(((f_up - final_samples(model, noise, P, base, dn).reshape(-1)) / (2 * h)).numpy())
        else:
            cols.append(((f_up - f0) / h).numpy())
    return np.stack(cols, 1)


def _damped_step(J: np.ndarray, r: np.ndarray, damping: float) -> np.ndarray:
    """The Levenberg-Marquardt step ``(J^T J + damping I)^-1 J^T r`` (what a trust-region step reduces to)."""
    return np.linalg.solve(J.T @ J + damping * np.eye(J.shape[1]), J.T @ r)


def _rel(a: np.ndarray, truth: np.ndarray) -> float:
    return float(np.linalg.norm(a - truth) / np.linalg.norm(truth))


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="digits", help="an image model with Conv/Linear layers (digits, patches)")
    p.add_argument("--cell", default="unipc/karras/4", help="solver/schedule/nfe")
    p.add_argument("--n", type=int, default=128, help="calibration samples (the fit part of the bench's 256)")
    p.add_argument("--step", type=float, default=1e-3, help="the refinement's relative finite-difference step")
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    try:
        solver, schedule, nfe = args.cell.split("/")
        nfe = int(nfe)
    except ValueError:
        print(f"error: --cell is solver/schedule/nfe, got {args.cell!r}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    spec = load_model(args.model)
    net = spec.denoiser
    if not isinstance(net, torch.nn.Module):
        print(f"error: {args.model} is not a torch module; nothing to emulate", file=sys.stderr)
        return 2
    base = make_plan(spec.process, solver, nfe, schedule)
    P = _Params(base, "both", float(spec.process.sigma_min), [1.0] * base.steps, plain_tail=2)
    theta0 = P.initial()
    noise = prior_noise((args.n, *spec.sample_shape), float(base.sigmas[0]), spec.process, seed=CALIBRATION_SEED)
    models = {"fp64": in_dtype(net, torch.float64), "fp32": in_dtype(net, torch.float32), "tf32": emulate_tf32(net)}
    # the refinement's residual against a 25-step dpmpp_2m solve (a stand-in for its reference solve)
    fine = make_plan(spec.process, "dpmpp_2m", 25, "logsnr")
    with torch.no_grad():
        target = sample(models["fp64"], noise.double(), fine.sigmas, "dpmpp_2m").x.reshape(-1)
    points = {"plain": theta0}
    shipped = calibrated_plan(spec, base, calibrate_missing=False)
    if shipped is not base:  # a calibration ships with the model for this cell
        points["shipped"] = theta_of(P, shipped)  # the model's shipped calibration of this cell, near an optimum
    out = {"model": args.model, "cell": args.cell, "n": args.n, "step": args.step, "parameters": int(theta0.size),
           "truth": "central differences of the float64 model, step 1e-6", "points": {}}
    for point, theta in points.items():
        truth = jacobian(models["fp64"], noise.double(), P, base, theta, step=1e-6, central=True)
        r = (final_samples(models["fp64"], noise.double(), P, base, theta).reshape(-1) - target).numpy()
        grad_true = truth.T @ r
        damping = 1e-2 * float(np.mean(np.sum(truth**2, axis=0)))  # 1% of the mean curvature
        gn_true = _damped_step(truth, r, damping)
        rec = out["points"][point] = {"theta": theta.tolist()}
        for name in ("fp32", "tf32"):
            J = jacobian(models[name], noise.float(), P, base, theta, step=args.step, central=False)
            col_err = np.linalg.norm(J - truth, axis=0) / np.maximum(np.linalg.norm(truth, axis=0), 1e-300)
            g = J.T @ r  # the Gauss-Newton gradient: the direction the refinement steps in
            gn = _damped_step(J, r, damping)
            rec[name] = {"relative_error": _rel(J, truth), "column_relative_error": col_err.tolist(),
                         "gradient_cosine": _cos(g, grad_true), "damped_step_cosine": _cos(gn, gn_true),
                         "damped_step_relative_error": _rel(gn, gn_true)}
            print(f"{point} {name}: Jacobian relative error {rec[name]['relative_error']:.3g}, columns "
                  + ", ".join(f"{e:.2g}" for e in col_err) + f"; gradient cosine {rec[name]['gradient_cosine']:.4f}"
                  f"; damped step relative error {rec[name]['damped_step_relative_error']:.3g}", flush=True)
    f32 = final_samples(models["fp32"], noise.float(), P, base, theta0)
    f_tf = final_samples(models["tf32"], noise.float(), P, base, theta0)
    out["tf32_sample_rms_vs_fp32"] = float((f_tf - f32).pow(2).mean().sqrt())
    out["wall_s"] = time.perf_counter() - t0
    out["command"] = "python benchmarks/tf32_fd_check.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.json_out:
        save_json(args.json_out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
