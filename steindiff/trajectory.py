"""The calibrated sampler: SteinDiff's closed-form step scale aimed at the ODE's own solution.

SteinDiff (Alg. 1) rescales each solver step, ``x_{k+1} = x_k - gamma_k u_k`` with the residual
``u_k = x_k - T(x_k)``, and takes the least-squares coefficient towards a target ``x*``:

    gamma_k = E<u_k, x_k - x*> / E||u_k||^2                                         (1)

The paper's ``x*`` is the clean data, whose minimiser is the posterior mean (samples collapse; see
``docs/stabilizers.md``).  Here ``x*`` is the solution of the probability-flow ODE at the next noise
level from the same initial noise, given by a fine solve of the same model (:func:`reference_solve`).
Nothing else is needed: no data, no training, and, once fitted, nothing at sampling time.

:func:`fit_trajectory` fits a plan (per-step gammas, and optionally the interior noise levels) on a
calibration batch in three stages:

1. the reference solve (``dpmpp_2m``, uniform log-SNR steps), with its own convergence recorded;
2. the greedy closed form (1), step after step along the coarse solve (:func:`closed_form_gammas`);
3. a bounded, regularised least-squares refinement of the final samples' distance to the reference
   (:func:`refine`; derivative-free, so any model works: finite differences of whole solves).

Guards (the failure modes of ``shared/steindiff-method.md``): the last ``plain_tail`` steps (default 2: the
step into the last noise level and the final step into ``sigma = 0``) keep ``gamma = 1``; gammas stay in
``gamma_bounds`` and are pulled towards 1; the noise levels stay strictly decreasing, the lowest at least
``0.9 sigma_min`` (a floor at ``sigma_min`` itself was measured worse: README); the calibration noise is
split into a fit part and a validation part, and a candidate (closed form, refined) replaces the plain
solver only if it is closer to the reference on the validation part and passes the checks named in
``guards`` (:func:`choose_candidate`): ``distribution``, its samples as a set are no farther from the
reference's than the plain solver's are (sliced Wasserstein-2); ``significance``, its gain is more than the
validation batch's noise (Wilcoxon's signed-rank statistic of the paired per-sample gains in squared
distance, as a z score, above ``significance``: a rank test, since a few samples that end in another mode
hold most of the squared distance); ``residual``, its residual noise (:func:`residual_noise`) is no farther
from the reference's than the plain solver's is, up to a margin (:data:`steindiff.guards.MARGINS`), or within
``residual_tolerance`` of it; and the other data-free checks of :mod:`steindiff.guards`.  Every check is
recorded for every candidate; it gates only when named (:func:`steindiff.calibration.default_guards`:
``residual``, ``distribution``, ``significance``, for every model; docs/guards.md).  A calibration that
cannot beat the plain solver returns the plain plan (all gammas 1) and says so.

Every stage runs in full float32 (:func:`steindiff.device.exact_float32`: TF32 off on CUDA), since TF32's
rounding is as large as the refinement's finite-difference steps.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .device import exact_float32
from .guards import CHEAP_CHECKS, CHECKS, TOLERANCES, judge, sample_stats
from .guards import statistics as check_statistics
from .metrics import sliced_w2
from .noise import coordinate_scales
from .plan import SamplingPlan
from .sampling import sample
from .schedules import logsnr_sigmas
from .solvers import Step, StepOperator
from .stabilizers.base import dot, rescaled_update
from .stabilizers.schedule import GammaSchedule

__all__ = ["ReferenceSolve", "reference_solve", "closed_form_gammas", "refine", "residual_noise", "fit_trajectory",
           "TrajectoryFit", "FIT_MODES", "GUARDS", "DEFAULT_GUARDS", "SIGNIFICANCE_TEST", "choose_candidate",
           "check_guards", "parse_guard", "passes_guard",
           "score_candidates", "CalibrationBatch", "calibration_batch", "validate_candidates"]

FIT_MODES = ("gamma", "steps", "both")
GUARDS = ("residual", "distribution", "significance", "residual_tail", "denoised", "modes", "spectrum", "elbo")
DEFAULT_GUARDS = ("distribution", "significance")
#: What the ``significance`` check tests (recorded in every calibration; files without it used the paired t test).
SIGNIFICANCE_TEST = "wilcoxon-signed-rank"


@dataclass
class ReferenceSolve:
    """A fine solve from the calibration noise: ``states[j]`` is the state at ``sigmas[j]`` of the first
    ``states.shape[1]`` samples, ``final`` the samples of the whole batch.  ``convergence``: RMS
    distance per coordinate between the final samples of ``steps // 2`` and ``steps`` steps."""

    sigmas: torch.Tensor
    states: torch.Tensor
    final: torch.Tensor
    solver: str
    steps: int
    convergence: float
    wall_s: float

    def at(self, sigma: float) -> torch.Tensor:
        """The reference state at ``sigma``: linear in ``log sigma`` between the stored levels."""
        s = self.sigmas
        if sigma <= 0:
            return self.states[-1]
        if sigma >= float(s[0]):
            return self.states[0]
        j = int(torch.searchsorted(-s[:-1], torch.tensor(-sigma, dtype=s.dtype)))  # s[j-1] > sigma >= s[j]
        j = min(max(j, 1), len(s) - 2)
        hi, lo = float(s[j - 1]), float(s[j])
        if sigma >= hi:
            return self.states[j - 1]
        w = (math.log(hi) - math.log(sigma)) / (math.log(hi) - math.log(lo))
        return torch.lerp(self.states[j - 1], self.states[j], w)


@exact_float32()
def reference_solve(model: Callable[..., torch.Tensor], noise: torch.Tensor, sigma_max: float, sigma_min: float, *,
                    solver: str = "dpmpp_2m", steps: int = 200, keep: int | None = None,
                    extra_args: dict | None = None, progress: bool = False) -> ReferenceSolve:
    """Solve from ``noise`` (VE state at ``sigma_max``) on ``steps`` uniform log-SNR steps down to
    ``sigma_min`` and then 0, storing every state of the first ``keep`` samples (all by default)."""
    if steps < 4:
        raise ValueError(f"reference solve needs at least 4 steps, got {steps}")
    keep = noise.shape[0] if keep is None else keep
    t0 = time.perf_counter()
    sigmas = logsnr_sigmas(steps, sigma_min, sigma_max)
    states = [noise[:keep].detach().clone()]
    res = sample(model, noise, sigmas, solver, extra_args=extra_args,
                 progress="calibrating: reference solve" if progress else False,
                 callback=lambda d: states.append(d["x"][:keep].detach().clone()))
    coarse = sample(model, noise, logsnr_sigmas(steps // 2, sigma_min, sigma_max), solver, extra_args=extra_args,
                    progress="calibrating: reference check" if progress else False).x
    conv = float(((coarse - res.x).double().pow(2).mean()).sqrt())
    return ReferenceSolve(sigmas, torch.stack(states), res.x, solver, steps, conv, time.perf_counter() - t0)


def _solve(model, x, plan: SamplingPlan, extra_args: dict | None) -> torch.Tensor:
    return sample(model, x, plan.sigmas, plan.get_solver(), stabilizer=plan.stabilizer(), extra_args=extra_args).x


class _TowardsReference:
    """Eq. (1) as a stabilizer: each step's gamma from the reference solution at the step's next level."""

    def __init__(self, ref: ReferenceSolve, coords: str, gamma_bounds: tuple[float, float], plain_tail: int = 2):
        self.ref, self.coords, self.bounds, self.gammas = ref, coords, gamma_bounds, []
        self.plain_tail = plain_tail

    def step(self, op: StepOperator, x: torch.Tensor) -> tuple[torch.Tensor, Step, None]:
        with torch.no_grad():
            st = op(x)
        a, a_next, _ = coordinate_scales(self.coords, op.sigma, op.sigma_next)
        x_c = a * x
        u = x_c - a_next * st.x_next
        g = 1.0
        if op.sigma_next > 0 and op.i < len(op.sigmas) - 1 - self.plain_tail:
            target = self.ref.at(op.sigma_next).to(x.dtype)
            uu = float(dot(u, u).sum())
            g = float(dot(u, x_c - a_next * target).sum()) / uu if uu > 0 else 1.0
            g = min(max(g, self.bounds[0]), self.bounds[1]) if math.isfinite(g) else 1.0
        self.gammas.append(g)
        return rescaled_update(st.x_next, u, g, a_next).to(x.dtype), st, None


@exact_float32()
def closed_form_gammas(model: Callable[..., torch.Tensor], noise: torch.Tensor, plan: SamplingPlan,
                       ref: ReferenceSolve, *, gamma_bounds: tuple[float, float] = (0.5, 1.5),
                       plain_tail: int = 2, extra_args: dict | None = None) -> list[float]:
    """Eq. (1) with ``x*`` the reference solution at the next noise level, pooled over the batch,
    one step at a time along the coarse solve that uses the gammas found so far.  In the plan's
    coordinates (``x_c = alpha_k x``): ``gamma_k = sum <u, x_c - alpha_{k+1} x*> / sum ||u||^2``.
    The last ``plain_tail`` steps (at least the final step into ``sigma = 0``) keep ``gamma = 1``."""
    towards = _TowardsReference(ref, plan.coords, gamma_bounds, max(plain_tail, 1))
    sample(model, noise, plan.sigmas, plan.get_solver(), stabilizer=towards, extra_args=extra_args)
    return towards.gammas


def residual_noise(model: Callable[..., torch.Tensor], x: torch.Tensor, sigma: float,
                   extra_args: dict | None = None) -> float:
    """How far one denoising pass at the smallest noise level moves the samples: RMS per coordinate of
    ``D(x, sigma) - x``.  Samples on the data manifold barely move; residual noise is removed."""
    with torch.no_grad():
        d = model(x, torch.full((x.shape[0],), sigma, dtype=x.dtype, device=x.device), **(extra_args or {}))
    return float((d - x).double().pow(2).mean().sqrt())


class _Budget(Exception):
    pass


class _Params:
    """``theta`` <-> plan.  Gammas of every step but the last; the interior noise levels as log-gaps
    ``z`` with ``log sigma_i = log sigma_0 - L cumsum(softmax(z))_i`` (a last, slack gap keeps
    ``sigma_{N-1}`` above ``0.9 sigma_floor``), so every theta gives a strictly decreasing schedule, and the
    initial theta the base schedule.  Each log-gap stays within a factor ``e`` of the base's share; the slack
    may grow further (:meth:`bounds`)."""

    def __init__(self, base: SamplingPlan, fit: str, sigma_floor: float, gammas0: list[float], plain_tail: int = 2):
        self.base, self.fit = base, fit
        sig = [float(s) for s in base.sigmas]
        self.n = len(sig) - 1
        self.ng = max(self.n - max(plain_tail, 1), 0)  # fitted gammas: all steps but the plain tail
        self.fit_gamma = fit in ("gamma", "both") and self.ng >= 1
        self.fit_steps = fit in ("steps", "both") and self.n >= 2
        self.s0 = sig[0]
        self.floor = 0.9 * min(sigma_floor, sig[-2])  # the slack gap starts at log(1/0.9)
        self.L = math.log(self.s0) - math.log(self.floor)
        pos = [(math.log(self.s0) - math.log(s)) / self.L for s in sig[1:-1]]  # interior, increasing in (0, 1)
        self.z0 = np.log(np.diff([0.0, *pos, 1.0]))
        self.log_base = np.log(sig[1:-1])
        self.gammas0 = list(gammas0)

    def initial(self) -> np.ndarray:
        parts = []
        if self.fit_gamma:
            parts.append(np.asarray(self.gammas0[: self.ng], dtype=float))
        if self.fit_steps:
            parts.append(self.z0.copy())
        return np.concatenate(parts) if parts else np.zeros(0)

    def bounds(self, gamma_bounds: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = [], []
        if self.fit_gamma:
            lo += [gamma_bounds[0]] * self.ng
            hi += [gamma_bounds[1]] * self.ng
        if self.fit_steps:
            # each log-gap within a factor e of its share in the base schedule (no near-empty steps); the
            # slack below the last level may grow to about a third of the range (a last level up to ~sigma_0^(1/3))
            lo += list(self.z0 - 1.0)
            hi += list(self.z0[:-1] + 1.0) + [max(self.z0[-1] + 1.0, -0.5)]
        return np.asarray(lo), np.asarray(hi)

    def decode(self, theta: np.ndarray) -> tuple[torch.Tensor, list[float]]:
        k = 0
        gammas = list(self.gammas0)
        if self.fit_gamma:
            gammas = [float(g) for g in theta[: self.ng]] + [1.0] * (self.n - self.ng)
            k = self.ng
        if self.fit_steps:
            z = theta[k:]
            w = np.exp(z - z.max())
            pos = np.cumsum(w / w.sum())[:-1]
            interior = np.exp(math.log(self.s0) - self.L * pos)
            sigmas = torch.tensor([self.s0, *interior.tolist(), 0.0], dtype=torch.float64)
        else:
            sigmas = self.base.sigmas
        return sigmas, gammas

    def penalty(self, theta: np.ndarray, reg_gamma: float, reg_steps: float) -> np.ndarray:
        """Residuals of the regularisers: ``sqrt(reg) (gamma - 1)`` and ``sqrt(reg) (log sigma - log sigma_base)``."""
        sigmas, gammas = self.decode(theta)
        out = []
        if self.fit_gamma:
            out.append(math.sqrt(reg_gamma) * (np.asarray(gammas[: self.ng]) - 1.0))
        if self.fit_steps:
            out.append(math.sqrt(reg_steps) * (np.log(sigmas[1:-1].numpy()) - self.log_base))
        return np.concatenate(out) if out else np.zeros(0)


@exact_float32()
def refine(model: Callable[..., torch.Tensor], noise: torch.Tensor, target: torch.Tensor, base: SamplingPlan,
           gammas0: list[float], *, fit: str = "both", sigma_floor: float,
           gamma_bounds: tuple[float, float] = (0.5, 1.5),
           reg_gamma: float = 1e-2, reg_steps: float = 1e-3, reg_residual: float = 2.0, max_solves: int = 200,
           max_seconds: float = 60.0, plain_tail: int = 2, extra_args: dict | None = None,
           progress: bool | str = False) -> tuple[SamplingPlan, dict]:
    """Fit the plan's gammas and/or interior noise levels so that its final samples from ``noise`` come
    close to ``target`` (the reference solve's), by bounded least squares (``scipy.optimize.least_squares``,
    trust-region reflective, Jacobian by finite differences of whole solves, no gradients of the model).

    Objective: ``||x_N(theta) - target||^2 / ||x_N(base) - target||^2``, plus a data-free residual-noise
    term ``reg_residual log(R(x_N) / R(target))^2`` with ``R(x) = ||D(x, sigma_floor) - x||`` (samples that
    one more denoising pass moves more than it moves the reference's carry residual noise; less, and
    they are over-smoothed; one extra model pass per solve), plus the regularisers of :meth:`_Params.penalty`.  Stops
    after ``max_solves`` solves or ``max_seconds``, keeping the best theta.  The last ``plain_tail`` steps
    keep ``gamma = 1``.  ``progress``: a bar of the solves (labelled ``progress`` when it is a string).
    """
    from scipy.optimize import least_squares

    P = _Params(base, fit, sigma_floor, gammas0, plain_tail)
    theta0 = P.initial()
    info: dict[str, Any] = {"solves": 0, "stopped": "converged"}
    if theta0.size == 0:
        return SamplingPlan(base.solver, base.sigmas, base.schedule, gammas0, base.coords, base.solver_options), info
    plain = _solve(model, noise, base, extra_args)
    scale = float((plain - target).double().pow(2).sum()) ** 0.5 or 1.0

    def moved(x: torch.Tensor) -> float:
        with torch.no_grad():
            s = torch.full((x.shape[0],), sigma_floor, dtype=x.dtype, device=x.device)
            return float((model(x, s, **(extra_args or {})) - x).double().pow(2).sum()) ** 0.5

    r_target = moved(target) if reg_residual > 0 else 0.0
    best = {"cost": math.inf, "theta": theta0.copy()}
    t0 = time.perf_counter()
    bar = tqdm(total=max_solves, disable=not progress, leave=False, unit="solve",
               desc=progress if isinstance(progress, str) else "calibrating: fit")

    def residuals(theta: np.ndarray) -> np.ndarray:
        if info["solves"] >= max_solves or time.perf_counter() - t0 > max_seconds:
            info["stopped"] = "budget"
            raise _Budget
        sigmas, gammas = P.decode(theta)
        plan = SamplingPlan(base.solver, sigmas, "fitted", gammas, base.coords, base.solver_options)
        x = _solve(model, noise, plan, extra_args)
        info["solves"] += 1
        bar.update()
        r = ((x - target).double().reshape(-1) / scale).cpu().numpy()
        if r_target > 0 and np.isfinite(r).all():
            r = np.append(r, math.sqrt(reg_residual) * math.log(max(moved(x), 1e-300) / r_target))
        if not np.isfinite(r).all():
            r = np.full_like(r, 1e3 / math.sqrt(r.size))
        r = np.concatenate([r, P.penalty(theta, reg_gamma, reg_steps)])
        cost = float(r @ r)
        if cost < best["cost"]:
            best.update(cost=cost, theta=theta.copy())
        return r

    lo, hi = P.bounds(gamma_bounds)
    step = 1e-3 if noise.dtype == torch.float32 else 1e-4
    try:
        least_squares(residuals, np.clip(theta0, lo, hi), bounds=(lo, hi), method="trf", diff_step=step,
                      xtol=1e-4, ftol=1e-4, gtol=1e-6, max_nfev=10 * max_solves)
    except _Budget:
        pass
    finally:
        bar.close()
    sigmas, gammas = P.decode(best["theta"])
    info.update(objective=best["cost"], wall_s=time.perf_counter() - t0)
    return SamplingPlan(base.solver, sigmas, "fitted" if P.fit_steps else base.schedule, gammas, base.coords,
                        base.solver_options), info


@dataclass
class TrajectoryFit:
    """Result of :func:`fit_trajectory`: the chosen plan and the record of how it was chosen."""

    plan: SamplingPlan
    record: dict = field(default_factory=dict)

    def schedule(self, meta: dict | None = None) -> GammaSchedule:
        """The plan as a :class:`GammaSchedule` whose ``meta`` carries the sigmas and the record."""
        m = {"calibration": self.record, **(meta or {}), "sigmas": [float(s) for s in self.plan.sigmas],
             "objective": "trajectory"}
        return GammaSchedule(self.plan.gammas or [1.0] * self.plan.steps, self.plan.coords, m,
                             model_sigmas=self.plan.model_sigmas, history=self.plan.history)


def _rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).double().pow(2).mean().sqrt())


def _gain_z(d_plain: torch.Tensor, d_cand: torch.Tensor) -> float:
    """Mean over samples of ``d_plain - d_cand`` in standard errors (paired z statistic); inf for a
    gain with no spread."""
    g = d_plain - d_cand
    se = float(g.std()) / math.sqrt(g.numel())
    m = float(g.mean())
    return m / se if se > 0 else (math.inf if m > 0 else -math.inf)


def _rank_z(d_plain: torch.Tensor, d_cand: torch.Tensor) -> float:
    """Wilcoxon's signed-rank statistic of the paired gains ``d_plain - d_cand`` as a z score (normal
    approximation; zero gains dropped, tied magnitudes at their mid-rank, the variance corrected for ties).
    Positive when the candidate is closer for most samples.  A rank test, since the per-sample squared
    distances are heavy-tailed: a few samples whose coarse solve ends in another mode than the reference's
    hold most of the sum (``benchmarks/distance_breakdown.py``), and they swamp the mean's standard error."""
    from scipy.stats import rankdata

    g = (d_plain - d_cand).double().cpu().numpy()
    g = g[g != 0]
    n = g.size
    if n == 0:
        return 0.0
    ranks = rankdata(np.abs(g))
    _, ties = np.unique(np.abs(g), return_counts=True)
    var = n * (n + 1) * (2 * n + 1) / 24 - float((ties ** 3 - ties).sum()) / 48
    w = float(ranks[g > 0].sum())
    return (w - n * (n + 1) / 4) / math.sqrt(var) if var > 0 else 0.0


def parse_guard(guard: str) -> tuple[str, dict[str, float]]:
    """A guard as ``guards`` names it: a check of :data:`GUARDS`, and for a data-free check of
    :mod:`steindiff.guards` optionally the thresholds it is judged at (:func:`steindiff.guards.judge`),
    ``name[:tolerance=T][:margin=M][:dominance=K]``, e.g. ``residual:margin=0`` or ``modes:tolerance=0.02``; a
    threshold left out is the library's (:data:`~steindiff.guards.TOLERANCES`, :data:`~steindiff.guards.MARGINS`).
    ``dominance=K`` (``K >= 1``) waives the check for a candidate whose ``denoised`` distance to the reference
    is at most ``1/K`` of the plain solver's (:func:`passes_guard`).  Returns ``(name, {"tolerance": T, "margin":
    M, "dominance": K})`` with the thresholds given."""
    if not isinstance(guard, str) or not guard.strip():
        raise ValueError(f"a calibration guard is a check's name, got {guard!r}")
    name, *parts = [t.strip() for t in guard.split(":")]
    if name not in GUARDS:
        raise ValueError(f"unknown calibration guard {name!r}; choose from {', '.join(GUARDS)}")
    settings: dict[str, float] = {}
    for part in parts:
        key, eq, value = part.partition("=")
        if name not in CHECKS:
            raise ValueError(f"the {name!r} guard takes no thresholds, got {guard!r}")
        if not eq or key not in _THRESHOLDS or key in settings:
            raise ValueError(f"guard {guard!r}: thresholds are written name:tolerance=T:margin=M:dominance=K, each "
                             "at most once")
        try:
            v = float(value)
        except ValueError:
            raise ValueError(f"guard {guard!r}: {key} must be a number, got {value!r}") from None
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"guard {guard!r}: {key} must be a finite number >= 0, got {value!r}")
        if key == "dominance" and v < 1:
            raise ValueError(f"guard {guard!r}: dominance must be at least 1 (a candidate at most 1/K as far as "
                             f"plain from the reference after one more denoising pass), got {value!r}")
        settings[key] = v
    return name, settings


#: The thresholds a data-free guard may carry (:func:`parse_guard`), in canonical order.
_THRESHOLDS = ("tolerance", "margin", "dominance")


def _canonical_guard(guard: str) -> str:
    name, settings = parse_guard(guard)
    return ":".join([name, *(f"{k}={settings[k]:g}" for k in _THRESHOLDS if k in settings)])


def check_guards(guards: str | Sequence[str]) -> tuple[str, ...]:
    """``guards`` (a sequence, or one comma-separated string) in canonical form (:func:`parse_guard`), each once;
    an unknown or malformed guard, or a check named twice with other thresholds, is refused."""
    if isinstance(guards, str):
        guards = [g for g in guards.split(",") if g]
    unknown = [g for g in guards if not isinstance(g, str) or g.split(":")[0].strip() not in GUARDS]
    if unknown:
        raise ValueError(f"unknown calibration guard(s) {', '.join(map(repr, unknown))}; "
                         f"choose from {', '.join(GUARDS)}")
    out = tuple(dict.fromkeys(_canonical_guard(g) for g in guards))
    names = [parse_guard(g)[0] for g in out]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"calibration guard(s) {', '.join(map(repr, twice))} named twice with other thresholds")
    return out


def passes_guard(score: dict, plain: dict, guard: str) -> bool:
    """Does a candidate's validation record ``score`` (:func:`score_candidates`) pass ``guard``
    (:func:`parse_guard`): its recorded ``passed_<check>_check`` flag, or, for a guard with its own thresholds,
    its check judged anew from the recorded deviations against the plain solver's (``plain``, its record).

    With ``dominance=K`` the check is waived when, after one more denoising pass, the candidate's samples are at
    least ``K`` times closer to the reference's as a set than the plain solver's (the ``denoised`` check's
    sliced-W2 distances): the plain solver is then too far off for its deviations to be a yardstick (a solver
    whose samples diverge can have a mode histogram or residual level near the reference's by chance)."""
    name, settings = parse_guard(guard)
    if not settings:
        return bool(score[f"passed_{name}_check"])
    if "checks" not in score or "checks" not in plain:
        raise ValueError(f"the guard {guard!r} is judged from the checks' deviations, which this record lacks (made "
                         "before they were recorded): score the candidates again (score_candidates)")
    if score["checks"] is None:  # non-finite samples
        return False
    plain_checks = plain.get("checks") or {}
    if "dominance" in settings:
        d, d_plain = score["checks"].get("denoised"), plain_checks.get("denoised")
        if d is not None and d_plain is not None and math.isfinite(d) and d * settings["dominance"] <= d_plain:
            return True
    return judge(name, score["checks"].get(name), plain_checks.get(name),
                 settings.get("tolerance"), settings.get("margin"))


def choose_candidate(scores: dict[str, dict], guards: Sequence[str] = DEFAULT_GUARDS) -> str:
    """The validation choice of :func:`fit_trajectory`: among the candidates with finite samples that pass
    every check in ``guards`` (:func:`passes_guard`), the one closest to the reference's final samples
    (``val_rms``); plain always passes, and wins ties."""
    guards = check_guards(guards)
    names = [parse_guard(g)[0] for g in guards]
    missing = sorted({g for k, v in scores.items() for g in names if k != "plain" and f"passed_{g}_check" not in v})
    if missing:
        raise ValueError(f"the candidates were scored without the {', '.join(missing)} check(s) (made before "
                         "they existed): score them again (score_candidates) to choose under these guards")
    plain = scores["plain"]
    ok = {k: v for k, v in scores.items()
          if v["val_rms"] is not None and (k == "plain" or all(passes_guard(v, plain, g) for g in guards))}
    return min(ok, key=lambda k: (ok[k]["val_rms"], k != "plain"))


@exact_float32()
def score_candidates(model: Callable[..., torch.Tensor], candidates: dict[str, SamplingPlan], x_val: torch.Tensor,
                     ref_val: torch.Tensor, *, sigma_min: float, residual_tolerance: float = 1.05,
                     significance: float = 2.0, ref_residual: float | None = None,
                     checks: Sequence[str] = CHEAP_CHECKS, tolerances: dict[str, float] | None = None,
                     sigma_max: float | None = None, elbo_levels: int = 16,
                     extra_args: dict | None = None) -> dict[str, dict]:
    """The validation record of :func:`fit_trajectory`: each candidate plan (``candidates["plain"]`` among
    them) solved from ``x_val`` and compared with the reference's final samples ``ref_val`` from the same
    noise: ``val_rms``, ``val_max`` (the farthest sample), ``val_sw2``, ``residual_noise``, its gammas and
    sigmas, and the outcome of every check of :data:`GUARDS` (``passed_<guard>_check``; plain passes all),
    with the significance statistics ``val_rank_z`` (which decides) and ``val_gain_z``.

    The data-free checks of :mod:`steindiff.guards` (``residual``, ``residual_tail``, ``denoised``, ``modes``,
    ``spectrum``, and ``elbo`` when ``checks`` names it: it costs ``elbo_levels`` model passes per candidate)
    compare each candidate's samples with the reference's, relative to the plain solver's
    (:func:`steindiff.guards.judge`); their deviations from the reference are recorded under ``checks``, and a
    check not measured has no ``passed_<check>_check`` flag (:func:`choose_candidate` refuses to use it).
    ``tolerances`` overrides :data:`steindiff.guards.TOLERANCES` (``residual_tolerance``, a ratio, sets the
    residual check's); ``sigma_max`` (default: the largest first noise level of the candidates) and
    ``elbo_levels`` are the ``elbo`` check's (:func:`steindiff.guards.diffusion_loss`).  ``ref_residual``: the
    reference's :func:`residual_noise`, if the caller has it."""
    if "plain" not in candidates:
        raise ValueError("the candidates must include the plain plan ('plain')")
    unknown = [c for c in checks if c not in CHECKS]
    if unknown:
        raise ValueError(f"unknown check(s) {', '.join(map(repr, unknown))}; choose from {', '.join(CHECKS)}")
    tol = {**TOLERANCES, "residual": residual_tolerance - 1.0, **(tolerances or {})}
    if sigma_max is None:
        sigma_max = max(float(p.sigmas[0]) for p in candidates.values())

    def stats_of(x: torch.Tensor):
        return sample_stats(model, x, sigma_min, checks=checks, sigma_max=sigma_max, elbo_levels=elbo_levels,
                            extra_args=extra_args)

    ref_stats = stats_of(ref_val)
    scores: dict[str, dict] = {}
    per_sample: dict[str, torch.Tensor] = {}
    for name, plan in candidates.items():
        x = _solve(model, x_val, plan, extra_args)
        finite = bool(torch.isfinite(x).all())
        dev = None
        if finite:
            per_sample[name] = (x - ref_val).double().reshape(len(x), -1).pow(2).mean(1)
            dev = check_statistics(stats_of(x), ref_stats)
            if ref_residual is not None:  # the reference's level as the caller measured it
                dev["residual"] = dev["residual_value"] / ref_residual - 1.0 if ref_residual > 0 else 0.0
        scores[name] = {"val_rms": _rms(x, ref_val) if finite else None,
                        "val_max": float(per_sample[name].sqrt().max()) if finite else None,
                        "val_sw2": sliced_w2(x, ref_val) if finite else None,
                        "residual_noise": dev["residual_value"] if finite else None, "checks": dev,
                        "gammas": list(plan.gammas or [1.0] * plan.steps), "sigmas": [float(s) for s in plan.sigmas]}
    plain_dev = scores["plain"]["checks"] or {}
    for k, v in scores.items():
        # the data-free checks (steindiff.guards): no farther from the reference's samples than the plain
        # solver's, or within the check's tolerance (the residual check: noisier samples move more under one
        # more denoising pass; over-smoothed, less)
        for c in CHECKS:
            if c in checks or c in CHEAP_CHECKS:
                v[f"passed_{c}_check"] = k == "plain" or (
                    v["checks"] is not None and judge(c, v["checks"].get(c), plain_dev.get(c), tol[c]))
        # as a set, no farther from the reference's samples than the plain solver's (a distance to the
        # reference solve alone can prefer blurred samples)
        v["passed_distribution_check"] = k == "plain" or (v["val_sw2"] is not None
                                                          and v["val_sw2"] <= scores["plain"]["val_sw2"])
        # closer than the plain solver beyond the validation batch's noise: Wilcoxon's signed-rank statistic of
        # the per-sample gains in squared distance (paired over the same noise) above ``significance``; the
        # paired t statistic of the mean gain is recorded too
        paired = k != "plain" and k in per_sample
        v["val_gain_z"] = _gain_z(per_sample["plain"], per_sample[k]) if paired else None
        v["val_rank_z"] = _rank_z(per_sample["plain"], per_sample[k]) if paired else None
        v["passed_significance_check"] = k == "plain" or (v["val_rank_z"] is not None
                                                          and v["val_rank_z"] > significance)
    return scores


@dataclass
class CalibrationBatch:
    """The calibration noise split into a fit part (the first ``n_fit`` samples) and a validation part, with
    the teacher's fine solve ``ref`` of all of it and the per-sample conditioning ``extra_args``."""

    noise: torch.Tensor
    ref: ReferenceSolve
    n_fit: int
    extra_args: dict | None = None

    @property
    def n(self) -> int:
        return self.noise.shape[0]

    @property
    def fit(self) -> slice:
        return slice(0, self.n_fit)

    @property
    def val(self) -> slice:
        return slice(self.n_fit, self.n)

    def part(self, sl: slice) -> dict | None:
        """``extra_args`` of the samples ``sl`` (per-sample tensors sliced, anything else kept)."""
        if not self.extra_args:
            return self.extra_args
        return {k: (v[sl] if isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == self.n else v)
                for k, v in self.extra_args.items()}


def calibration_batch(model: Callable[..., torch.Tensor], base: SamplingPlan, noise: torch.Tensor, *,
                      sigma_min: float, validation: float = 0.5, ref: ReferenceSolve | None = None,
                      ref_solver: str = "dpmpp_2m", ref_steps: int = 200, keep_states: bool = True,
                      extra_args: dict | None = None, progress: bool = False) -> CalibrationBatch:
    """Split ``noise`` into fit and validation parts (``validation``: the validation fraction) and solve it
    finely (the teacher, :func:`reference_solve`; its states kept for the fit part when ``keep_states``), or
    check that ``ref`` matches it."""
    if not 0 < validation < 1:
        raise ValueError(f"validation must be a fraction in (0, 1), got {validation}")
    n = noise.shape[0]
    n_fit = int(round(n * (1 - validation)))
    if n_fit < 2 or n - n_fit < 2:
        raise ValueError(f"calibration batch of {n} is too small to split into fit and validation parts (need >= 4)")
    if ref is None:
        ref = reference_solve(model, noise, float(base.sigmas[0]), sigma_min, solver=ref_solver, steps=ref_steps,
                              keep=n_fit if keep_states else 0, extra_args=extra_args, progress=progress)
    if (keep_states and ref.states.shape[1] < n_fit) or ref.final.shape[0] != n:
        raise ValueError("the reference solve does not match the calibration batch")
    return CalibrationBatch(noise, ref, n_fit, extra_args)


def validate_candidates(model: Callable[..., torch.Tensor], batch: CalibrationBatch,
                        candidates: dict[str, SamplingPlan], *, sigma_min: float, residual_tolerance: float = 1.05,
                        significance: float = 2.0, guards: Sequence[str] = DEFAULT_GUARDS) -> dict:
    """Score ``candidates`` (``plain`` among them) on the validation part (:func:`score_candidates`) and choose
    under ``guards`` (:func:`choose_candidate`): the part of a calibration record every fit method shares."""
    guards = check_guards(guards)
    names = [parse_guard(g)[0] for g in guards]
    val = batch.val
    ref_val = batch.ref.final[val]
    r_ref = residual_noise(model, ref_val, sigma_min, batch.part(val))
    scores = score_candidates(model, candidates, batch.noise[val], ref_val, sigma_min=sigma_min,
                              residual_tolerance=residual_tolerance, significance=significance,
                              ref_residual=r_ref, checks=(*CHEAP_CHECKS, *(n for n in names if n in CHECKS)),
                              extra_args=batch.part(val))
    chosen = choose_candidate(scores, guards)
    ref = batch.ref
    return {
        "chosen": chosen, "beats_plain": chosen != "plain", "candidates": scores,
        "reference": {"solver": ref.solver, "steps": ref.steps, "schedule": "logsnr",
                      "convergence_rms": ref.convergence, "residual_noise": r_ref, "wall_s": ref.wall_s},
        "n_fit": batch.n_fit, "n_val": batch.n - batch.n_fit, "residual_tolerance": residual_tolerance,
        "significance": significance, "significance_test": SIGNIFICANCE_TEST, "guards": list(guards),
        "val_ratio": (scores[chosen]["val_rms"] / scores["plain"]["val_rms"]) if scores["plain"]["val_rms"] else None,
    }


@exact_float32()
def fit_trajectory(model: Callable[..., torch.Tensor], base: SamplingPlan, noise: torch.Tensor, *, sigma_min: float,
                   fit: str = "both", validation: float = 0.5, ref: ReferenceSolve | None = None,
                   ref_solver: str = "dpmpp_2m", ref_steps: int = 200, gamma_bounds: tuple[float, float] = (0.5, 1.5),
                   reg_gamma: float = 1e-2, reg_steps: float = 1e-3, reg_residual: float = 2.0, max_solves: int = 200,
                   max_seconds: float = 60.0, residual_tolerance: float = 1.05, significance: float = 2.0,
                   guards: Sequence[str] = DEFAULT_GUARDS, plain_tail: int = 2, extra_args: dict | None = None,
                   progress: bool = False) -> TrajectoryFit:
    """Calibrate ``base`` (a plain plan) on the calibration ``noise`` (module docstring).

    The first ``1 - validation`` of the batch fits, the rest validates.  ``ref`` may be passed to
    reuse a reference solve of the same noise (it must hold the states of the fit part).
    ``extra_args`` (e.g. class labels drawn like the user's) are split with the batch when they are
    per-sample tensors.  ``plain_tail``: how many final steps keep ``gamma = 1`` (default 2: the final
    denoising step into 0 and the step into the last noise level before it; a damped or stretched step
    there leaves noise, or an overshoot, that no later step removes).  ``guards``: the checks
    (:data:`GUARDS`) a candidate must pass to replace the plain solver, a sequence or a comma-separated
    string.  Returns the chosen plan and a record: validation scores (RMS distance per coordinate to the
    reference's final samples) of every candidate, residual noise, reference convergence, sizes and
    wall time.  The gradient fit (:func:`steindiff.gradient_fit.fit_trajectory_gradient`) shares the split,
    the teacher and the validation choice.
    """
    if fit not in FIT_MODES:
        raise ValueError(f"fit must be one of {', '.join(FIT_MODES)}, got {fit!r}")
    guards = check_guards(guards)
    if int(plain_tail) != plain_tail or plain_tail < 1:
        raise ValueError(f"plain_tail must be a whole number of final steps >= 1, got {plain_tail}")
    t0 = time.perf_counter()
    batch = calibration_batch(model, base, noise, sigma_min=sigma_min, validation=validation, ref=ref,
                              ref_solver=ref_solver, ref_steps=ref_steps, extra_args=extra_args, progress=progress)
    ref, fit_sl, part = batch.ref, batch.fit, batch.part
    n_fit = batch.n_fit
    x_fit = noise[fit_sl]
    ref_fit = ReferenceSolve(ref.sigmas, ref.states[:, :n_fit], ref.final[fit_sl], ref.solver, ref.steps,
                             ref.convergence, ref.wall_s)
    g_cf = closed_form_gammas(model, x_fit, base, ref_fit, gamma_bounds=gamma_bounds, plain_tail=plain_tail,
                              extra_args=part(fit_sl))
    cf_plan = SamplingPlan(base.solver, base.sigmas, base.schedule, g_cf, base.coords, base.solver_options)
    # start the refinement from the better of the plain plan and the closed form (on the fit part)
    start = g_cf if _rms(_solve(model, x_fit, cf_plan, part(fit_sl)), ref.final[fit_sl]) < \
        _rms(_solve(model, x_fit, base, part(fit_sl)), ref.final[fit_sl]) else [1.0] * base.steps
    # two refinements, each with half the budget: on the distance alone, and with the residual-noise term
    plain = SamplingPlan(base.solver, base.sigmas, base.schedule, [1.0] * base.steps, base.coords, base.solver_options)
    candidates = {"plain": plain, "closed_form": cf_plan}
    rinfo = {}
    for i, (name, w) in enumerate((("refined", 0.0), ("refined_residual", reg_residual))):
        if name == "refined_residual" and w <= 0:
            continue
        candidates[name], rinfo[name] = refine(
            model, x_fit, ref.final[fit_sl], base, start, fit=fit, sigma_floor=sigma_min, gamma_bounds=gamma_bounds,
            reg_gamma=reg_gamma, reg_steps=reg_steps, reg_residual=w, max_solves=max(max_solves // 2, 1),
            plain_tail=plain_tail,
            max_seconds=max_seconds / 2, extra_args=part(fit_sl),
            progress=f"calibrating: fit {i + 1}/{1 + (reg_residual > 0)}" if progress else False)
    chosen = validate_candidates(model, batch, candidates, sigma_min=sigma_min, residual_tolerance=residual_tolerance,
                                 significance=significance, guards=guards)
    record = {"fit": fit, **chosen, "gamma_bounds": list(gamma_bounds), "reg_gamma": reg_gamma,
              "reg_steps": reg_steps, "reg_residual": reg_residual, "plain_tail": plain_tail, "refine": rinfo,
              "wall_s": time.perf_counter() - t0}
    return TrajectoryFit(candidates[chosen["chosen"]], record)
