"""The calibrated sampler's fit (steindiff.trajectory): closed forms, guards, bounds."""

import math

import numpy as np
import pytest
import torch

from steindiff.models.gmm import get_gmm
from steindiff.noise import VEProcess
from steindiff.plan import SamplingPlan, make_plan
from steindiff.sampling import prior_noise, sample
from steindiff.schedules import logsnr_sigmas
from steindiff.trajectory import (
    ReferenceSolve,
    _Params,
    closed_form_gammas,
    fit_trajectory,
    reference_solve,
    residual_noise,
)

S = 0.5  # std of the Gaussian data


def gaussian_denoiser(x, sigma):
    """Exact denoiser of N(0, S^2 I) data: D(x) = S^2 / (S^2 + sigma^2) x."""
    s2 = sigma.reshape(-1, *([1] * (x.ndim - 1))) ** 2
    return S**2 / (S**2 + s2) * x


def exact_state(x0, sigma0, sigma):
    """The PF-ODE solution for Gaussian data: x(sigma) = x(sigma0) sqrt(S^2 + sigma^2) / sqrt(S^2 + sigma0^2)."""
    return x0 * math.sqrt(S**2 + sigma**2) / math.sqrt(S**2 + sigma0**2)


def exact_reference(noise, sigma_max, sigma_min, steps=400):
    sig = logsnr_sigmas(steps, sigma_min, sigma_max)
    states = torch.stack([exact_state(noise, sigma_max, float(s)) for s in sig])
    return ReferenceSolve(sig, states, states[-1], "exact", steps, 0.0, 0.0)


def test_reference_at_interpolates_in_log_sigma():
    noise = torch.randn(8, 3, dtype=torch.float64) * 80
    ref = exact_reference(noise, 80.0, 0.002, steps=50)
    j = 17
    assert torch.equal(ref.at(float(ref.sigmas[j])), ref.states[j])
    lo, hi = float(ref.sigmas[j + 1]), float(ref.sigmas[j])
    mid = math.exp(0.5 * (math.log(lo) + math.log(hi)))
    assert torch.allclose(ref.at(mid), 0.5 * (ref.states[j] + ref.states[j + 1]))
    assert torch.equal(ref.at(0.0), ref.states[-1]) and torch.equal(ref.at(100.0), ref.states[0])
    # the interpolation error of the exact solution at a level between stored ones is small
    assert torch.allclose(ref.at(0.3), exact_state(noise, 80.0, 0.3), rtol=2e-3)


def test_closed_form_gammas_are_the_paper_coefficient_towards_the_ode_solution():
    """Euler with the exact Gaussian denoiser: T(x) = c_T x and the ODE solution x* = c x, so Eq. (1)
    gives gamma = (1 - c) / (1 - c_T) in closed form, and the corrected step lands on the ODE solution."""
    sig = [80.0, 5.0, 0.4, 0.03, 0.0]
    plan = SamplingPlan("euler", sig, "custom")
    noise = prior_noise((64, 4), 80.0, seed=0, dtype=torch.float64)
    ref = exact_reference(noise, 80.0, 0.002, steps=2000)
    g = closed_form_gammas(gaussian_denoiser, noise, plan, ref, gamma_bounds=(-10, 10), plain_tail=1)
    for k in range(len(sig) - 2):
        s, t = sig[k], sig[k + 1]
        d = S**2 / (S**2 + s**2)
        c_T = d + (t / s) * (1 - d)
        c = math.sqrt(S**2 + t**2) / math.sqrt(S**2 + s**2)
        assert g[k] == pytest.approx((1 - c) / (1 - c_T), rel=1e-4)
    assert g[-1] == 1.0  # the final step into sigma 0 stays plain
    # the calibrated solve follows the exact solution up to the last level
    x = sample(gaussian_denoiser, noise, sig[:-1], "euler", stabilizer=plan_with(plan, g[:-1]).stabilizer()).x
    assert torch.allclose(x, exact_state(noise, 80.0, sig[-2]), rtol=1e-3)


def plan_with(plan, gammas):
    return SamplingPlan(plan.solver, plan.sigmas[: len(gammas) + 1], "custom", list(gammas))


def test_closed_form_gammas_are_clipped_to_the_bounds():
    plan = SamplingPlan("euler", [80.0, 5.0, 0.4, 0.03, 0.0], "custom")
    noise = prior_noise((16, 4), 80.0, seed=0, dtype=torch.float64)
    ref = exact_reference(noise, 80.0, 0.002)
    g = closed_form_gammas(gaussian_denoiser, noise, plan, ref, gamma_bounds=(0.9, 1.1), plain_tail=1)
    assert all(0.9 <= v <= 1.1 for v in g) and min(g[:-1]) == 0.9  # the unclipped values exceed the band
    assert closed_form_gammas(gaussian_denoiser, noise, plan, ref)[-2:] == [1.0, 1.0]  # default tail: fit_trajectory's


def test_params_always_give_a_strictly_decreasing_schedule_above_the_floor():
    base = make_plan(VEProcess(), "dpmpp_2m", 6, "karras")
    p = _Params(base, "both", 0.002, [1.0] * base.steps)
    lo, hi = p.bounds((0.5, 1.5))
    theta0 = p.initial()
    assert theta0.shape == lo.shape == hi.shape and np.all(lo <= theta0) and np.all(theta0 <= hi)
    sig0, g0 = p.decode(theta0)
    assert torch.allclose(sig0, base.sigmas, rtol=1e-12)  # starts at the base schedule
    rng = np.random.default_rng(0)
    for _ in range(200):
        sig, g = p.decode(rng.uniform(lo, hi))
        assert float(sig[0]) == 80.0 and float(sig[-1]) == 0.0 and float(sig[-2]) >= 0.9 * 0.002
        assert torch.all(sig[1:] < sig[:-1])
        assert g[-1] == 1.0 and all(0.5 <= v <= 1.5 for v in g)
        assert np.all(p.penalty(rng.uniform(lo, hi), 1.0, 1.0) ** 2 >= 0)


def test_residual_noise_sees_noise_on_the_samples():
    gmm = get_gmm("gmm:toy2d")
    x = gmm.sample(2000, seed=1)
    clean = residual_noise(gmm, x, 0.002)
    noisy = residual_noise(gmm, x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2),
                                                       dtype=x.dtype), 0.002)
    assert noisy > 1.3 * clean


@pytest.fixture(scope="module")
def toy_fit():
    gmm = get_gmm("gmm:toy2d")
    base = make_plan(VEProcess(), "euler", 4, "karras")
    noise = prior_noise((256, 2), 80.0, seed=12345, dtype=torch.float64)
    fit = fit_trajectory(gmm, base, noise, sigma_min=0.002, ref_steps=100, max_solves=80)
    return gmm, base, fit


def test_fit_beats_plain_on_validation_and_on_other_noise(toy_fit):
    gmm, base, fit = toy_fit
    rec = fit.record
    assert rec["beats_plain"] and rec["chosen"] != "plain"
    cand = rec["candidates"]
    assert cand[rec["chosen"]]["val_rms"] < 0.7 * cand["plain"]["val_rms"]
    assert rec["n_fit"] == rec["n_val"] == 128 and rec["reference"]["convergence_rms"] < 1e-3
    plan = fit.plan
    assert plan.gammas[-1] == 1.0 and float(plan.sigmas[0]) == 80.0 and float(plan.sigmas[-1]) == 0.0
    # judged on noise the calibration never saw, against a fine solve of that noise
    ev = prior_noise((500, 2), 80.0, seed=7, dtype=torch.float64)
    ref = reference_solve(gmm, ev, 80.0, 0.002, steps=100).final
    x_plain = sample(gmm, ev, base.sigmas, "euler").x
    x_cal = sample(gmm, ev, plan.sigmas, "euler", stabilizer=plan.stabilizer()).x
    assert (x_cal - ref).pow(2).mean() < 0.5 * (x_plain - ref).pow(2).mean()


def test_a_calibration_that_cannot_beat_plain_keeps_gamma_one():
    """With the plain solve itself as the reference nothing can be closer: the plain plan is kept."""
    gmm = get_gmm("gmm:toy2d")
    base = make_plan(VEProcess(), "euler", 3, "karras")
    noise = prior_noise((64, 2), 80.0, seed=3, dtype=torch.float64)
    states = [noise]
    sample(gmm, noise, base.sigmas, "euler", callback=lambda d: states.append(d["x"]))
    ref = ReferenceSolve(base.sigmas, torch.stack(states), states[-1], "euler", 3, 0.0, 0.0)
    fit = fit_trajectory(gmm, base, noise, sigma_min=0.002, ref=ref, max_solves=20)
    assert fit.record["chosen"] == "plain" and not fit.record["beats_plain"]
    assert fit.plan.gammas == [1.0] * base.steps and torch.equal(fit.plan.sigmas, base.sigmas)


def test_fit_refuses_bad_arguments():
    gmm = get_gmm("gmm:toy2d")
    base = make_plan(VEProcess(), "euler", 3, "karras")
    noise = prior_noise((64, 2), 80.0, seed=3, dtype=torch.float64)
    with pytest.raises(ValueError, match="fit must be one of"):
        fit_trajectory(gmm, base, noise, sigma_min=0.002, fit="everything")
    with pytest.raises(ValueError, match="too small to split"):
        fit_trajectory(gmm, base, noise[:3], sigma_min=0.002)
    with pytest.raises(ValueError, match="validation"):
        fit_trajectory(gmm, base, noise, sigma_min=0.002, validation=1.0)


def test_gain_z_is_the_paired_t_statistic():
    from scipy.stats import ttest_rel

    from steindiff.trajectory import _gain_z

    g = torch.Generator().manual_seed(0)
    d_plain = torch.rand(200, generator=g, dtype=torch.float64)
    d_cand = d_plain - 0.05 + 0.2 * torch.rand(200, generator=g, dtype=torch.float64)
    assert _gain_z(d_plain, d_cand) == pytest.approx(float(ttest_rel(d_plain, d_cand).statistic), rel=1e-9)
    assert _gain_z(d_plain, d_plain - 1.0) == math.inf and _gain_z(d_plain, d_plain) == -math.inf


@pytest.mark.parametrize("decimals", [None, 2])
def test_rank_z_is_wilcoxons_signed_rank_statistic(decimals):
    """Against scipy's Wilcoxon test (one-sided, normal approximation, no continuity correction): the same
    p-value, with zero gains dropped and, rounded to 2 decimals, tied magnitudes."""
    from scipy.stats import norm, wilcoxon

    from steindiff.trajectory import _rank_z

    g = torch.Generator().manual_seed(0)
    d_plain = torch.rand(300, generator=g, dtype=torch.float64)
    d_cand = d_plain - 0.02 + 0.2 * torch.randn(300, generator=g, dtype=torch.float64)
    d_cand[:7] = d_plain[:7]
    if decimals is not None:
        d_plain, d_cand = d_plain.round(decimals=decimals), d_cand.round(decimals=decimals)
    ref = wilcoxon(d_plain.numpy(), d_cand.numpy(), method="approx", correction=False, alternative="greater")
    z = _rank_z(d_plain, d_cand)
    assert 1e-4 < ref.pvalue < 0.5 and norm.sf(z) == pytest.approx(ref.pvalue, rel=1e-9)
    assert _rank_z(d_cand, d_plain) == pytest.approx(-z, rel=1e-12)
    assert _rank_z(d_plain, d_plain) == 0.0


def test_one_far_sample_does_not_swamp_the_rank_test():
    """A candidate closer for every sample but one, which it moves far (a coarse solve ending in another
    mode): the mean gain's t statistic sees only the far sample, the rank statistic sees the majority."""
    from steindiff.trajectory import _gain_z, _rank_z

    g = torch.Generator().manual_seed(1)
    d_plain = 1.0 + torch.rand(256, generator=g, dtype=torch.float64)
    d_cand = 0.7 * d_plain
    d_cand[0] = 80.0
    assert _gain_z(d_plain, d_cand) < 1.0 < 10.0 < _rank_z(d_plain, d_cand)


def test_a_gain_within_the_validation_noise_keeps_the_plain_plan():
    """The same fit that beats plain (toy2d, euler, 4 steps) is refused when its gain must exceed any
    number of standard errors; its record says why."""
    gmm = get_gmm("gmm:toy2d")
    base = make_plan(VEProcess(), "euler", 4, "karras")
    noise = prior_noise((64, 2), 80.0, seed=12345, dtype=torch.float64)
    fit = fit_trajectory(gmm, base, noise, sigma_min=0.002, ref_steps=100, max_solves=20, significance=math.inf)
    cand = fit.record["candidates"]
    assert fit.record["chosen"] == "plain" and fit.plan.gammas == [1.0] * base.steps
    assert any(v["val_rms"] < cand["plain"]["val_rms"] for k, v in cand.items() if k != "plain")
    assert all(not v["passed_significance_check"] for k, v in cand.items() if k != "plain")
    assert all(v["val_gain_z"] is not None and v["val_rank_z"] is not None for k, v in cand.items() if k != "plain")


def _scores(**cands):
    """Candidate records as fit_trajectory writes them: (val_rms, residual, distribution, significance)."""
    return {k: {"val_rms": v[0], "passed_residual_check": v[1], "passed_distribution_check": v[2],
                "passed_significance_check": v[3]} for k, v in cands.items()}


def test_choose_candidate_applies_exactly_the_named_guards():
    from steindiff.trajectory import DEFAULT_GUARDS, choose_candidate

    scores = _scores(plain=(1.0, True, True, True), closed_form=(0.9, True, True, True),
                     refined=(0.6, False, True, True), refined_residual=(0.5, True, False, True))
    assert DEFAULT_GUARDS == ("distribution", "significance")
    assert choose_candidate(scores) == "refined"  # residual noise recorded, not gating
    assert choose_candidate(scores, ("residual", "distribution", "significance")) == "closed_form"
    assert choose_candidate(scores, "residual") == "refined_residual"
    assert choose_candidate(scores, ()) == "refined_residual"
    scores["closed_form"]["passed_significance_check"] = False
    assert choose_candidate(scores, ("residual", "distribution", "significance")) == "plain"
    scores["refined"]["val_rms"] = None  # non-finite samples never win
    assert choose_candidate(scores, ()) == "refined_residual"
    tie = _scores(plain=(1.0, True, True, True), refined=(1.0, True, True, True))
    assert choose_candidate(tie, ()) == "plain"
    with pytest.raises(ValueError, match="unknown calibration guard.*'nope'.*residual, distribution, significance"):
        choose_candidate(scores, ("distribution", "nope"))


def test_fit_records_its_guards_and_refuses_unknown_ones():
    gmm = get_gmm("gmm:toy2d")
    base = make_plan(VEProcess(), "euler", 4, "karras")
    noise = prior_noise((64, 2), 80.0, seed=12345, dtype=torch.float64)
    with pytest.raises(ValueError, match="unknown calibration guard"):
        fit_trajectory(gmm, base, noise, sigma_min=0.002, ref_steps=100, max_solves=4, guards="residual,foo")
    fit = fit_trajectory(gmm, base, noise, sigma_min=0.002, ref_steps=100, max_solves=20,
                         guards="residual,distribution,significance")
    rec = fit.record
    assert rec["guards"] == ["residual", "distribution", "significance"]
    assert all(rec["candidates"][rec["chosen"]][f"passed_{g}_check"] for g in rec["guards"])


def test_plain_tail_keeps_the_last_steps_plain_in_every_candidate():
    """plain_tail=2: the step into the last noise level and the final step into 0 keep gamma 1 in the
    closed form, in every theta of the refinement, and in the fitted candidates."""
    base = make_plan(VEProcess(), "dpmpp_2m", 6, "karras")
    p = _Params(base, "both", 0.002, [1.0] * base.steps, plain_tail=2)
    lo, hi = p.bounds((0.5, 1.5))
    assert p.initial().shape == lo.shape and p.ng == base.steps - 2
    rng = np.random.default_rng(1)
    for _ in range(50):
        _, g = p.decode(rng.uniform(lo, hi))
        assert g[-2:] == [1.0, 1.0] and len(g) == base.steps
    noise = prior_noise((32, 4), 80.0, seed=0, dtype=torch.float64)
    ref = exact_reference(noise, 80.0, 0.002)
    g1 = closed_form_gammas(gaussian_denoiser, noise, base, ref, gamma_bounds=(-10, 10), plain_tail=1)
    g2 = closed_form_gammas(gaussian_denoiser, noise, base, ref, gamma_bounds=(-10, 10))  # default 2
    assert g2[:-2] == g1[:-2] and g2[-2:] == [1.0, 1.0] and g1[-2] != 1.0
    gmm = get_gmm("gmm:toy2d")
    fit = fit_trajectory(gmm, make_plan(VEProcess(), "euler", 5, "karras"),
                         prior_noise((64, 2), 80.0, seed=12345, dtype=torch.float64), sigma_min=0.002,
                         ref_steps=100, max_solves=20)
    assert fit.record["plain_tail"] == 2
    assert all(c["gammas"][-2:] == [1.0, 1.0] for c in fit.record["candidates"].values())
    with pytest.raises(ValueError, match="plain_tail"):
        fit_trajectory(gmm, base, prior_noise((8, 2), 80.0, seed=0, dtype=torch.float64), sigma_min=0.002,
                       plain_tail=0)


def test_every_stage_of_the_fit_runs_without_tf32_and_restores_the_settings():
    """TF32 rounds to about 5e-4, the size of the refinement's finite-difference steps: the model must be
    called with TF32 off during the reference solve and the fit, and the user's settings come back after."""
    seen = []

    def model(x, sigma):
        seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
        return gaussian_denoiser(x, sigma)

    prev = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        base = make_plan(VEProcess(), "euler", 3, "karras")
        noise = prior_noise((16, 2), 80.0, seed=5, dtype=torch.float64)
        ref = reference_solve(model, noise, 80.0, 0.002, steps=8)
        fit_trajectory(model, base, noise, sigma_min=0.002, ref=ref, max_solves=6)
        assert seen and set(seen) == {(False, False)}
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev
