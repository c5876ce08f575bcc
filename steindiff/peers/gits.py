"""GITS: the time steps chosen by dynamic programming over a cost matrix measured on teacher trajectories
(Chen, Zhou, Wang, Shen and Lyu 2024, "On the Trajectory Regularity of ODE-based Diffusion Sampling",
arXiv 2405.11326, Sec. 5, "geometry-inspired time scheduling").  Written from the paper; no code copied.

The sampling trajectories of one model share their shape, so a time schedule that fits a few teacher
trajectories fits the others.  On a fine grid of candidate noise levels ``s_0 > s_1 > ... > s_M = 0``, with
``x*_i`` the teacher's state at ``s_i`` (a fine solve of the same model from calibration noise,
:class:`~steindiff.trajectory.ReferenceSolve`), the cost of jumping from ``s_i`` to ``s_j`` is the error of one
step of the sampler's solver started on the teacher's trajectory (:func:`gits_cost_matrix`):

    C[i, j] = mean over the batch of || T_{i->j}(x*_i) - x*_j ||_2,    i < j             (the paper's "l2" cost)

The step is a fresh one: a multistep solver has no history there and takes its first, lowest-order step (the
paper measures every cost with an Euler step).  An ``N``-step schedule is the path ``0 = p_0 < p_1 < ... <
p_N = M`` of least weighted cost (:func:`cheapest_path`)

    J(p) = sum_k coeff^k C[p_k, p_{k+1}],

by dynamic programming over the number of jumps left: ``V_1(j) = C[j, M]``,
``V_k(j) = min_{j < i < M} C[j, i] + coeff V_{k-1}(i)``, in ``O(N M^2)``.  ``coeff > 1`` (the paper's 1.15)
weighs the later jumps more, since their error is not damped by later steps.

Here the grid is ``levels`` of the teacher's own noise levels (uniform in log-SNR from ``sigma_max`` to
``sigma_min``) plus the plain plan's levels (the teacher's states there interpolated,
:meth:`~steindiff.trajectory.ReferenceSolve.at`) and 0, so the plain schedule is one of the paths and GITS's
cost is never above it on its own matrix.  The sampler then runs the plain solver (no gammas) over the chosen
levels: the same number of steps, the same model passes per sample.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..device import exact_float32
from ..plan import SamplingPlan
from ..solvers import Denoise, Solver, get_solver
from ..trajectory import ReferenceSolve

__all__ = ["gits_plan", "gits_cost_matrix", "cheapest_path", "path_cost", "DEFAULT_COEFF", "DEFAULT_LEVELS"]

#: The paper's weight of each later jump (its recommended setting) and its grid (61 time steps).
DEFAULT_COEFF = 1.15
DEFAULT_LEVELS = 60


class _FirstPassCached:
    """``Denoise`` with the model output at ``(x, sigma)`` given: the same first pass serves every jump from ``x``."""

    def __init__(self, denoise: Denoise, x: torch.Tensor, sigma: float, d: torch.Tensor):
        self.denoise, self.x, self.sigma, self.d = denoise, x, sigma, d

    def __call__(self, x: torch.Tensor, sigma: float, step: int) -> torch.Tensor:
        if x is self.x and sigma == self.sigma:
            return self.d
        return self.denoise(x, sigma, step)


@exact_float32()
def gits_cost_matrix(model: Callable[..., torch.Tensor], solver: Solver | str, sigmas: Sequence[float],
                     states: torch.Tensor, *, extra_args: dict | None = None,
                     progress: bool = False) -> tuple[np.ndarray, int]:
    """``(C, passes)``: ``C[i, j]`` (``i < j``; ``inf`` elsewhere) the mean over the batch of the L2 distance
    between one fresh step of ``solver`` from ``states[i]`` (at ``sigmas[i]``) to ``sigmas[j]`` and
    ``states[j]`` (module docstring); ``passes``: model passes per sample spent (one per level, plus one per
    jump for a solver that evaluates the model at the step's end, e.g. ``heun``).  ``sigmas``: decreasing,
    the last one 0; ``states``: ``(len(sigmas), n, ...)``."""
    solver = get_solver(solver) if isinstance(solver, str) else solver
    sig = [float(s) for s in sigmas]
    if any(b >= a for a, b in zip(sig, sig[1:])) or sig[-1] != 0 or len(sig) < 2:
        raise ValueError("the grid of noise levels must be strictly decreasing and end at 0")
    if states.shape[0] != len(sig):
        raise ValueError(f"{states.shape[0]} teacher states for {len(sig)} noise levels")
    m = len(sig) - 1
    cost = np.full((m + 1, m + 1), np.inf)
    denoise = Denoise(model, extra_args)
    for i in tqdm(range(m), disable=not progress, desc="GITS cost matrix", leave=False):
        x = states[i]
        with torch.no_grad():
            first = _FirstPassCached(denoise, x, sig[i], denoise(x, sig[i], 0))
            for j in range(i + 1, m + 1):
                step = solver.step(first, x, 0, [sig[i], sig[j]], solver.init_state())
                cost[i, j] = float((step.x_next - states[j]).double().reshape(len(x), -1).norm(dim=1).mean())
    return cost, denoise.calls


def _check_cost(cost: np.ndarray, steps: int) -> np.ndarray:
    c = np.asarray(cost, dtype=float)
    if c.ndim != 2 or c.shape[0] != c.shape[1] or c.shape[0] < 2:
        raise ValueError(f"the cost matrix must be square, at least 2 x 2, got shape {c.shape}")
    if isinstance(steps, bool) or int(steps) != steps or not 1 <= steps <= c.shape[0] - 1:
        raise ValueError(f"steps must be a whole number from 1 to {c.shape[0] - 1} (the grid's jumps), got {steps}")
    return c


def path_cost(cost: np.ndarray, path: Sequence[int], coeff: float = DEFAULT_COEFF) -> float:
    """``sum_k coeff^k cost[p_k, p_{k+1}]`` of ``path`` (indices into the grid)."""
    c = np.asarray(cost, dtype=float)
    return float(sum(coeff**k * c[a, b] for k, (a, b) in enumerate(zip(path, path[1:]))))


def cheapest_path(cost: np.ndarray, steps: int, coeff: float = DEFAULT_COEFF) -> tuple[list[int], float]:
    """The path ``0 = p_0 < ... < p_steps = M`` (``M`` the last index of the square ``cost``) of least
    :func:`path_cost`, by dynamic programming over the jumps left (module docstring); ``(path, its cost)``.
    Non-finite costs are jumps that cannot be taken."""
    c = _check_cost(cost, steps)
    if not coeff > 0:
        raise ValueError(f"coeff must be > 0, got {coeff}")
    m = c.shape[0] - 1
    c = np.where(np.isfinite(c), c, np.inf)
    value = np.full((steps + 1, m + 1), np.inf)  # value[k, j]: least cost from j to m in k jumps
    nxt = np.full((steps + 1, m + 1), -1, dtype=int)
    value[1, :m] = c[:m, m]
    nxt[1, :m] = m
    for k in range(2, steps + 1):
        for j in range(m - 1):
            # the next level i: after j, before m (0 only at the end)
            tail = c[j, j + 1 : m] + coeff * value[k - 1, j + 1 : m]
            if tail.size and np.isfinite(tail.min()):
                a = int(np.argmin(tail))
                value[k, j], nxt[k, j] = tail[a], j + 1 + a
    if not math.isfinite(value[steps, 0]):
        raise ValueError(f"no path of {steps} finite jumps through the grid")
    path, j = [0], 0
    for k in range(steps, 0, -1):
        j = int(nxt[k, j])
        path.append(j)
    return path, float(value[steps, 0])


def _grid(base: SamplingPlan, ref: ReferenceSolve, levels: int, k: int) -> tuple[list[float], torch.Tensor, list[int]]:
    """Candidate levels (decreasing, then 0), the teacher's states there for ``k`` samples, and the plain path."""
    n_levels = len(ref.sigmas) - 1  # the teacher's levels above 0
    idx = np.unique(np.linspace(0, n_levels - 1, min(levels, n_levels)).round().astype(int))
    levels_states = {float(ref.sigmas[i]): ref.states[i, :k] for i in idx}

    def near(s: float) -> float | None:
        return next((t for t in levels_states if abs(t - s) <= 1e-6 * s), None)

    plain = [float(v) for v in base.sigmas[:-1]]
    for s in plain:  # the plain levels exactly (a teacher's level within 1e-6 of one gives way to it)
        t = near(s)
        levels_states[s] = ref.at(s)[:k] if t is None else levels_states.pop(t)
    sig = sorted(levels_states, reverse=True)
    states = torch.stack([levels_states[s] for s in sig] + [ref.states[-1, :k]])
    return sig + [0.0], states, [sig.index(s) for s in plain] + [len(sig)]


def gits_plan(model: Callable[..., torch.Tensor], base: SamplingPlan, ref: ReferenceSolve, *,
              levels: int = DEFAULT_LEVELS, coeff: float = DEFAULT_COEFF, n: int | None = 256,
              extra_args: dict | None = None, progress: bool = False) -> SamplingPlan:
    """GITS's schedule for the plain plan ``base`` (its solver, its number of steps) from the teacher ``ref``
    (module docstring): the plain solver over the noise levels of :func:`cheapest_path` through the cost
    matrix of :func:`gits_cost_matrix` on ``levels`` of the teacher's levels plus ``base``'s, measured on the
    first ``n`` teacher trajectories (the paper's 256; ``None``: every stored one).  ``extra_args``: the
    calibration batch's conditioning (per-sample tensors are cut to the trajectories used).

    The plan's ``meta["gits"]`` records the grid, the cost of the chosen path and of the plain one on the same
    matrix, the model passes per trajectory and the wall time."""
    if not base.sigmas[-1] == 0:
        raise ValueError("GITS needs a plan that ends at sigma = 0")
    if abs(float(base.sigmas[0]) - float(ref.sigmas[0])) > 1e-6 * float(base.sigmas[0]):
        raise ValueError(f"the teacher starts at sigma {float(ref.sigmas[0]):.6g}, the plan at "
                         f"{float(base.sigmas[0]):.6g}: solve the teacher from the plan's first noise level")
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
        raise ValueError(f"levels must be an integer >= 2, got {levels!r}")
    t0 = time.perf_counter()
    kept = ref.states.shape[1]
    k = kept if n is None else min(int(n), kept)
    if k < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if extra_args:
        total = ref.final.shape[0]
        extra_args = {key: (v[:k] if isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == total else v)
                      for key, v in extra_args.items()}
    sig, states, plain = _grid(base, ref, levels, k)
    cost, passes = gits_cost_matrix(model, base.get_solver(), sig, states, extra_args=extra_args, progress=progress)
    path, best = cheapest_path(cost, base.steps, coeff)
    record = {"levels": len(sig), "coeff": coeff, "n": k, "cost": best, "plain_cost": path_cost(cost, plain, coeff),
              "path": path, "plain_path": plain, "model_passes": passes, "teacher": {"solver": ref.solver,
                                                                                     "steps": ref.steps},
              "wall_s": time.perf_counter() - t0}
    return SamplingPlan(base.solver, torch.tensor([sig[p] for p in path], dtype=torch.float64), "gits", None,
                        base.coords, dict(base.solver_options), {"name": "gits", "gits": record})
