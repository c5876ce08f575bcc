"""GITS (steindiff.peers.gits): the dynamic programme against brute force, the cost matrix against closed forms
and against the sampling loop, and the plan it returns."""

import itertools
import math

import numpy as np
import pytest
import torch

from steindiff.models.gmm import get_gmm
from steindiff.noise import VEProcess
from steindiff.peers import cheapest_path, gits_cost_matrix, gits_plan, path_cost
from steindiff.plan import SamplingPlan, make_plan
from steindiff.sampling import prior_noise, sample
from steindiff.schedules import logsnr_sigmas
from steindiff.trajectory import ReferenceSolve, reference_solve

S = 0.5  # std of the Gaussian data of the closed-form tests


def gaussian_denoiser(x, sigma):
    """Exact denoiser of N(0, S^2 I): D(x) = S^2 / (S^2 + sigma^2) x."""
    s2 = sigma.reshape(-1, *([1] * (x.ndim - 1))) ** 2
    return S**2 / (S**2 + s2) * x


def exact_teacher(noise, sigma_max, sigma_min, steps):
    """The PF-ODE solution for Gaussian data, x(sigma) = x(sigma_max) sqrt(S^2 + sigma^2) / sqrt(S^2 + sigma_max^2),
    at the levels of a ``steps``-step log-SNR solve."""
    sig = logsnr_sigmas(steps, sigma_min, sigma_max)
    states = torch.stack([noise * math.sqrt(S**2 + float(s) ** 2) / math.sqrt(S**2 + sigma_max**2) for s in sig])
    return ReferenceSolve(sig, states, states[-1], "exact", steps, 0.0, 0.0)


def brute_force(cost, steps, coeff):
    m = cost.shape[0] - 1
    best = (math.inf, None)
    for inner in itertools.combinations(range(1, m), steps - 1):
        path = [0, *inner, m]
        c = path_cost(cost, path, coeff)
        if c < best[0]:
            best = (c, path)
    return best


@pytest.mark.parametrize("coeff", [1.0, 1.15, 0.8])
def test_cheapest_path_is_the_brute_force_optimum(coeff):
    rng = np.random.default_rng(0)
    for trial in range(20):
        m = int(rng.integers(2, 9))
        cost = np.triu(rng.exponential(size=(m + 1, m + 1)), 1)
        cost[np.tril_indices(m + 1)] = np.inf
        if trial % 3 == 0:  # some jumps cannot be taken
            cost[rng.random(cost.shape) < 0.2] = np.inf
        for steps in range(1, m + 1):
            want, want_path = brute_force(cost, steps, coeff)
            if not math.isfinite(want):
                with pytest.raises(ValueError, match="no path"):
                    cheapest_path(cost, steps, coeff)
                continue
            path, got = cheapest_path(cost, steps, coeff)
            assert got == pytest.approx(want) and path_cost(cost, path, coeff) == pytest.approx(want)
            assert path[0] == 0 and path[-1] == m and len(path) == steps + 1 and path == sorted(set(path))


def test_cheapest_path_bad_input():
    cost = np.ones((4, 4))
    with pytest.raises(ValueError, match="steps must be a whole number from 1 to 3"):
        cheapest_path(cost, 4)
    with pytest.raises(ValueError, match="square"):
        cheapest_path(np.ones((3, 4)), 1)
    with pytest.raises(ValueError, match="coeff"):
        cheapest_path(cost, 2, coeff=0.0)


def test_cost_matrix_is_the_closed_form_euler_error():
    """Euler with the exact Gaussian denoiser from the exact state x_i = a_i z: one step to s_j lands on
    (1 + (s_j - s_i) / s_i * s_i^2 / (S^2 + s_i^2)) a_i z, and C[i, j] is its mean L2 distance to a_j z."""
    z = torch.randn(32, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sig = [80.0, 3.0, 0.7, 0.05, 0.0]
    a = [math.sqrt(S**2 + s**2) for s in sig]
    states = torch.stack([ai * z for ai in a])
    cost, passes = gits_cost_matrix(gaussian_denoiser, "euler", sig, states)
    assert passes == len(sig) - 1  # one model pass per level, shared by every jump from it
    norms = z.norm(dim=1).mean().item()
    for i in range(len(sig) - 1):
        for j in range(i + 1, len(sig)):
            s, t = sig[i], sig[j]
            lands = a[i] * (1 + (t - s) / s * s**2 / (S**2 + s**2))
            assert cost[i, j] == pytest.approx(abs(lands - a[j]) * norms, rel=1e-9, abs=1e-12)
    assert np.isinf(cost[np.tril_indices(len(sig))]).all()


@pytest.mark.parametrize("solver", ["heun", "dpmpp_2m", "unipc", "ipndm"])
def test_cost_matrix_is_one_step_of_the_sampling_loop(solver):
    """Each entry is one solve of the library's sampling loop from the teacher's state over the two levels."""
    gmm = get_gmm("gmm:toy2d")
    noise = prior_noise((64, 2), 80.0, seed=3, dtype=torch.float64)
    ref = reference_solve(gmm, noise, 80.0, 0.002, steps=40)
    idx = [0, 10, 25, 39, 40]
    sig = [float(ref.sigmas[i]) for i in idx]
    cost, _ = gits_cost_matrix(gmm, solver, sig, ref.states[idx])
    for i, j in [(0, 1), (0, 4), (1, 3), (2, 4), (3, 4)]:
        x = sample(gmm, ref.states[idx[i]], [sig[i], sig[j]], solver).x
        want = (x - ref.states[idx[j]]).norm(dim=1).mean().item()
        assert cost[i, j] == pytest.approx(want, rel=1e-12)


def test_gits_plan_on_an_exact_mixture():
    """On an exact mixture the plan keeps the solver and the budget, starts at sigma_max and ends at 0 on the
    grid, is never costlier than the plain schedule on its own matrix, and its samples from other noise are closer
    to the model's ODE solution than the plain schedule's."""
    gmm = get_gmm("gmm:image64")
    proc = VEProcess()
    noise = prior_noise((128, 64), 80.0, seed=12345, dtype=torch.float64)
    ref = reference_solve(gmm, noise, 80.0, 0.002, steps=100)
    for solver, nfe in (("euler", 4), ("dpmpp_2m", 5)):
        base = make_plan(proc, solver, nfe, "karras")
        plan = gits_plan(gmm, base, ref, levels=30)
        rec = plan.meta["gits"]
        assert plan.solver == solver and plan.nfe == base.nfe and plan.steps == base.steps and plan.gammas is None
        assert float(plan.sigmas[0]) == 80.0 and float(plan.sigmas[-1]) == 0.0
        assert rec["cost"] <= rec["plain_cost"] + 1e-12 and rec["n"] == 128 and rec["model_passes"] == rec["levels"] - 1
        grid = set(float(s) for s in ref.sigmas) | set(float(s) for s in base.sigmas)
        assert all(float(s) in grid for s in plan.sigmas)
        x = prior_noise((200, 64), 80.0, seed=0, dtype=torch.float64)
        fine = sample(gmm, x, logsnr_sigmas(100, 0.002, 80.0), "dpmpp_2m").x
        err = {k: (sample(gmm, x, p.sigmas, solver).x - fine).pow(2).mean().sqrt().item()
               for k, p in (("plain", base), ("gits", plan))}
        assert err["gits"] < err["plain"], (solver, err)


def test_gits_plan_matches_brute_force_through_the_plan_api():
    """With the exact Gaussian teacher the chosen schedule is the best path of the recorded matrix."""
    noise = prior_noise((16, 3), 80.0, seed=1, dtype=torch.float64)
    ref = exact_teacher(noise, 80.0, 0.002, steps=30)
    base = make_plan(VEProcess(), "euler", 3, "karras")
    plan = gits_plan(gaussian_denoiser, base, ref, levels=8, coeff=1.0)
    sig = [float(ref.sigmas[i]) for i in np.unique(np.linspace(0, 29, 8).round().astype(int))]
    sig = sorted(set(sig) | {float(s) for s in base.sigmas[:-1]}, reverse=True) + [0.0]
    states = torch.stack([ref.at(s) for s in sig])
    cost, _ = gits_cost_matrix(gaussian_denoiser, "euler", sig, states)
    want, path = brute_force(cost, 3, 1.0)
    assert plan.meta["gits"]["cost"] == pytest.approx(want)
    assert [float(s) for s in plan.sigmas] == [sig[p] for p in path]


def test_gits_plan_bad_input():
    noise = prior_noise((8, 3), 80.0, seed=1, dtype=torch.float64)
    ref = exact_teacher(noise, 80.0, 0.002, steps=10)
    base = make_plan(VEProcess(), "euler", 3, "karras")
    with pytest.raises(ValueError, match="the teacher starts at sigma 80"):
        gits_plan(gaussian_denoiser, SamplingPlan("euler", [40.0, 1.0, 0.0]), ref)
    with pytest.raises(ValueError, match="levels must be"):
        gits_plan(gaussian_denoiser, base, ref, levels=1)
    with pytest.raises(ValueError, match="strictly decreasing and end at 0"):
        gits_cost_matrix(gaussian_denoiser, "euler", [80.0, 1.0], torch.zeros(2, 4, 3))
