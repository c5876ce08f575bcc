"""Does more per-step freedom bring the calibrated sampler closer to the fine solve?

The trajectory calibration fits one gamma per step and the interior noise levels
(:mod:`steindiff.trajectory`).  This script adds, one at a time, two kinds of per-step freedom that any
solver can take, and fits each parameterisation the same way on the bench's calibration noise (bounded
least squares of the fit half's final samples against the fine solve, finite differences, the same
regularisers, starting from the closed-form gammas), then measures the validation half:

- ``base``: gammas and noise levels, as the library fits them;
- ``multistep``: plus a coefficient ``beta_k`` per step on the change of the denoised estimate,
  ``x_{k+1} += beta_k (1 - sigma_{k+1} / sigma_k) (D_k - D_{k-1})`` (a fitted second-order correction,
  as multistep solvers and S4S-style learned coefficients use; ``beta = 0`` is ``base``);
- ``time-shift``: plus a shift of the noise level the model is given at each level,
  ``D(x, sigma e^{delta_j})`` (interpolated in ``log sigma`` between levels; ``delta = 0`` is ``base``).

Reported per cell: the validation RMS distance to the fine solve and the median sample's distance,
each relative to the plain solver's, and the fit half's RMS ratio (what the fit minimised).  With
``--eval-seeds`` on an image model, also the excess primary image metric of each fitted plan on those
evaluation seeds.  Nothing is written to the library's calibrations.

    python benchmarks/extra_freedom.py --model gmm:image64 --cells euler:karras:6,dpmpp_2m:karras:4 --json-out out.json
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import numpy as np
import torch

from steindiff.bench.runner import _calibration_reference, _noise, calibration_options
from steindiff.io import save_json
from steindiff.metrics import image_model_metrics
from steindiff.models.registry import load_model
from steindiff.plan import make_plan
from steindiff.sampling import sample
from steindiff.trajectory import ReferenceSolve, _Params, closed_form_gammas

KINDS = ("base", "multistep", "time-shift")


class _Rescaled:
    """Stabilizer: ``x_{k+1} = x_k - gamma_k (x_k - T(x_k)) + beta_k (1 - s_{k+1}/s_k) (D_k - D_{k-1})`` (VE)."""

    def __init__(self, gammas: list[float], betas: list[float]):
        self.gammas, self.betas, self.prev = gammas, betas, None

    def step(self, op, x):
        with torch.no_grad():
            st = op(x)
        x_next = x - self.gammas[op.i] * (x - st.x_next)
        if self.betas[op.i] != 0.0 and self.prev is not None:
            x_next = x_next + self.betas[op.i] * (1.0 - op.sigma_next / op.sigma) * (st.denoised - self.prev)
        self.prev = st.denoised
        return x_next, st, None


def shifted_model(model, sigmas: list[float], shifts: list[float]):
    """``model`` given ``sigma e^{delta(sigma)}``, ``delta`` linear in ``log sigma`` between the levels."""
    log_s = np.log(np.asarray(sigmas[:-1], dtype=float))[::-1]
    delta = np.asarray(shifts, dtype=float)[::-1]

    def shifted(x, sigma, **kw):
        f = np.exp(np.interp(np.log(sigma.double().cpu().numpy()), log_s, delta))
        return model(x, sigma * torch.as_tensor(f, dtype=sigma.dtype, device=sigma.device), **kw)

    return shifted


def solve(model, x, solver: str, sigmas, gammas, betas, shifts):
    m = shifted_model(model, [float(s) for s in sigmas], shifts) if shifts is not None else model
    return sample(m, x, sigmas, solver, stabilizer=_Rescaled(gammas, betas)).x


def fit_cell(spec, ref: ReferenceSolve, noise: torch.Tensor, solver: str, schedule: str, nfe: int, kind: str,
             max_solves: int, plain_tail: int = 2) -> dict:
    """Fit ``kind``'s parameters on the first half of ``noise``; scores on the second half."""
    from scipy.optimize import least_squares

    base = make_plan(spec.process, solver, nfe, schedule)
    n_fit = noise.shape[0] // 2
    x_fit, x_val = noise[:n_fit], noise[n_fit:]
    t_fit, t_val = ref.final[:n_fit], ref.final[n_fit:]
    ref_fit = ReferenceSolve(ref.sigmas, ref.states[:, :n_fit], t_fit, ref.solver, ref.steps, ref.convergence,
                             ref.wall_s)
    g0 = closed_form_gammas(spec.denoiser, x_fit, base, ref_fit, plain_tail=plain_tail)
    P = _Params(base, "both", float(spec.process.sigma_min), g0, plain_tail)
    N = base.steps
    th0 = P.initial()
    lo, hi = P.bounds((0.5, 1.5))
    k0 = th0.size
    n_beta = max(N - plain_tail - 1, 0) if kind == "multistep" else 0  # steps 1 .. N - plain_tail - 1
    n_shift = N - 1 if kind == "time-shift" else 0  # levels 0 .. N - 2; the last level keeps its sigma
    th0 = np.concatenate([th0, np.zeros(n_beta + n_shift)])
    lo = np.concatenate([lo, -np.ones(n_beta), -0.3 * np.ones(n_shift)])
    hi = np.concatenate([hi, np.ones(n_beta), 0.3 * np.ones(n_shift)])

    def decode(th):
        sigmas, gammas = P.decode(th[:k0])
        betas = [0.0] + [float(b) for b in th[k0:k0 + n_beta]] + [0.0] * (N - 1 - n_beta)
        shifts = [float(d) for d in th[k0 + n_beta:]] + [0.0] if n_shift else None
        return sigmas, gammas, betas, shifts

    def run(x, th):
        sigmas, gammas, betas, shifts = decode(th)
        return solve(spec.denoiser, x, solver, sigmas, gammas, betas, shifts)

    # the plain plan: every gamma 1, the base levels
    plain = _Params(base, "both", float(spec.process.sigma_min), [1.0] * N, plain_tail).initial()
    plain_theta = np.concatenate([plain, np.zeros(n_beta + n_shift)])
    plain_fit = run(x_fit, plain_theta)
    scale = float((plain_fit - t_fit).double().pow(2).sum().sqrt()) or 1.0
    best = {"cost": math.inf, "theta": th0.copy(), "solves": 0}

    class _Stop(Exception):
        pass

    def residuals(th):
        if best["solves"] >= max_solves:
            raise _Stop
        best["solves"] += 1
        r = ((run(x_fit, th) - t_fit).double().reshape(-1) / scale).cpu().numpy()
        if not np.isfinite(r).all():
            r = np.full_like(r, 1e3 / math.sqrt(r.size))
        r = np.concatenate([r, P.penalty(th[:k0], 1e-2, 1e-3), 0.1 * th[k0:]])
        cost = float(r @ r)
        if cost < best["cost"]:
            best.update(cost=cost, theta=th.copy())
        return r

    t0 = time.perf_counter()
    try:
        least_squares(residuals, np.clip(th0, lo, hi), bounds=(lo, hi), method="trf", diff_step=1e-3,
                      xtol=1e-8, ftol=1e-8, gtol=1e-10)
    except _Stop:
        pass
    th = best["theta"]

    def dist(x, t):
        return (x - t).double().reshape(len(x), -1).pow(2).mean(1).sqrt()

    plain_val = dist(run(x_val, plain_theta), t_val)
    cal_val = dist(run(x_val, th), t_val)
    fit_rms = float(dist(run(x_fit, th), t_fit).pow(2).mean().sqrt() / dist(plain_fit, t_fit).pow(2).mean().sqrt())
    return {"kind": kind, "params": int(th.size), "solves": best["solves"], "fit_s": time.perf_counter() - t0,
            "fit_rms_ratio": fit_rms,
            "val_rms_ratio": float(cal_val.pow(2).mean().sqrt() / plain_val.pow(2).mean().sqrt()),
            "val_median_ratio": float(cal_val.median() / plain_val.median()),
            "plan": lambda x: run(x, th)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gmm:image64")
    p.add_argument("--cells", required=True, help="comma-separated solver:schedule:nfe")
    p.add_argument("--kinds", default=",".join(KINDS), help=f"parameterisations, from {', '.join(KINDS)}")
    p.add_argument("--max-solves", type=int, default=400, help="solve budget of each fit")
    p.add_argument("--eval-seeds", default=None, help="image models: evaluation seeds for the primary metric")
    p.add_argument("--n", type=int, default=400, help="samples per evaluation seed")
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    try:
        kinds = [k for k in args.kinds.split(",") if k]
        bad = [k for k in kinds if k not in KINDS]
        if bad:
            raise ValueError(f"unknown kind(s) {', '.join(bad)}; choose from {', '.join(KINDS)}")
        cells = []
        for c in args.cells.split(","):
            parts = c.split(":")
            if len(parts) != 3 or not parts[2].isdigit():
                raise ValueError(f"cells are solver:schedule:nfe, comma-separated; got {c!r}")
            cells.append((parts[0], parts[1], int(parts[2])))
        spec = load_model(args.model)
        seeds = [int(s) for s in args.eval_seeds.split(",")] if args.eval_seeds else []
        if seeds and spec.gmm is not None:
            raise ValueError("--eval-seeds is for image models")
    except (ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    opts = calibration_options(spec)
    ref = _calibration_reference(spec, opts)
    noise = ref.states[0]
    metric = "patch_fd" if spec.info.get("metrics") == "patches" else "digits_fid"
    rows = []
    for solver, schedule, nfe in cells:
        for kind in kinds:
            r = fit_cell(spec, ref, noise, solver, schedule, nfe, kind, args.max_solves)
            plan = r.pop("plan")
            row = {"cell": f"{solver}:{schedule}:{nfe}", **r}
            if seeds:
                ex = []
                for seed in seeds:
                    m = image_model_metrics(plan(_noise(spec, args.n, seed)).clamp(-1, 1), spec, seed=seed)
                    ex.append(float(m[metric] - m[f"{metric}_floor"]))
                row[f"excess_{metric}"] = {"mean": statistics.mean(ex), "per_seed": ex}
            rows.append(row)
            print(f"{row['cell']} {kind}: {row['params']} parameters, {row['solves']} solves; validation RMS "
                  f"{row['val_rms_ratio']:.3f}x plain, median sample {row['val_median_ratio']:.3f}x; fit RMS "
                  f"{row['fit_rms_ratio']:.3f}x" + (f"; excess {metric} {row[f'excess_{metric}']['mean']:.3f}"
                                                    if seeds else ""), flush=True)
    if args.json_out:
        save_json(args.json_out, {"model": args.model, "calibration": opts, "rows": rows,
                                  "command": "python benchmarks/extra_freedom.py " + " ".join(
                                      sys.argv[1:] if argv is None else argv)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
