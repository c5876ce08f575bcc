"""The calibrated sampler's gradient fit: backpropagation through the few-step solve.

:func:`gradient_fit` fits a plan's parameters so that its few-step solve from the calibration noise ends
close to a teacher's samples from the same noise (a fine solve of the same model,
:func:`steindiff.trajectory.reference_solve`), by Adam on mini-batches of teacher pairs, the gradient taken
through the solve itself: every solver is differentiable in its noise levels
(:mod:`steindiff.solvers.base`), and the solve recomputes each step's activations in the backward pass
(``checkpoint``), so memory holds about one step's.  Nothing here is specific to a solver: the fitted
parameters are those a :class:`~steindiff.stabilizers.schedule.GammaSchedule` applies around any step
operator, and the solve is :func:`steindiff.sampling.sample` with that schedule, as at sampling time.

Parameters (:data:`PARAMS`, each selectable):

- ``steps``: the interior noise levels, as log-gaps ``z`` with ``log sigma_i = log sigma_0 - L
  cumsum(softmax(z))_i`` (:class:`steindiff.trajectory._Params`: strictly decreasing for any ``z``);
- ``gamma``: one ``gamma_k`` per step of the rescaled update ``x_{k+1} = x_k - gamma_k (x_k - T(x_k))``,
  except the last ``plain_tail`` steps;
- ``model_sigmas``: the noise level fed to the model at each level, ``sigma_j exp(delta_j)`` (LD3's
  decoupled model-input times, Tong et al. 2025);
- ``history``: corrections ``c_{k,j}`` of each step over the past ``history_depth`` denoised outputs,
  ``T'(x_k) = T(x_k) + (1 - sigma_{k+1}/sigma_k) sum_j c_{k,j} (D_k - D_{k-j})`` (S4S/GS-style).

Loss (per sample, averaged over the batch, relative to the plain solver's on the fit set):

    ||f(x_N(theta)) - f(x_teacher)||^2 / d  +  w_R log(R(x_N) / R(x_teacher))^2  +  regularisers

with ``f`` the identity (``loss="l2"``) or a user's feature function, and ``R(x) = RMS(D(x, sigma_floor) -
x)`` the residual noise one more denoising pass removes (one extra model pass per batch, only when
``residual_weight > 0``).  Soft teacher forcing (LD3): with ``teacher_ball = r > 0`` each training sample's
start may move within ``||x'_0 - x_0|| <= r ||x_0||`` (a free offset per sample, projected onto the ball
after every step, used only during the fit: the fitted plan starts from the user's noise).

Start: the plain plan, or (``start="gits"`` in :func:`fit_trajectory_gradient`) the noise levels GITS finds by
dynamic programming on the teacher's trajectories (Chen et al. 2024), a better basin for the few-step levels.

Early stopping: every ``val_every`` steps the plan (no offsets) is solved from held-out noise; the
parameters with the lowest held-out loss are kept.  A non-finite or exploding loss stops the fit with a
message in ``info["stopped"]``; the best held-out parameters so far (at worst the starting plan) are
returned, never a broken plan.

Precision: the fit runs in the noise's dtype (float64 where the model allows it, e.g. exact mixtures;
float32 otherwise) with TF32 off (:func:`steindiff.device.exact_float32`) and autocast disabled, the
parameters in float64: TF32's and bf16's rounding is as large as the parameters' late changes.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from .device import exact_float32
from .plan import SamplingPlan
from .sampling import sample
from .stabilizers.base import NotDifferentiableError
from .stabilizers.schedule import GammaSchedule
from .trajectory import DEFAULT_GUARDS, ReferenceSolve, TrajectoryFit, _Params, calibration_batch, validate_candidates

__all__ = ["gradient_fit", "fit_trajectory_gradient", "PARAMS", "DEFAULT_PARAMS", "DEFAULT_LRS", "LOSSES",
           "FIT_METHODS", "STARTS", "DEFAULT_START", "check_params", "check_param_sets", "params_record",
           "describe_loss"]

#: What the gradient fit can fit (module docstring).
PARAMS = ("steps", "gamma", "model_sigmas", "history")
#: The default parameter set: of the three studied, the one the evidence rule of --stabilizer auto admits over the
#: study's cells with no secondary metric worse (benchmarks/gradient_fit_study.py;
#: docs/calibrated-sampler-gradient.md).  The three sets together also pass it, at three times the cost and with
#: more hidden trades on the full gmm:image64 grid.
DEFAULT_PARAMS = ("steps", "model_sigmas")
#: Distances the fit can minimise: ``l2`` on the samples, or ``features`` (a user's ``features(x) -> tensor``).
LOSSES = ("l2", "features")
#: The learning rates :func:`fit_trajectory_gradient` tries (the lower held-out loss wins): chosen by
#: benchmarks/gradient_fit_study.py (docs/calibrated-sampler-gradient.md).
DEFAULT_LRS = (0.03, 0.1)
#: How a trajectory calibration is fitted: finite differences of whole solves, or gradients through the solve.
FIT_METHODS = ("derivative-free", "gradient")
#: Where the fit starts (:func:`fit_trajectory_gradient`'s ``start``): the plain plan's noise levels, or GITS's
#: levels searched on the teacher's trajectories of the fit part (:func:`steindiff.peers.gits.gits_plan`).
STARTS = ("plain", "gits")
#: The default start: GITS's levels.  Measured against the plain start (benchmarks/gradient_fit_study.py, the
#: gmm:image64 grid of steindiff bench; docs/calibrated-sampler-gradient.md): more of the gap to the fine solve
#: closed, ahead of LD3 in more cells, as few hidden trades, at half the fit's time on digits.
DEFAULT_START = "gits"

_BOUNDS = {"model_sigmas": 0.5, "history": 1.0}  # |delta_j| (log ratio) and |c_kj| stay within these
#: Learning rate of each kind of parameter relative to ``lr``: the log-gaps range over a few units (the last
#: level may move by two orders of magnitude), the others over a fraction of one.
_LR_SCALE = {"steps": 3.0, "gamma": 1.0, "model_sigmas": 1.0, "history": 1.0}
_WARMUP = 0.05  # fraction of max_iters over which the learning rate ramps up (no overshoot on the first steps)
_REG = {"gamma": 1e-2, "steps": 1e-3, "model_sigmas": 1e-3, "history": 1e-3}


def check_params(params: str | Sequence[str]) -> tuple[str, ...]:
    """``params`` as a tuple of :data:`PARAMS` names (a comma-separated string or a sequence), refused
    naming any unknown one."""
    if isinstance(params, str):
        params = [p.strip() for p in params.split(",") if p.strip()]
    unknown = [p for p in params if p not in PARAMS]
    if unknown or not params:
        raise ValueError(f"unknown or no gradient-fit parameter(s) {', '.join(map(repr, unknown)) or '(none)'}; "
                         f"choose from {', '.join(PARAMS)}")
    return tuple(p for p in PARAMS if p in params)


def check_param_sets(params: str | Sequence[str] | Sequence[Sequence[str]]) -> tuple[tuple[str, ...], ...]:
    """One or several parameter sets, each competing as its own candidate (:func:`fit_trajectory_gradient`):
    a sequence of names is one set; a sequence of sequences, or a string with sets separated by ``/``
    (``"steps,gamma/steps,history"``), is several.  Each set as :func:`check_params` gives it, in the given
    order, a set named twice once."""
    if isinstance(params, str):
        sets: list = [p for p in params.split("/") if p.strip()]
    elif params and all(not isinstance(p, str) for p in params):
        sets = list(params)
    else:
        sets = [params]
    if not sets:
        raise ValueError("no gradient-fit parameter set given")
    return tuple(dict.fromkeys(check_params(s) for s in sets))


def params_record(sets: tuple[tuple[str, ...], ...]) -> list:
    """Parameter sets as a calibration file and its cache key write them: one set as a list of names (as
    before several sets existed), several as a list of such lists."""
    return list(sets[0]) if len(sets) == 1 else [list(s) for s in sets]


def candidate_name(params: tuple[str, ...], several: bool) -> str:
    """The validation candidate of a parameter set: ``gradient``, or ``gradient:steps+gamma`` among several."""
    return f"gradient:{'+'.join(params)}" if several else "gradient"


def describe_loss(loss: str, features: Callable | None, residual_weight: float, teacher_ball: float) -> dict:
    """What a calibration records of the distance it minimised."""
    name = None
    if features is not None:
        name = getattr(features, "__qualname__", None) or getattr(type(features), "__qualname__", "features")
    return {"loss": loss, "features": name, "residual_weight": residual_weight, "teacher_ball": teacher_ball}


class _Theta:
    """The fitted parameters as float64 tensors, and the plan they decode to."""

    def __init__(self, base: SamplingPlan, params: tuple[str, ...], sigma_floor: float, gammas0: list[float],
                 plain_tail: int, history_depth: int, gamma_bounds: tuple[float, float],
                 model_sigma_bound: float | Sequence[float] = _BOUNDS["model_sigmas"]):
        self.base, self.params, self.bounds = base, params, gamma_bounds
        self.P = _Params(base, "both", sigma_floor, gammas0, plain_tail)
        n = self.n = base.steps
        f64 = torch.float64
        self.tensors: dict[str, torch.Tensor] = {}
        if "steps" in params and n >= 2:
            self.tensors["steps"] = torch.tensor(self.P.z0, dtype=f64)
        if "gamma" in params and self.P.ng >= 1:
            self.tensors["gamma"] = torch.tensor(gammas0[: self.P.ng], dtype=f64)
        if "model_sigmas" in params:
            self.tensors["model_sigmas"] = torch.zeros(n, dtype=f64)
        bound = torch.as_tensor(model_sigma_bound, dtype=f64)
        if bound.ndim > 1 or (bound.ndim == 1 and len(bound) != n) or not bool((bound >= 0).all()):
            raise ValueError(f"model_sigma_bound must be one bound >= 0 or {n} of them (one per level), got "
                             f"{model_sigma_bound!r}")
        self.ms_bound = bound.expand(n)
        self.hist_index = [(k, j) for k in range(1, n) for j in range(1, min(history_depth, k) + 1)]
        if "history" in params and self.hist_index:
            self.tensors["history"] = torch.zeros(len(self.hist_index), dtype=f64)
        self.gammas0 = list(gammas0)
        for t in self.tensors.values():
            t.requires_grad_(True)
        self.z_lo = torch.tensor(self.P.z0 - 1.0, dtype=f64)
        self.z_hi = torch.tensor([*(self.P.z0[:-1] + 1.0), max(self.P.z0[-1] + 1.0, -0.5)], dtype=f64)

    def sigmas(self) -> torch.Tensor:
        if "steps" not in self.tensors:
            return self.base.sigmas
        z = self.tensors["steps"]
        pos = torch.cumsum(torch.softmax(z, 0), 0)[:-1]
        interior = torch.exp(math.log(self.P.s0) - self.P.L * pos)
        s0 = torch.tensor([self.P.s0], dtype=torch.float64)
        return torch.cat([s0, interior, torch.zeros(1, dtype=torch.float64)])

    def gammas(self) -> list:
        if "gamma" not in self.tensors:
            return list(self.gammas0)
        return [*self.tensors["gamma"].unbind(0), *([1.0] * (self.n - self.P.ng))]

    def schedule(self, coords: str, sigmas: torch.Tensor) -> GammaSchedule:
        model_sigmas = history = None
        if "model_sigmas" in self.tensors and (self.tensors["model_sigmas"].requires_grad
                                               or bool((self.tensors["model_sigmas"] != 0).any())):
            model_sigmas = list((sigmas[:-1] * torch.exp(self.tensors["model_sigmas"])).unbind(0))
        if "history" in self.tensors:
            history = [[] for _ in range(self.n)]
            for (k, _), c in zip(self.hist_index, self.tensors["history"].unbind(0)):
                history[k].append(c)
        return GammaSchedule(self.gammas(), coords, model_sigmas=model_sigmas, history=history)

    def penalty(self, sigmas: torch.Tensor) -> torch.Tensor:
        out = torch.zeros((), dtype=torch.float64)
        if "gamma" in self.tensors:
            out = out + _REG["gamma"] * (self.tensors["gamma"] - 1.0).pow(2).sum()
        if "steps" in self.tensors:
            log_base = torch.as_tensor(self.P.log_base, dtype=torch.float64)
            out = out + _REG["steps"] * (torch.log(sigmas[1:-1]) - log_base).pow(2).sum()
        for k in ("model_sigmas", "history"):
            if k in self.tensors:
                out = out + _REG[k] * self.tensors[k].pow(2).sum()
        return out

    @torch.no_grad()
    def project(self) -> None:
        """Back into the box: each log-gap within a factor ``e`` of the base's share (the slack may grow to
        about a third of the range, as in the derivative-free fit), gammas within ``gamma_bounds``,
        model-level log ratios and history coefficients within :data:`_BOUNDS`."""
        for k, t in self.tensors.items():
            if k == "steps":
                t.copy_(torch.minimum(torch.maximum(t, self.z_lo), self.z_hi))
            elif k == "gamma":
                t.clamp_(*self.bounds)
            elif k == "model_sigmas":
                t.copy_(torch.minimum(torch.maximum(t, -self.ms_bound), self.ms_bound))
            else:
                t.clamp_(-_BOUNDS[k], _BOUNDS[k])

    def state(self) -> dict[str, torch.Tensor]:
        return {k: t.detach().clone() for k, t in self.tensors.items()}

    @torch.no_grad()
    def load(self, state: dict[str, torch.Tensor]) -> None:
        for k, t in state.items():
            self.tensors[k].copy_(t)

    @torch.no_grad()
    def plan(self) -> SamplingPlan:
        """The plan of the current parameters, in floats (what a calibration file stores)."""
        sigmas = self.sigmas().detach()
        sched = self.schedule(self.base.coords, sigmas)
        b = self.base
        model_sigmas = None if sched.model_sigmas is None else [float(v) for v in sched.model_sigmas]
        history = None if sched.history is None else [[float(c) for c in row] for row in sched.history]
        return SamplingPlan(b.solver, sigmas.clone(), "fitted" if "steps" in self.tensors else b.schedule,
                            [float(g) for g in sched.gammas], b.coords, b.solver_options, {}, model_sigmas, history)


def _residual(model: Callable, x: torch.Tensor, sigma: float, extra: dict | None) -> torch.Tensor:
    """RMS per coordinate of ``D(x, sigma) - x`` (differentiable in ``x``)."""
    s = torch.full((x.shape[0],), sigma, dtype=x.dtype, device=x.device)
    return (model(x, s, **(extra or {})) - x).double().pow(2).mean().sqrt()


def _probe(model: Callable, x: torch.Tensor, sigma: float, extra: dict | None, needs_sigma: bool) -> None:
    """One pass on two samples with autograd: the model's output must carry a gradient to its input and, when
    the fitted parameters move the noise levels it is given, to its noise level."""
    x = x.detach().clone().requires_grad_(True)
    s = torch.full((x.shape[0],), sigma, dtype=x.dtype, device=x.device, requires_grad=True)
    try:
        with torch.enable_grad():
            out = model(x, s, **(extra or {}))
            if not isinstance(out, torch.Tensor) or not out.requires_grad:
                raise _not_differentiable("its output carries no gradient")
            gx, gs = torch.autograd.grad(out.double().sum(), (x, s), allow_unused=True)
    except NotDifferentiableError:
        raise
    except RuntimeError as e:
        raise _not_differentiable(f"autograd failed: {e}") from e
    if gx is None:
        raise _not_differentiable("its output carries no gradient to its input x")
    if needs_sigma and (gs is None or not bool((gs != 0).any())):
        raise _not_differentiable("its output carries no gradient to its noise level; fit only gamma or history "
                                  "with gradients")


def _subset(extra: dict | None, idx: torch.Tensor, n: int) -> dict | None:
    if not extra:
        return extra
    return {k: (v[idx.to(v.device)] if isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == n else v)
            for k, v in extra.items()}


def _not_differentiable(why: str) -> NotDifferentiableError:
    return NotDifferentiableError(f"the gradient fit cannot differentiate through this model ({why}); calibrate it "
                                  "with the derivative-free fit instead (fit_method='derivative-free', "
                                  "`steindiff calibrate --fit-method derivative-free`)")


@exact_float32()
def gradient_fit(model: Callable[..., torch.Tensor], base: SamplingPlan, noise: torch.Tensor, target: torch.Tensor,
                 *, val_noise: torch.Tensor, val_target: torch.Tensor, sigma_floor: float,
                 params: str | Sequence[str] = DEFAULT_PARAMS, loss: str = "l2",
                 features: Callable[[torch.Tensor], torch.Tensor] | None = None, residual_weight: float = 0.0,
                 teacher_ball: float = 0.0, gammas0: list[float] | None = None,
                 gamma_bounds: tuple[float, float] = (0.5, 1.5), plain_tail: int = 2, history_depth: int = 2,
                 model_sigma_bound: float | Sequence[float] = _BOUNDS["model_sigmas"], lr: float = 0.03,
                 batch_size: int = 64, max_iters: int = 300, max_seconds: float = 60.0,
                 val_every: int = 10, patience: int = 8, explode: float = 100.0, checkpoint: bool | None = None,
                 seed: int = 0, extra_args: dict | None = None, val_extra_args: dict | None = None,
                 progress: bool = False) -> tuple[SamplingPlan, dict]:
    """Fit ``params`` of the plain plan ``base`` so that its solve from ``noise`` ends near ``target`` (the
    teacher's samples from the same noise), early-stopped on ``val_noise``/``val_target`` (module docstring).

    ``gammas0``: starting gammas (default all 1).  ``plain_tail``: final steps whose gamma stays 1.
    ``history_depth``: past denoised outputs each ``history`` correction reaches back to.  ``model_sigma_bound``:
    the largest ``|delta_j|`` of ``model_sigmas`` (one bound, or one per level; 0 keeps a level's model input
    fixed).  Budget: at most
    ``max_iters`` Adam steps (learning rate ``lr``, ``batch_size`` pairs each) and ``max_seconds``; it also stops
    after ``patience`` held-out checks without improvement.  ``explode``: a training loss above this many times
    the starting one stops the fit.  ``checkpoint``: recompute each step's activations in the backward pass
    (memory of about one step; costs about one more forward pass); default on CUDA devices, off on the CPU,
    where memory is rarely the limit.  ``extra_args``/``val_extra_args``: per-sample conditioning of the two sets.
    Returns the plan of the best held-out parameters and a record (``iters``, ``stopped``, the held-out
    loss of the start and of the best, the wall time, the distance minimised).

    Raises :class:`~steindiff.stabilizers.base.NotDifferentiableError` naming the derivative-free fit when the
    model's output carries no gradient (to its input or to its noise level) or autograd fails inside it.
    """
    with torch.autocast(noise.device.type, enabled=False):  # the fit's arithmetic in the state's own precision
        params = check_params(params)
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
        if (loss == "features") != (features is not None):
            raise ValueError("loss='features' needs a features(x) -> tensor function, and a features function needs "
                             "loss='features'")
        if teacher_ball < 0 or residual_weight < 0:
            raise ValueError(f"teacher_ball and residual_weight must be >= 0, got {teacher_ball} and {residual_weight}")
        if noise.shape != target.shape or val_noise.shape != val_target.shape or len(noise) < 1 or len(val_noise) < 1:
            raise ValueError("the fit and held-out sets need noise and teacher samples of the same shape, at least one "
                             "each")
        t0 = time.perf_counter()
        n = noise.shape[0]
        if checkpoint is None:
            checkpoint = noise.is_cuda
        theta = _Theta(base, params, sigma_floor, list(gammas0 or [1.0] * base.steps), plain_tail, history_depth,
                       gamma_bounds, model_sigma_bound)
        info: dict[str, Any] = {"method": "gradient", "params": list(params), "fitted": sorted(theta.tensors),
                                "distance": describe_loss(loss, features, residual_weight, teacher_ball), "iters": 0,
                                "stopped": "max_iters", "checkpoint": checkpoint,
                                "dtype": str(noise.dtype).split(".")[-1]}
        if not theta.tensors:
            info.update(stopped="nothing to fit", wall_s=time.perf_counter() - t0)
            return theta.plan(), info
        _probe(model, noise[:2], float(base.sigmas[min(1, base.steps - 1)]), _subset(extra_args, torch.arange(2), n),
               needs_sigma=bool({"steps", "model_sigmas"} & set(theta.tensors)))
        solver = base.get_solver()
        feats = features if features is not None else (lambda x: x)

        def distance(x: torch.Tensor, t_feat: torch.Tensor) -> torch.Tensor:
            f = feats(x)
            return (f - t_feat).double().reshape(len(x), -1).pow(2).mean(1)

        with torch.no_grad():
            t_feat_fit = feats(target)
            t_feat_val = feats(val_target)
            r_target = _residual(model, target, sigma_floor, extra_args) if residual_weight > 0 else None

        def solve(x: torch.Tensor, extra: dict | None, grad: bool) -> torch.Tensor:
            with torch.set_grad_enabled(grad):
                sig = theta.sigmas()
                return sample(model, x, sig, solver, stabilizer=theta.schedule(base.coords, sig), extra_args=extra,
                              checkpoint=checkpoint and grad).x

        def objective(x: torch.Tensor, t_feat: torch.Tensor, extra: dict | None, scale: float) -> torch.Tensor:
            out = distance(x, t_feat).mean() / scale
            if r_target is not None:
                out = out + residual_weight * torch.log(_residual(model, x, sigma_floor, extra) / r_target).pow(2)
            return out

        with torch.no_grad():
            plain = sample(model, noise, base.sigmas, solver, extra_args=extra_args).x
            scale = float(distance(plain, t_feat_fit).mean()) or 1.0

        def held_out() -> float:
            try:
                with torch.no_grad():
                    v = float(objective(solve(val_noise, val_extra_args, False), t_feat_val, val_extra_args, scale))
            except FloatingPointError:  # the model returned NaN or Inf for these parameters: the worst score
                return math.inf
            return v if math.isfinite(v) else math.inf

        best = {"val": held_out(), "state": theta.state(), "iter": 0}
        info["val_start"] = best["val"]
        offsets = None
        if teacher_ball > 0:
            # soft teacher forcing: x'_0 = x_0 + b_i v_i with ||v_i|| <= sqrt(d), b_i = r ||x_0,i|| / sqrt(d)
            d = noise[0].numel()
            ball = (teacher_ball * noise.reshape(n, -1).double().norm(dim=1) / math.sqrt(d)).to(noise.dtype)
            offsets = torch.zeros_like(noise, dtype=torch.float64, requires_grad=True)
        groups = [{"params": [t], "lr": lr * _LR_SCALE[k]} for k, t in theta.tensors.items()]
        if offsets is not None:
            groups.append({"params": [offsets], "lr": lr})
        opt = torch.optim.Adam(groups)
        # a short linear warm-up, then cosine decay to a tenth over the budget: large early moves between the
        # schedule's basins, then settling
        warm = max(1, int(_WARMUP * max_iters))
        decay = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda k: min(1.0, (k + 1) / warm) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(k / max_iters, 1)))))
        gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(n, generator=gen)
        pos, since_best, loss0 = 0, 0, None
        bar = tqdm(total=max_iters, disable=not progress, desc=f"gradient fit {base.solver}", leave=False)
        try:
            for it in range(1, max_iters + 1):
                if time.perf_counter() - t0 > max_seconds:
                    info["stopped"] = "max_seconds"
                    break
                if pos + min(batch_size, n) > n:
                    order, pos = torch.randperm(n, generator=gen), 0
                idx = order[pos: pos + min(batch_size, n)]
                pos += len(idx)
                x0 = noise[idx]
                if offsets is not None:
                    shape = (-1, *([1] * (noise.ndim - 1)))
                    x0 = x0 + ball[idx].reshape(shape) * offsets[idx].to(noise.dtype)
                extra = _subset(extra_args, idx, n)
                try:
                    x = solve(x0, extra, True)
                    if not x.requires_grad:
                        raise _not_differentiable("its output carries no gradient")
                    sig = theta.sigmas()
                    value = objective(x, t_feat_fit[idx], extra, scale)
                    total = value + theta.penalty(sig)
                    opt.zero_grad(set_to_none=True)
                    total.backward()
                except NotDifferentiableError:
                    raise
                except FloatingPointError as e:  # NaN or Inf from the model (Denoise's check)
                    info["stopped"] = f"non-finite model output at step {it} ({e}); kept the best held-out parameters"
                    break
                except RuntimeError as e:
                    if any(w in str(e).lower() for w in ("grad", "derivative", "inplace", "in-place")):
                        raise _not_differentiable(f"autograd failed: {e}") from e
                    raise
                v = float(value.detach())
                grads = [t.grad for t in theta.tensors.values()]
                if not math.isfinite(v) or any(g is not None and not torch.isfinite(g).all() for g in grads):
                    info["stopped"] = f"non-finite loss or gradient at step {it}; kept the best held-out parameters"
                    break
                loss0 = v if loss0 is None else loss0
                if v > explode * max(loss0, 1e-12):
                    info["stopped"] = (f"loss exploded at step {it} ({v:.3g}, {v / loss0:.0f}x the first); kept "
                                       "the best held-out parameters")
                    break
                opt.step()
                decay.step()
                theta.project()
                if offsets is not None:
                    with torch.no_grad():  # back onto the ball ||v_i|| <= sqrt(d)
                        norm = offsets.reshape(n, -1).norm(dim=1).clamp_min(1e-30)
                        f = (math.sqrt(offsets[0].numel()) / norm).clamp(max=1.0)
                        offsets.mul_(f.reshape(-1, *([1] * (noise.ndim - 1))))
                info["iters"] = it
                bar.update()
                if it % val_every == 0 or it == max_iters:
                    val = held_out()
                    if val < best["val"]:
                        best.update(val=val, state=theta.state(), iter=it)
                        since_best = 0
                    else:
                        since_best += 1
                        if since_best >= patience:
                            info["stopped"] = f"no held-out improvement in {patience} checks"
                            break
        finally:
            bar.close()
        theta.load(best["state"])
        plan = theta.plan()
        info.update(val_best=best["val"], best_iter=best["iter"], wall_s=time.perf_counter() - t0, fit_loss_scale=scale)
        return plan, info


@exact_float32()
def fit_trajectory_gradient(model: Callable[..., torch.Tensor], base: SamplingPlan, noise: torch.Tensor, *,
                            sigma_min: float, params: str | Sequence[str] | Sequence[Sequence[str]] = DEFAULT_PARAMS,
                            loss: str = "l2", features: Callable[[torch.Tensor], torch.Tensor] | None = None,
                            residual_weight: float = 0.0, teacher_ball: float = 0.0, validation: float = 0.5,
                            holdout: float = 0.5, ref: ReferenceSolve | None = None, ref_solver: str = "dpmpp_2m",
                            ref_steps: int = 200, gamma_bounds: tuple[float, float] = (0.5, 1.5), plain_tail: int = 2,
                            max_seconds: float = 60.0, residual_tolerance: float = 1.05, significance: float = 2.0,
                            guards: Sequence[str] = DEFAULT_GUARDS, extra_args: dict | None = None,
                            lr: float | Sequence[float] = DEFAULT_LRS, progress: bool = False,
                            **options: Any) -> TrajectoryFit:
    """The trajectory calibration fitted by gradients: the same split, teacher and validation choice as
    :func:`steindiff.trajectory.fit_trajectory` (:func:`~steindiff.trajectory.calibration_batch`,
    :func:`~steindiff.trajectory.validate_candidates`), with one candidate per parameter set, :func:`gradient_fit`
    of ``params`` on the fit part (its last ``holdout`` fraction early-stops the fit), competing with the plain
    plan on the validation part under ``guards``.  ``params``: one set, or several (:func:`check_param_sets`),
    each a candidate (``gradient:<set>``); the validation keeps the closest to the teacher that passes the guards.
    ``start`` (in ``options``, :data:`STARTS`, default :data:`DEFAULT_START`): ``"plain"`` starts every fit from
    ``base``; ``"gits"`` first searches GITS's noise levels (:func:`steindiff.peers.gits.gits_plan`) on the teacher's
    trajectories of the fit part only, adds that plan as the candidate ``gits`` and starts every fit from it
    (the parameters' boxes are then around its levels; record ``start``).
    ``lr``: one fit per learning rate and set (default :data:`DEFAULT_LRS`), the one with the lower held-out loss
    is the set's candidate (the fit lands in different basins of the schedule from one learning rate to another;
    each fit is recorded).  ``max_seconds`` is shared between them.  ``options`` go to :func:`gradient_fit`
    (``batch_size``, ``max_iters``, ``history_depth``, ``val_every``, ``patience``, ``checkpoint``, ``seed``)."""
    sets = check_param_sets(params)
    start = options.pop("start", DEFAULT_START)
    if start not in STARTS:
        raise ValueError(f"start must be one of {', '.join(STARTS)}, got {start!r}")
    if start == "gits" and ref is not None and ref.states.shape[1] < round(noise.shape[0] * (1 - validation)):
        raise ValueError("start='gits' searches the teacher's trajectories of the fit part, but the reference solve "
                         "given keeps too few of them: solve it with keep= the fit part, or pass start='plain'")
    lrs = [float(lr)] if isinstance(lr, (int, float)) else [float(v) for v in lr]
    if not lrs or not all(v > 0 for v in lrs):
        raise ValueError(f"lr must be a positive learning rate or a non-empty sequence of them, got {lr!r}")
    if not 0 < holdout < 1:
        raise ValueError(f"holdout must be a fraction in (0, 1), got {holdout}")
    if int(plain_tail) != plain_tail or plain_tail < 1:
        raise ValueError(f"plain_tail must be a whole number of final steps >= 1, got {plain_tail}")
    t0 = time.perf_counter()
    batch = calibration_batch(model, base, noise, sigma_min=sigma_min, validation=validation, ref=ref,
                              ref_solver=ref_solver, ref_steps=ref_steps, keep_states=start == "gits",
                              extra_args=extra_args, progress=progress)
    n_train = batch.n_fit - max(1, int(round(batch.n_fit * holdout)))
    if n_train < 1:
        raise ValueError(f"the fit part of {batch.n_fit} samples is too small to hold out {holdout:.0%} of it")
    train, held = slice(0, n_train), slice(n_train, batch.n_fit)
    final = batch.ref.final
    several = len(sets) > 1
    plain = SamplingPlan(base.solver, base.sigmas, base.schedule, [1.0] * base.steps, base.coords, base.solver_options)
    candidates: dict[str, SamplingPlan] = {"plain": plain}
    infos: dict[str, dict] = {}
    fit_base, start_record = base, {"name": "plain"}
    if start == "gits":  # GITS's levels from the fit part's trajectories: a candidate, and where every set starts
        from .peers.gits import gits_plan
        g = gits_plan(model, base, batch.ref, n=batch.n_fit, extra_args=batch.extra_args, progress=progress)
        fit_base = candidates["gits"] = SamplingPlan(base.solver, g.sigmas, "gits", [1.0] * base.steps, base.coords,
                                                     base.solver_options)
        start_record = {"name": "gits", "sigmas": [float(s) for s in g.sigmas],
                        **{k: v for k, v in g.meta["gits"].items() if k not in ("path", "plain_path", "teacher")}}
    for ps in sets:
        fits = [gradient_fit(model, fit_base, noise[train], final[train], val_noise=noise[held], val_target=final[held],
                             sigma_floor=sigma_min, params=ps, loss=loss, features=features,
                             residual_weight=residual_weight, teacher_ball=teacher_ball, gamma_bounds=gamma_bounds,
                             plain_tail=plain_tail, max_seconds=max_seconds / (len(lrs) * len(sets)), lr=v,
                             extra_args=batch.part(train), val_extra_args=batch.part(held), progress=progress,
                             **options) for v in lrs]
        best = min(range(len(fits)), key=lambda j: fits[j][1]["val_best"])
        name = candidate_name(ps, several)
        candidates[name], info = fits[best]
        infos[name] = {**info, "lr": lrs[best], "tries": [
            {"lr": v, **{k: f[1][k] for k in ("val_start", "val_best", "best_iter", "iters", "stopped", "wall_s")}}
            for v, f in zip(lrs, fits)]}
    chosen = validate_candidates(model, batch, candidates, sigma_min=sigma_min, residual_tolerance=residual_tolerance,
                                 significance=significance, guards=guards)
    for name, plan in candidates.items():  # what each candidate carries beyond gammas and noise levels
        chosen["candidates"][name].update(model_sigmas=plan.model_sigmas, history=plan.history)
    first = next(iter(infos))
    gradient = infos.get(chosen["chosen"], infos[first])  # the kept set's fit (plain kept: the first set's)
    if several:
        gradient = {**gradient, "sets": infos}
    record = {"fit_method": "gradient", "params": params_record(sets), "distance": infos[first]["distance"], **chosen,
              "gamma_bounds": list(gamma_bounds), "plain_tail": plain_tail, "n_train": n_train,
              "n_holdout": batch.n_fit - n_train, "gradient": gradient, "start": start_record,
              "wall_s": time.perf_counter() - t0}
    return TrajectoryFit(candidates[chosen["chosen"]], record)
