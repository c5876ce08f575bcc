"""Contractivity diagnostics: local Lipschitz constants of each step operator along real trajectories.

:func:`diagnose` runs a sampler (optionally stabilized) through the loop of :func:`steindiff.sampling.sample`
(:func:`steindiff.sampling.steps`), and at each step ``k`` (input noise level ``s = sigma_k``, output
``t = sigma_{k+1}``) measures at every sample's input state ``x_k``:

- ``L_T``: the local Lipschitz constant of the solver's step operator ``T`` (history held fixed),
  the largest singular value of the per-sample Jacobian ``dT/dx`` (:func:`step_lipschitz`);
- ``L_D``: the local Lipschitz constant of the denoiser ``x -> D(x, s)``;
- ``bound``: the paper's first-order certificate ``sigma_t/sigma_s + sigma_t * h * L_D``, with
  ``h = lambda_t - lambda_s`` and ``lambda = log(alpha/sigma)`` (log-SNR); per sample, with the
  sample's ``L_D``.  Undefined (``None``) for a final step to ``sigma = 0`` (``h = inf``);
- ``bound_first_order``: the exact triangle-inequality bound of a first-order (DDIM/Euler) step,
  ``T = (sigma_t/sigma_s) x + (1 - sigma_t/sigma_s) D(x)`` in VE coordinates, so
  ``L_T <= sigma_t/sigma_s + (1 - sigma_t/sigma_s) L_D`` (note ``1 - e^{-h} <= h``); it equals
  ``L_D`` at a final step to 0.  Both bounds are theorems for first-order steps only; for
  higher-order or multistep steps they are reference curves.
- with a stabilizer, ``gamma`` and ``L_S`` of the stabilized step ``S(x) = x_{k-1}`` with ``gamma``
  held at its batch value (``S = (1 - gamma)(a_k/a_{k-1}) x + gamma T(x)`` in VE, ``a`` the
  stabilizer's coordinate scales; its dependence on one sample through batch means is ignored).

Coordinates (``coords``): ``ve`` (EDM; ``alpha = 1``, the state as the solvers carry it; ``sigma``
the VE noise level) or ``vp`` (``x_vp = alpha x`` with ``alpha = 1/sqrt(1 + sigma^2)``,
``sigma_vp = alpha sigma``).  Changing coordinates is linear, so
``L_T(vp) = L_T(ve) * alpha_t/alpha_s`` and ``L_D(vp) = L_D(ve) / alpha_s`` (``D`` as a function of
``x_vp``), and the bounds are evaluated with the ``sigma`` and ``L_D`` of the chosen coordinates.
``h`` is the same in both (``lambda = log(alpha/sigma_vp) = -log sigma_ve``).

The threshold of strict contraction is ``L = 1``; ``frac_gt_1`` is the fraction of samples whose
step expands some direction.  ``trajectory_amplification`` is the per-sample product of the
per-step constants (with a multistep solver's history held fixed at each step, so for those it is
not a bound of the end-to-end map).
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import torch

from ..models.registry import ModelSpec, load_model
from ..noise import coordinate_scales
from ..plan import SamplingPlan, make_plan
from ..plotting import figure, save_figure
from ..sampling import prior_noise, steps
from ..solvers import Step, StepOperator
from ..stabilizers import Stabilizer, make_stabilizer
from .lipschitz import denoiser_lipschitz, step_lipschitz

__all__ = ["diagnose", "summarize", "plot_diagnosis", "quantiles", "SCHEMA"]

SCHEMA = "steindiff.diagnose/1"

DEFINITIONS = {
    "lipschitz": "largest singular value of the per-sample Jacobian dT/dx of the step operator at the step's input "
                 "state (solver history fixed)",
    "lipschitz_D": "largest singular value of the per-sample Jacobian of x -> D(x, sigma_s)",
    "bound": "paper's certificate sigma_t/sigma_s + sigma_t*h*L_D per sample, h = lambda_t - lambda_s, lambda = "
             "log(alpha/sigma); null at a final step to sigma=0",
    "bound_first_order": "exact bound of a first-order step: (alpha_t/alpha_s)(sigma_t/sigma_s + (1 - "
                         "sigma_t/sigma_s) L_D) with VE sigma and VE L_D",
    "coords": "ve: x as the solver carries it (alpha=1); vp: x_vp = alpha x, alpha = 1/sqrt(1+sigma^2); "
              "L(vp) = L(ve) alpha_t/alpha_s",
    "frac_gt_1": "fraction of samples with L > 1 (not a strict contraction)",
    "lipschitz_stabilized": "same for the stabilized step S(x) = (1-gamma)(a_s/a_t) x + gamma T(x) (VE; "
                            "gamma at its batch value)",
    "trajectory_amplification": "per-sample product over steps of the per-step L (history fixed)",
}

_QUANTILES = (("q05", 0.05), ("q25", 0.25), ("median", 0.5), ("q75", 0.75), ("q95", 0.95))


def quantiles(vals: torch.Tensor, threshold: float | None = 1.0) -> dict[str, float]:
    """``min``, ``q05``, ``q25``, ``median``, ``q75``, ``q95``, ``max``, ``mean`` of a 1-D tensor and,
    with ``threshold``, ``frac_gt_1`` (the fraction above it)."""
    v = vals.detach().reshape(-1).to(torch.float64).cpu()
    qs = torch.quantile(v, torch.tensor([q for _, q in _QUANTILES], dtype=torch.float64))
    out = {"min": float(v.min())}
    out.update({k: float(q) for (k, _), q in zip(_QUANTILES, qs)})
    out.update(max=float(v.max()), mean=float(v.mean()))
    if threshold is not None:
        out["frac_gt_1"] = float((v > threshold).to(torch.float64).mean())
    return out


class _StabilizedOperator:
    """``S(x) = c x + gamma T(x)`` (VE), the stabilized step with ``gamma`` held fixed; quacks like
    a :class:`~steindiff.solvers.StepOperator` for :func:`step_lipschitz`."""

    def __init__(self, op: StepOperator, gamma: float, c: float):
        self.op, self.gamma, self.c = op, float(gamma), float(c)
        self.denoise = op.denoise

    def __call__(self, x: torch.Tensor) -> Step:
        st = self.op(x)
        return Step(self.c * x + self.gamma * st.x_next, st.denoised, st.state)

    def extra_passes(self):
        return self.op.extra_passes()

    def restrict(self, sl: slice, n: int) -> "_StabilizedOperator":
        return _StabilizedOperator(self.op.restrict(sl, n), self.gamma, self.c)


def _chunked(fn: Callable[..., tuple[torch.Tensor, dict]], x: torch.Tensor, batch_size: int | None, seed: int,
             passes: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a sample-wise estimator ``fn(x_chunk, seed, slice)`` over chunks of ``x``: the values and
    their last relative changes, concatenated; the pass counts are added to ``passes``."""
    n = x.shape[0]
    bs = n if batch_size is None else int(batch_size)
    vals, rel = [], []
    for j, start in enumerate(range(0, n, bs)):
        sl = slice(start, min(start + bs, n))
        v, info = fn(x[sl], seed + 7919 * j, sl)
        vals.append(v)
        rel.append(info["rel_change"])
        for k in ("jvp", "vjp", "model"):
            passes[k] += int(info.get(f"{k}_passes") or 0)
        passes["jvp_mode"] = passes["jvp_mode"] or info["jvp_mode"]
    return torch.cat(vals), torch.cat(rel)


def diagnose(spec: Any, solver: str = "dpmpp_2m", nfe: int = 6, schedule: str = "karras", n: int = 256, seed: int = 0,
             coords: str = "ve", *, stabilizer: Stabilizer | str | None = None, iters: int = 20,
             method: str = "lanczos", jvp: str = "auto", denoiser: bool = True, rho: float = 7.0,
             dtype: torch.dtype = torch.float32, batch_size: int | None = None, sigmas: Any | None = None,
             plan: SamplingPlan | None = None, solver_options: dict | None = None, progress: bool = False,
             device: str | torch.device | None = None) -> dict[str, Any]:
    """Local Lipschitz constants of every step of a ``solver`` solve of ``spec`` at the sampled states.

    ``spec``: a :class:`~steindiff.models.registry.ModelSpec` or a model name.  ``solver``,
    ``nfe``, ``schedule``, ``rho``, ``n``, ``seed``, ``dtype``: as :func:`steindiff.generate.generate`
    (the same initial noise and trajectory; ``sigmas`` overrides the schedule, a ``plan`` all of them).  ``coords``:
    ``ve`` or ``vp`` (module docstring).  ``stabilizer``: ``None``/``"none"``, a name for
    :func:`~steindiff.stabilizers.make_stabilizer` (built with ``coords`` and ``seed``) or a
    stabilizer object; the trajectory is then the stabilized one.  ``iters``, ``method``, ``jvp``:
    of :func:`~steindiff.diagnostics.lipschitz.lipschitz`.  ``denoiser``: also measure ``L_D``
    (needed for the bounds).  ``batch_size``: samples per Jacobian-product batch (the sampler
    itself runs the whole batch, as a stabilizer's batch statistics need).  ``device``: where the
    states live (default: the model's device, else the CPU); the initial noise is drawn on the CPU.

    Returns the full record (JSON-ready through :func:`steindiff.io.to_jsonable`): ``schema``,
    ``config``, ``definitions``, ``steps`` (one dict per step: noise levels, ``h``, quantiles of
    ``lipschitz``, ``lipschitz_D``, ``bound``, ``bound_first_order``, stabilizer values, power or
    Lanczos convergence, and ``per_sample`` tensors), ``passes``, ``summary`` and ``x`` (the final
    samples, identical to :func:`~steindiff.generate.generate`'s with the same arguments).
    """
    t0 = time.perf_counter()
    if isinstance(spec, str):
        spec = load_model(spec)
    if not isinstance(spec, ModelSpec):
        raise TypeError(f"spec must be a ModelSpec or a model name, got {type(spec).__name__}")
    coordinate_scales(coords, 1.0, 0.5)  # validates coords
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if batch_size is not None and int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")
    stab_name = "none"
    if isinstance(stabilizer, str):
        stab_name = stabilizer
        stabilizer = make_stabilizer(stabilizer, spec, coords=coords, seed=seed)
    elif stabilizer is not None:
        stab_name = getattr(stabilizer, "name", type(stabilizer).__name__)
    if stabilizer is not None and getattr(stabilizer, "per_sample", False):
        raise ValueError("per-sample gamma stabilizers are not supported by the diagnostics (gamma "
                         "must be one value per step)")
    if plan is None:
        plan = make_plan(spec.process, solver, nfe, schedule, rho=rho, sigmas=sigmas, solver_options=solver_options)
    solver_obj = plan.get_solver()
    sig = [float(s) for s in plan.sigmas]
    device = torch.device(device) if device is not None else (spec.device or torch.device("cpu"))
    x = prior_noise((n, *spec.sample_shape), sig[0], spec.process, seed=seed, dtype=dtype, device=device)
    n_steps = len(sig) - 1
    lip_opts = {"iters": iters, "method": method, "jvp": jvp}
    passes = {"jvp": 0, "vjp": 0, "model": 0, "jvp_mode": None}
    stab_extra, nfe_done = 0, 0
    records: list[dict] = []
    amp = torch.ones(n, dtype=torch.float64)
    amp_s = torch.ones(n, dtype=torch.float64) if stabilizer is not None else None

    def lipschitz(op: Any, x: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample ``L`` of the step ``op`` at ``x`` (and its last relative change), over chunks of
        ``batch_size`` samples."""
        return _chunked(lambda xs, sd, sl: step_lipschitz(op.restrict(sl, n), xs, seed=sd, return_info=True,
                                                          **lip_opts), x, batch_size, seed, passes)

    # the sampler's own loop; each step is measured at its input state after it ran (the estimators draw
    # from their own seeded generators and count their model passes apart, so the trajectory is the sampler's)
    for ev in steps(spec.denoiser, x, sig, solver_obj, stabilizer=stabilizer, dtype=dtype, progress=progress):
        i, op, x, s, t = ev.i, ev.op, ev.x.detach(), ev.op.sigma, ev.op.sigma_next
        denoise = op.denoise
        a_s, a_t, sc_s = coordinate_scales(coords, s, t)
        sc_t = a_t * t
        L_ve, rel_T = lipschitz(op, x, seed + 101 * i)
        L = L_ve * (a_t / a_s)
        amp *= L.cpu()
        h = math.log(s / t) if t > 0 else math.inf
        rec: dict[str, Any] = {"step": i, "sigma": s, "sigma_next": t, "h": h if t > 0 else None,
                               "alpha": a_s, "alpha_next": a_t, "sigma_c": sc_s, "sigma_next_c": sc_t,
                               "lipschitz": quantiles(L)}
        per: dict[str, torch.Tensor] = {"lipschitz": L}
        conv = {"rel_change_max": float(rel_T.max()), "rel_change_median": float(rel_T.median())}
        if denoiser:
            LD_ve, rel_D = _chunked(
                lambda xs, sd, sl: denoiser_lipschitz(denoise, xs, s, seed=sd, return_info=True, **lip_opts),
                x, batch_size, seed + 101 * i + 50, passes)
            LD = LD_ve / a_s
            first = (a_t / a_s) * (t / s + (1 - t / s) * LD_ve)
            rec.update(lipschitz_D=quantiles(LD, threshold=None), bound_first_order=quantiles(first),
                       frac_above_first_order_bound=float((L > first * (1 + 1e-5) + 1e-9).to(torch.float64).mean()))
            if t > 0:
                bound = sc_t / sc_s + sc_t * h * LD
                rec["bound"] = quantiles(bound)
                rec["frac_above_bound"] = float((L > bound * (1 + 1e-5) + 1e-9).to(torch.float64).mean())
                per["bound"] = bound
            else:
                rec["bound"], rec["frac_above_bound"] = None, None
            per["lipschitz_D"] = LD
            conv["rel_change_max_D"] = float(rel_D.max())
        if stabilizer is not None:
            srec = ev.record
            stab_extra += int(srec.get("extra_passes", 0))
            gamma = float(srec["gamma"])
            ga, ga_next, _ = coordinate_scales(getattr(stabilizer, "coords", "ve"), s, t)
            LS_ve, rel_S = lipschitz(_StabilizedOperator(op, gamma, (1 - gamma) * ga / ga_next), x, seed + 101 * i)
            LS = LS_ve * (a_t / a_s)
            amp_s *= LS.cpu()
            rec.update(gamma=gamma, gamma_raw=srec.get("gamma_raw"), lipschitz_stabilized=quantiles(LS))
            per["lipschitz_stabilized"] = LS
            conv["rel_change_max_stabilized"] = float(rel_S.max())
        rec["nfe_step"], nfe_done = denoise.calls - nfe_done, denoise.calls
        rec["convergence"] = conv
        rec["per_sample"] = {k: v.detach().cpu() for k, v in per.items()}
        records.append(rec)
    x = ev.x_next

    config = {"model": spec.name, "solver": plan.solver, "nfe": nfe_done, "steps": n_steps, "schedule": schedule,
              "rho": rho, "n": n, "seed": seed, "coords": coords, "stabilizer": stab_name, "iters": iters,
              "method": method, "dtype": str(dtype).removeprefix("torch."), "sigmas": sig}
    result = {
        "schema": SCHEMA, "config": config, "definitions": DEFINITIONS, "steps": records,
        "passes": {"nfe": nfe_done, "lipschitz_model_passes": passes["model"], "jvp": passes["jvp"],
                   "vjp": passes["vjp"], "jvp_mode": passes["jvp_mode"], "stabilizer_extra_passes": stab_extra},
        "per_sample": {"trajectory_amplification": amp},
    }
    summ = {
        "median_per_step": [r["lipschitz"]["median"] for r in records],
        "max_per_step": [r["lipschitz"]["max"] for r in records],
        "frac_gt_1_per_step": [r["lipschitz"]["frac_gt_1"] for r in records],
        "peak_median": max(r["lipschitz"]["median"] for r in records),
        "peak_max": max(r["lipschitz"]["max"] for r in records),
        "steps_with_median_gt_1": sum(r["lipschitz"]["median"] > 1 for r in records),
        "frac_gt_1_overall": sum(r["lipschitz"]["frac_gt_1"] for r in records) / n_steps,
        "trajectory_amplification": quantiles(amp, threshold=None),
    }
    if denoiser:
        summ["lipschitz_D_median_per_step"] = [r["lipschitz_D"]["median"] for r in records]
        summ["bound_median_per_step"] = [r["bound"]["median"] if r["bound"] else None for r in records]
        summ["bound_first_order_median_per_step"] = [r["bound_first_order"]["median"] for r in records]
    if stabilizer is not None:
        summ["gammas"] = [r["gamma"] for r in records]
        summ["stabilized_median_per_step"] = [r["lipschitz_stabilized"]["median"] for r in records]
        summ["stabilized_max_per_step"] = [r["lipschitz_stabilized"]["max"] for r in records]
        summ["stabilized_frac_gt_1_per_step"] = [r["lipschitz_stabilized"]["frac_gt_1"] for r in records]
        summ["stabilized_trajectory_amplification"] = quantiles(amp_s, threshold=None)
        result["per_sample"]["stabilized_trajectory_amplification"] = amp_s
    result.update(summary=summ, x=x, wall_s=time.perf_counter() - t0)
    return result


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """The record of :func:`diagnose` without the per-sample tensors and samples (for ``--json``)."""
    out = {k: v for k, v in result.items() if k not in ("per_sample", "definitions", "x")}
    out["steps"] = [{k: v for k, v in r.items() if k != "per_sample"} for r in result["steps"]]
    return out


def plot_diagnosis(result: dict[str, Any], path: str, title: str | None = None) -> None:
    """Per-step picture (the analogue of the paper's Figure 4), saved atomically as PNG to ``path``.

    Top: quantile bands (5-95%, 25-75%) of the per-sample Lipschitz constants of each step against
    the step's input noise level (log scale, sampling order left to right), the median and the
    maximum, the strict-contraction threshold 1, the paper's bound and the first-order bound
    (medians over samples), and the stabilized step's band when present.  Bottom: the fraction of
    samples with ``L > 1`` per step.
    """
    steps, cfg = result["steps"], result["config"]
    sig = [r["sigma"] for r in steps]
    fig, (ax, ax2) = figure(2, 1, figsize=(7.5, 6.0), dpi=120, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    tiny = 1e-6

    def band(key: str, color: str, label: str) -> None:
        q = {k: [max(r[key][k], tiny) for r in steps] for k in ("q05", "q25", "median", "q75", "q95", "max")}
        ax.fill_between(sig, q["q05"], q["q95"], color=color, alpha=0.15, lw=0)
        ax.fill_between(sig, q["q25"], q["q75"], color=color, alpha=0.35, lw=0)
        ax.plot(sig, q["median"], "o-", color=color, lw=1.8, ms=4, label=f"{label}: median (bands 25-75%, 5-95%)")
        ax.plot(sig, q["max"], "x", color=color, ms=7, label=f"{label}: max")

    band("lipschitz", "tab:blue", "step operator $L_T$")
    if steps and "lipschitz_stabilized" in steps[0]:
        band("lipschitz_stabilized", "tab:green", f"stabilized ({cfg.get('stabilizer')})")
    if steps and "bound_first_order" in steps[0]:
        bs = [(r["sigma"], r["bound"]["median"]) for r in steps if r.get("bound")]
        if bs:
            ax.plot([a for a, _ in bs], [max(b, tiny) for _, b in bs], ":", color="tab:purple", lw=1.8,
                    label=r"bound $\sigma_t/\sigma_s+\sigma_t h L_D$ (median)")
        ax.plot(sig, [max(r["bound_first_order"]["median"], tiny) for r in steps], "-.", color="tab:orange", lw=1.4,
                label=r"first-order bound $\frac{\sigma_t}{\sigma_s}+(1-\frac{\sigma_t}{\sigma_s})L_D$ (median)")
    ax.axhline(1.0, color="tab:red", ls="--", lw=1.2, label="strict contraction threshold 1")
    ax.set(xscale="log", yscale="log", ylabel=f"local Lipschitz constant ({cfg['coords'].upper()} coords)")
    if len(sig) > 1:
        ax.set_xlim(max(sig) * 1.4, min(sig) / 1.4)  # sampling order: high noise on the left
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    ax.set_title(title or f"{cfg['model']}: {cfg['solver']}, NFE {cfg['nfe']}, {cfg['schedule']}, n={cfg['n']}"
                 + (f", {cfg['stabilizer']}" if cfg.get("stabilizer", "none") != "none" else ""), fontsize=10)
    top = ax.secondary_xaxis("top")
    top.set_xticks(sig, labels=[str(r["step"]) for r in steps])
    top.minorticks_off()
    top.set_xlabel("step", fontsize=8)
    ax2.plot(sig, [r["lipschitz"]["frac_gt_1"] for r in steps], "o-", color="tab:blue", ms=4, label="$L_T > 1$")
    if steps and "lipschitz_stabilized" in steps[0]:
        ax2.plot(sig, [r["lipschitz_stabilized"]["frac_gt_1"] for r in steps], "s--", color="tab:green", ms=4,
                 label="stabilized > 1")
        ax2.legend(fontsize=7)
    ax2.set(ylim=(-0.05, 1.05), xlabel=r"input noise level $\sigma_s$ of the step (VE)")
    ax2.set_ylabel("fraction > 1", fontsize=9)
    ax2.set_xticks(sig, labels=[f"{s:.3g}" for s in sig])
    ax2.minorticks_off()
    ax2.grid(True, alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
