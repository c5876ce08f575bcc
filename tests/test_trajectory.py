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


def test_a_guard_with_thresholds_is_judged_anew_from_the_recorded_deviations():
    """``residual:margin=0`` passes a candidate whose recorded deviation is no larger than plain's (the
    library's margin of 0.2 passes 1.1 times plain's too); ``modes:tolerance=0.02`` an absolute excess over
    plain's of at most 0.02; the recorded flags are not what decides."""
    from steindiff.trajectory import choose_candidate, parse_guard, passes_guard

    scores = _scores(plain=(1.0, True, True, True), noisier=(0.5, True, True, True), moved=(0.7, True, True, True))
    scores["plain"]["checks"] = {"residual": 0.30, "modes": 0.05}
    scores["noisier"]["checks"] = {"residual": -0.33, "modes": 0.05}  # 1.1x plain's size, the other side
    scores["moved"]["checks"] = {"residual": 0.29, "modes": 0.08}
    for v in scores.values():
        v["passed_modes_check"] = True
    plain = scores["plain"]
    assert passes_guard(scores["noisier"], plain, "residual") and not passes_guard(scores["noisier"], plain,
                                                                                    "residual:margin=0")
    assert passes_guard(scores["noisier"], plain, "residual:margin=0.1")
    assert not passes_guard(scores["moved"], plain, "modes:tolerance=0.02")
    assert passes_guard(scores["moved"], plain, "modes:tolerance=0.03")
    assert choose_candidate(scores, ("residual", "distribution")) == "noisier"
    assert choose_candidate(scores, ("residual:margin=0", "distribution")) == "moved"
    assert choose_candidate(scores, "residual:margin=0,modes:tolerance=0.02") == "plain"
    scores["moved"]["checks"] = None  # non-finite samples fail a judged guard
    assert not passes_guard(scores["moved"], plain, "modes:tolerance=0.5")
    del scores["moved"]["checks"]  # a record without the deviations cannot be judged anew
    with pytest.raises(ValueError, match="score the candidates again"):
        choose_candidate(scores, "modes:tolerance=0.5")
    assert choose_candidate(scores, "modes") == "noisier"  # the recorded flags still decide a plain name
    assert parse_guard("residual:tolerance=0.1:margin=0") == ("residual", {"tolerance": 0.1, "margin": 0.0})
    assert parse_guard("significance") == ("significance", {})


def test_dominance_waives_a_check_for_a_candidate_far_closer_than_plain_after_one_more_denoising_pass():
    """``dominance=K``: a candidate whose ``denoised`` distance is at most 1/K of plain's passes the check
    whatever its deviation (plain is too far off to be a yardstick); at 1/K plus a little it is judged as
    without; plain that diverged (an infinite distance) is dominated by any finite candidate."""
    from steindiff.trajectory import check_guards, choose_candidate, parse_guard, passes_guard

    scores = _scores(plain=(1.0, True, True, True), close=(0.1, True, True, True))
    scores["plain"]["checks"] = {"residual": 0.04, "modes": 0.15, "denoised": 0.4}
    scores["close"]["checks"] = {"residual": 0.18, "modes": 0.44, "denoised": 0.1}
    for v in scores.values():
        v["passed_modes_check"] = True
    plain = scores["plain"]
    assert not passes_guard(scores["close"], plain, "residual:margin=0")
    assert passes_guard(scores["close"], plain, "residual:margin=0:dominance=4")
    assert passes_guard(scores["close"], plain, "modes:tolerance=0.02:dominance=4")
    assert not passes_guard(scores["close"], plain, "residual:margin=0:dominance=4.5")  # 0.1 * 4.5 > 0.4
    assert choose_candidate(scores, ("residual:margin=0", "modes:tolerance=0.02")) == "plain"
    assert choose_candidate(scores, ("residual:margin=0:dominance=4", "modes:tolerance=0.02:dominance=4")) == "close"
    plain["checks"]["denoised"] = float("inf")
    assert passes_guard(scores["close"], plain, "residual:margin=0:dominance=100")
    del scores["close"]["checks"]["denoised"]  # without the distance nothing is waived
    assert not passes_guard(scores["close"], plain, "residual:margin=0:dominance=4")
    assert parse_guard("modes:dominance=4:tolerance=0.02") == ("modes", {"dominance": 4.0, "tolerance": 0.02})
    assert check_guards("modes:dominance=4:tolerance=0.02") == ("modes:tolerance=0.02:dominance=4",)


@pytest.mark.parametrize("guard, message", [
    ("distribution:margin=0", "takes no thresholds"), ("residual:margin", "name:tolerance=T:margin=M"),
    ("residual:width=1", "name:tolerance=T:margin=M"), ("residual:dominance=0.5", "at least 1"),
    ("residual:margin=0:margin=1", "at most once"),
    ("modes:tolerance=lots", "must be a number"), ("modes:tolerance=-1", ">= 0"), ("resid", "unknown"),
    ("residual:margin=0,residual", "named twice"),
])
def test_a_malformed_guard_is_refused_with_what_is_wrong(guard, message):
    from steindiff.trajectory import choose_candidate

    with pytest.raises(ValueError, match=message):
        choose_candidate(_scores(plain=(1.0, True, True, True)), guard)


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


# ---------------------------------------------------------------- the validation choice on constructed candidates
# A linear "model" D(x) = x / 2 and one Euler step into 0: the plain solve gives x / 2, gamma g gives
# (1 - g / 2) x, and residual_noise of samples y is RMS(y) / 2.  With 1-D samples and a reference chosen
# sample by sample, every per-sample distance and every residual level is known in closed form.


def halve(x, sigma):
    return 0.5 * x


ONE_STEP = [1.0, 0.0]


def one_step(g):
    return SamplingPlan("euler", ONE_STEP, "custom", [g])


def asymmetric_case(cand_better_for_most: bool):
    """64 samples: for 54 small ones (|x| 0.1 to 0.2) one solve is exact and the other off by 0.2 |x|; for 10
    large ones (|x| 5 to 10) the other way round.  gamma 0.6 solves to 0.7 x, plain to 0.5 x."""
    small = torch.linspace(0.1, 0.2, 54, dtype=torch.float64)
    large = torch.linspace(5.0, 10.0, 10, dtype=torch.float64)
    x = torch.cat([small, large])[:, None] * torch.tensor([1.0, -1.0], dtype=torch.float64).repeat(32)[:, None]
    plain_exact, cand_exact = 0.5 * x, 0.7 * x
    most, few = (cand_exact, plain_exact) if cand_better_for_most else (plain_exact, cand_exact)
    ref = torch.cat([most[:54], few[54:]])
    return x, ref


def wilcoxon_z(d_plain, d_cand):
    """Wilcoxon's signed-rank statistic of d_plain - d_cand as a z score (scipy, normal approximation)."""
    from scipy.stats import norm, wilcoxon

    p = wilcoxon(d_plain.numpy(), d_cand.numpy(), method="approx", correction=False, alternative="greater").pvalue
    return float(norm.isf(p))


@pytest.mark.parametrize("cand_better_for_most", [False, True])
def test_significance_decides_by_the_majority_of_samples_not_by_the_mean(cand_better_for_most):
    """Worse for 54 of 64 samples but far better on the mean (10 large gains): refused, although its RMS
    distance is lower.  Better for 54 samples but worse on the mean: it passes the significance check (its
    larger RMS distance keeps the plain plan).  The statistics against scipy and direct per-sample sums."""
    from steindiff.trajectory import choose_candidate, score_candidates

    x, ref = asymmetric_case(cand_better_for_most)
    scores = score_candidates(halve, {"plain": one_step(1.0), "damped": one_step(0.6)}, x, ref, sigma_min=0.002,
                              ref_residual=1.0)
    d_plain, d_cand = (0.5 * x - ref).pow(2).mean(1), (0.7 * x - ref).pow(2).mean(1)
    plain, cand = scores["plain"], scores["damped"]
    assert plain["val_rms"] == pytest.approx(float(d_plain.mean().sqrt()), rel=1e-12)
    assert cand["val_rms"] == pytest.approx(float(d_cand.mean().sqrt()), rel=1e-12)
    assert cand["val_max"] == pytest.approx(float(d_cand.max().sqrt()), rel=1e-12)
    z = wilcoxon_z(d_plain, d_cand)
    assert cand["val_rank_z"] == pytest.approx(z, rel=1e-9) and abs(z) > 2.5
    gain = d_plain - d_cand
    assert cand["val_gain_z"] == pytest.approx(float(gain.mean() / gain.std() * math.sqrt(64)), rel=1e-9)
    if cand_better_for_most:
        assert z > 2.5 and cand["val_gain_z"] < -2.5 and cand["val_rms"] > plain["val_rms"]
        assert cand["passed_significance_check"]
    else:
        assert z < -2.5 and cand["val_gain_z"] > 2.5 and cand["val_rms"] < 0.2 * plain["val_rms"]
        assert not cand["passed_significance_check"]
        assert choose_candidate(scores, ()) == "damped"  # the closest; refused by the significance check alone
    assert plain["passed_significance_check"] and plain["val_rank_z"] is None
    assert choose_candidate(scores, ("significance",)) == "plain"


def test_significance_threshold_is_strict_and_takes_the_rank_statistic():
    from steindiff.trajectory import score_candidates

    x, ref = asymmetric_case(True)
    cands = {"plain": one_step(1.0), "damped": one_step(0.6)}
    z = score_candidates(halve, cands, x, ref, sigma_min=0.002, ref_residual=1.0)["damped"]["val_rank_z"]
    assert 2.5 < z < 3.5
    for level, passed in ((z - 1e-9, True), (z, False), (z + 1e-9, False), (-z, True)):
        rec = score_candidates(halve, cands, x, ref, sigma_min=0.002, significance=level, ref_residual=1.0)
        assert rec["damped"]["passed_significance_check"] is passed, level


def test_residual_check_band_is_two_sided_and_at_least_the_plain_solvers_deviation():
    """Residual noise of the solve with gamma g is (1 - g/2) R with R = RMS(x)/2 (plain: R/2).  With the
    reference's level at the plain one the band is residual_tolerance - 1 on either side; with the plain
    solve 20% off it, the band is those 20%."""
    from steindiff.trajectory import score_candidates

    x = torch.linspace(-2.0, 3.0, 40, dtype=torch.float64)[:, None]
    R = float(x.pow(2).mean().sqrt()) / 2
    ref = 0.5 * x

    def ratio_to_gamma(q):  # a candidate whose residual is q times the plain solve's
        return 2 - q

    def check(ratios, r_ref, **kw):
        cands = {"plain": one_step(1.0), **{f"q{q}": one_step(ratio_to_gamma(q)) for q in ratios}}
        sc = score_candidates(halve, cands, x, ref, sigma_min=0.002, ref_residual=r_ref, **kw)
        for q in ratios:
            assert sc[f"q{q}"]["residual_noise"] == pytest.approx(q * R / 2, rel=1e-12)
        assert sc["plain"]["passed_residual_check"]
        return {q: sc[f"q{q}"]["passed_residual_check"] for q in ratios}

    # deviation |r / r_ref - 1|: 0.951 and 1.049 are within 0.05 (not their reciprocals 0.0515 and 0.0467)
    assert check([1.04, 0.96, 0.951, 1.049, 1.0515, 1.06, 0.94, 0.5, 1.5], R / 2) == {
        1.04: True, 0.96: True, 0.951: True, 1.049: True, 1.0515: False, 1.06: False, 0.94: False, 0.5: False,
        1.5: False}
    assert check([1.06, 1.09, 1.11, 0.91], R / 2, residual_tolerance=1.10) == {
        1.06: True, 1.09: True, 1.11: False, 0.91: True}
    # the plain solve 20% above the reference's level: the band is 0.2 on both sides of the reference's level
    # (candidates at rho times the reference's level; rho = 1.2 is the plain solve itself, on the band's edge)
    rhos = [1.2, 1.19, 1.1, 1.0, 0.9, 0.81, 1.25, 0.75]
    got = check([rho / 1.2 for rho in rhos], R / 2 / 1.2)
    assert [got[rho / 1.2] for rho in rhos] == [True] * 6 + [False] * 2


def test_a_candidate_identical_to_plain_passes_every_check():
    """Ties pass: equal residual deviation (when that is the band) and equal sliced W2; then plain wins
    the tie of the distances, whatever the order of the candidates."""
    from steindiff.trajectory import choose_candidate, score_candidates

    x = torch.linspace(-2.0, 3.0, 40, dtype=torch.float64)[:, None]
    ref = 0.45 * x + 0.01
    plain_res = float(x.pow(2).mean().sqrt()) / 4
    sc = score_candidates(halve, {"same": one_step(1.0), "plain": one_step(1.0), "wider": one_step(0.9)}, x, ref,
                          sigma_min=0.002, ref_residual=plain_res / 1.3)
    same, plain, wider = sc["same"], sc["plain"], sc["wider"]
    assert same["val_rms"] == plain["val_rms"] and same["val_sw2"] == plain["val_sw2"]
    assert same["passed_residual_check"] and same["passed_distribution_check"]
    assert same["val_rank_z"] == 0.0 and not same["passed_significance_check"]
    assert wider["val_sw2"] > plain["val_sw2"] and not wider["passed_distribution_check"]
    assert choose_candidate(sc, ("residual", "distribution")) == "plain"
    assert list(sc) == ["same", "plain", "wider"]


def test_plain_wins_ties_and_always_passes_in_any_order():
    from steindiff.trajectory import choose_candidate

    tie = _scores(refined=(1.0, True, True, True), closed_form=(1.0, True, True, True), plain=(1.0, True, True, True))
    assert choose_candidate(tie, ()) == "plain" and choose_candidate(tie) == "plain"
    tie["closed_form"]["val_rms"] = 0.999
    assert choose_candidate(tie) == "closed_form"
    # plain is the fallback even with its flags unset; non-finite candidates never win
    lone = _scores(refined=(0.5, False, False, False), plain=(2.0, False, False, False), closed_form=(None, True,
                                                                                                     True, True))
    assert choose_candidate(lone, ("residual", "distribution", "significance")) == "plain"
    assert choose_candidate(lone, ()) == "refined"


# ---------------------------------------------------------------- the fit: split, start, budget, bounds, last level


def test_fit_splits_the_batch_by_the_validation_fraction():
    """validation=0.25 of 10: the first round(7.5) = 8 samples fit, the last 2 validate; the record's plain
    score, closed form and reference residual are those of these parts."""
    from steindiff.trajectory import _rms

    base = make_plan(VEProcess(), "euler", 4, "karras")
    noise = prior_noise((10, 3), 80.0, seed=1, dtype=torch.float64)
    ref = exact_reference(noise, 80.0, 0.002, steps=200)
    fit = fit_trajectory(gaussian_denoiser, base, noise, sigma_min=0.01, ref=ref, fit="gamma", validation=0.25,
                         max_solves=2)
    rec = fit.record
    assert (rec["n_fit"], rec["n_val"]) == (8, 2)
    plain_val = sample(gaussian_denoiser, noise[8:], base.sigmas, "euler").x
    assert rec["candidates"]["plain"]["val_rms"] == pytest.approx(_rms(plain_val, ref.final[8:]), rel=1e-12)
    part = ReferenceSolve(ref.sigmas, ref.states[:, :8], ref.final[:8], "exact", 200, 0.0, 0.0)
    assert rec["candidates"]["closed_form"]["gammas"] == closed_form_gammas(gaussian_denoiser, noise[:8], base, part)
    assert rec["reference"]["residual_noise"] == pytest.approx(residual_noise(gaussian_denoiser, ref.final[8:],
                                                                              0.01), rel=1e-12)
    assert rec["candidates"]["plain"]["residual_noise"] == pytest.approx(
        residual_noise(gaussian_denoiser, plain_val, 0.01), rel=1e-12)  # at sigma_min, not the plan's last level
    # the reference solve made by the fit keeps the states of the fit part
    fit2 = fit_trajectory(gaussian_denoiser, base, noise, sigma_min=0.002, ref_steps=8, fit="gamma",
                          validation=0.75, max_solves=2)
    assert (fit2.record["n_fit"], fit2.record["n_val"]) == (2, 8)
    assert fit2.record["reference"]["solver"] == "dpmpp_2m" and fit2.record["reference"]["steps"] == 8


def test_refinement_starts_from_the_closed_form_when_it_is_closer_on_the_fit_part():
    """With one solve per refinement, a refined candidate is its starting point: the closed form where the
    exact reference makes it land on the ODE solution; the plain gammas where the reference's intermediate
    states are off (scaled by 0.8) while its final samples are the plain solve's own."""
    base = make_plan(VEProcess(), "euler", 4, "karras")
    noise = prior_noise((16, 3), 80.0, seed=2, dtype=torch.float64)
    ref = exact_reference(noise, 80.0, 0.002, steps=200)
    rec = fit_trajectory(gaussian_denoiser, base, noise, sigma_min=0.002, ref=ref, fit="gamma",
                         max_solves=2).record
    cf = rec["candidates"]["closed_form"]["gammas"]
    assert abs(cf[1] - 1) > 0.01
    assert rec["candidates"]["refined"]["gammas"] == cf == rec["candidates"]["refined_residual"]["gammas"]
    assert rec["refine"]["refined"]["solves"] == 1 and rec["refine"]["refined"]["stopped"] == "budget"

    plain_final = sample(gaussian_denoiser, noise, base.sigmas, "euler").x
    off = ReferenceSolve(ref.sigmas, 0.8 * ref.states, plain_final, "off", 200, 0.0, 0.0)
    rec = fit_trajectory(gaussian_denoiser, base, noise, sigma_min=0.002, ref=off, fit="gamma",
                         max_solves=2).record
    assert abs(rec["candidates"]["closed_form"]["gammas"][0] - 1) > 0.01
    assert rec["candidates"]["refined"]["gammas"] == [1.0] * 4 == rec["candidates"]["refined_residual"]["gammas"]


def test_the_solve_budget_is_split_between_the_two_refinements():
    base = make_plan(VEProcess(), "euler", 5, "karras")
    noise = prior_noise((16, 3), 80.0, seed=3, dtype=torch.float64)
    ref = exact_reference(noise, 80.0, 0.002, steps=200)
    off = ReferenceSolve(ref.sigmas, ref.states, 1.1 * ref.final, "off", 200, 0.0, 0.0)  # far from any plan
    for max_solves, each in ((12, 6), (9, 4), (1, 1)):
        rec = fit_trajectory(gaussian_denoiser, base, noise, sigma_min=0.002, ref=off, fit="both",
                             max_solves=max_solves).record
        for name in ("refined", "refined_residual"):
            assert rec["refine"][name]["solves"] == each and rec["refine"][name]["stopped"] == "budget", name
    rec = fit_trajectory(gaussian_denoiser, base, noise, sigma_min=0.002, ref=off, fit="both", max_solves=12,
                         reg_residual=0.0).record
    assert list(rec["refine"]) == ["refined"] and rec["refine"]["refined"]["solves"] == 6


@pytest.mark.parametrize("g_star,bounds,expected", [(3.0, (0.5, 1.5), 1.5), (3.0, (0.5, 2.0), 2.0),
                                                    (0.2, (0.5, 1.5), 0.5), (1.3, (0.5, 1.5), 1.3)])
def test_refine_keeps_the_gamma_within_its_bounds(g_star, bounds, expected):
    """One fitted gamma (3 steps, plain tail 2) and a target solved with gamma g*: the final samples are
    linear in gamma, so the bounded least-squares fit lands on g* clipped to the bounds."""
    from steindiff.trajectory import refine

    base = SamplingPlan("euler", [80.0, 2.0, 0.05, 0.0], "custom")
    noise = prior_noise((16, 3), 80.0, seed=4, dtype=torch.float64)
    target = sample(gaussian_denoiser, noise, base.sigmas, "euler",
                    stabilizer=SamplingPlan("euler", base.sigmas, "custom", [g_star, 1.0, 1.0]).stabilizer()).x
    plan, info = refine(gaussian_denoiser, noise, target, base, [1.0] * 3, fit="gamma", sigma_floor=0.002,
                        gamma_bounds=bounds, reg_gamma=1e-8, reg_residual=0.0, max_solves=60)
    assert plan.gammas[1:] == [1.0, 1.0] and bounds[0] <= plan.gammas[0] <= bounds[1]
    assert plan.gammas[0] == pytest.approx(expected, abs=2e-3)
    assert torch.equal(plan.sigmas, base.sigmas) and info["solves"] <= 60


def test_closed_form_gammas_are_clipped_at_the_upper_bound():
    """Unclipped, the Gaussian closed form of this plan is (0.9997, 0.958, 0.603): with bounds (0.5, 0.99) the
    first step's gamma is the upper bound, and the next steps, inside the bounds, make up for it."""
    plan = SamplingPlan("euler", [80.0, 5.0, 0.4, 0.03, 0.0], "custom")
    noise = prior_noise((16, 4), 80.0, seed=0, dtype=torch.float64)
    ref = exact_reference(noise, 80.0, 0.002)
    free = closed_form_gammas(gaussian_denoiser, noise, plan, ref, gamma_bounds=(-10, 10), plain_tail=1)
    assert free[0] > 0.99 and 0.9 < free[1] < 0.99 and 0.55 < free[2] < 0.65
    g = closed_form_gammas(gaussian_denoiser, noise, plan, ref, gamma_bounds=(0.5, 0.99), plain_tail=1)
    assert g[0] == 0.99 and free[1] < g[1] < 0.99 and g[2] == pytest.approx(free[2], rel=1e-9) and g[3] == 1.0


def test_closed_form_gammas_in_vp_coordinates():
    """In VP coordinates (x_c = alpha x), Eq. (1) for the Gaussian: u = (a - a' c_T) x and x_c - a' x* =
    (a - a' c) x, so gamma = (a - a' c) / (a - a' c_T), and the corrected step lands on the ODE solution."""
    sig = [80.0, 5.0, 0.4, 0.03, 0.0]
    plan = SamplingPlan("euler", sig, "custom", coords="vp")
    noise = prior_noise((32, 4), 80.0, seed=0, dtype=torch.float64)
    ref = exact_reference(noise, 80.0, 0.002, steps=2000)
    g = closed_form_gammas(gaussian_denoiser, noise, plan, ref, gamma_bounds=(-10, 10), plain_tail=1)
    for k in range(len(sig) - 2):
        s, t = sig[k], sig[k + 1]
        a, a_next = 1 / math.sqrt(1 + s**2), 1 / math.sqrt(1 + t**2)
        d = S**2 / (S**2 + s**2)
        c_T = d + (t / s) * (1 - d)
        c = math.sqrt(S**2 + t**2) / math.sqrt(S**2 + s**2)
        assert g[k] == pytest.approx((a - a_next * c) / (a - a_next * c_T), rel=1e-4)
    assert abs(g[0] - closed_form_gammas(gaussian_denoiser, noise, SamplingPlan("euler", sig, "custom"), ref,
                                         gamma_bounds=(-10, 10), plain_tail=1)[0]) > 1e-3


def test_params_last_level_floor_and_bounds():
    """The last noise level can come down to 0.9 sigma_floor (below the base's last level when sigma_floor is
    below it), never lower; each log-gap stays within e of its share, the slack may reach exp(-0.5)."""
    base = make_plan(VEProcess(), "dpmpp_2m", 6, "karras")
    last = float(base.sigmas[-2])
    for floor, expected in ((0.002, 0.9 * 0.002), (0.001, 0.9 * 0.001), (0.01, 0.9 * last)):
        p = _Params(base, "both", floor, [1.0] * base.steps)
        theta = p.initial()
        theta[p.ng:] = 0.0
        theta[-1] = -60.0  # no slack: the last level sits on the floor
        sig, _ = p.decode(theta)
        assert float(sig[-2]) == pytest.approx(expected, rel=1e-12)
        assert float(sig[0]) == 80.0 and float(sig[-1]) == 0.0
    p = _Params(base, "both", 0.002, [1.0] * base.steps)
    lo, hi = p.bounds((0.6, 1.4))
    ng = p.ng
    assert ng == base.steps - 2 and lo[:ng].tolist() == [0.6] * ng and hi[:ng].tolist() == [1.4] * ng
    np.testing.assert_allclose(lo[ng:], p.z0 - 1.0, rtol=0, atol=1e-15)
    np.testing.assert_allclose(hi[ng:-1], p.z0[:-1] + 1.0, rtol=0, atol=1e-15)
    assert hi[-1] == max(p.z0[-1] + 1.0, -0.5)
    assert math.exp(p.z0[-1]) == pytest.approx(math.log(1 / 0.9) / p.L, rel=1e-12)  # the base's slack share
    gam = _Params(base, "gamma", 0.002, [1.1] * base.steps)
    assert gam.initial().tolist() == [1.1] * ng and torch.equal(gam.decode(gam.initial())[0], base.sigmas)
    steps_only = _Params(base, "steps", 0.002, [1.1] * base.steps)
    assert steps_only.decode(steps_only.initial())[1] == [1.1] * base.steps


def test_refine_objective_is_the_normalised_distance_plus_residual_and_gamma_terms():
    """At the starting theta (one solve): ||x - t||^2 / ||x_plain - t||^2 + reg_residual log(R(x) / R(t))^2 +
    reg_gamma sum (gamma - 1)^2, with R(y) = ||D(y, sigma_floor) - y|| (toy2d's exact denoiser)."""
    from steindiff.trajectory import refine

    gmm = get_gmm("gmm:toy2d")
    base = SamplingPlan("euler", [80.0, 3.0, 0.6, 0.0], "custom")
    noise = prior_noise((16, 2), 80.0, seed=4, dtype=torch.float64)
    x_plain = sample(gmm, noise, base.sigmas, "euler").x
    target = 1.05 * x_plain + 0.01
    g0 = [1.2, 1.0, 1.0]
    plan, info = refine(gmm, noise, target, base, g0, fit="gamma", sigma_floor=0.01, reg_gamma=0.3, reg_residual=2.0,
                        max_solves=1)
    assert plan.gammas == g0 and info["solves"] == 1

    def R(y, s=0.01):
        return float((gmm(y, torch.full((16,), s, dtype=torch.float64)) - y).pow(2).sum().sqrt())

    x = sample(gmm, noise, base.sigmas, "euler",
               stabilizer=SamplingPlan("euler", base.sigmas, "custom", g0).stabilizer()).x
    expected = float((x - target).pow(2).sum() / (x_plain - target).pow(2).sum()) \
        + 2.0 * math.log(R(x) / R(target)) ** 2 + 0.3 * 0.2**2
    assert info["objective"] == pytest.approx(expected, rel=1e-9)
    assert abs(math.log(R(x, 0.6) / R(target, 0.6)) ** 2 - math.log(R(x) / R(target)) ** 2) > 1e-3


def test_fit_keeps_every_candidate_within_the_default_gamma_bounds():
    """A reference whose final samples need gamma 3 at the first step (3 steps, plain tail 2): by default the
    refinement on the distance alone stops at the upper bound 1.5, and the record says which bounds applied."""
    base = SamplingPlan("euler", [80.0, 2.0, 0.05, 0.0], "karras")
    noise = prior_noise((16, 3), 80.0, seed=5, dtype=torch.float64)
    far = sample(gaussian_denoiser, noise, base.sigmas, "euler",
                 stabilizer=SamplingPlan("euler", base.sigmas, "custom", [3.0, 1.0, 1.0]).stabilizer()).x
    exact = exact_reference(noise, 80.0, 0.002)
    ref = ReferenceSolve(exact.sigmas, exact.states, far, "far", 400, 0.0, 0.0)
    rec = fit_trajectory(gaussian_denoiser, base, noise, sigma_min=0.002, ref=ref, fit="gamma", max_solves=80,
                         reg_gamma=1e-8).record
    assert rec["gamma_bounds"] == [0.5, 1.5]
    assert rec["candidates"]["refined"]["gammas"][0] == pytest.approx(1.5, abs=2e-3)  # on the distance alone
    assert all(0.5 <= g <= 1.5 for c in rec["candidates"].values() for g in c["gammas"])


def test_reference_solve_is_dpmpp_2m_on_uniform_log_snr_steps_with_its_convergence():
    gmm = get_gmm("gmm:toy2d")
    noise = prior_noise((12, 2), 80.0, seed=6, dtype=torch.float64)
    ref = reference_solve(gmm, noise, 80.0, 0.01, steps=12, keep=5)
    sig = logsnr_sigmas(12, 0.01, 80.0)
    assert torch.equal(ref.sigmas, sig) and ref.solver == "dpmpp_2m" and ref.steps == 12
    fine, half = (sample(gmm, noise, logsnr_sigmas(k, 0.01, 80.0), "dpmpp_2m").x for k in (12, 6))
    torch.testing.assert_close(ref.final, fine, rtol=0, atol=0)
    assert ref.states.shape == (13, 5, 2) and torch.equal(ref.states[-1], fine[:5]) and torch.equal(ref.states[0],
                                                                                                    noise[:5])
    assert ref.convergence == pytest.approx(float((half - fine).pow(2).mean().sqrt()), rel=1e-12)


def test_params_step_penalty_and_the_refined_schedule_name():
    """penalty: sqrt(reg) (gamma - 1) and sqrt(reg) (log sigma - log sigma_base) per fitted value."""
    from steindiff.trajectory import refine

    base = make_plan(VEProcess(), "euler", 5, "karras")
    p = _Params(base, "both", 0.002, [1.0] * base.steps)
    theta = p.initial()
    theta[0] = 1.3
    theta[p.ng + 1] += 0.4
    sig, g = p.decode(theta)
    pen = p.penalty(theta, 0.04, 0.09)
    np.testing.assert_allclose(pen[: p.ng], 0.2 * (np.asarray(g[: p.ng]) - 1), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(pen[p.ng:], 0.3 * (np.log(sig[1:-1].numpy()) - np.log(base.sigmas[1:-1].numpy())),
                               rtol=1e-12, atol=1e-15)
    assert abs(pen[p.ng:]).max() > 0.01
    noise = prior_noise((8, 3), 80.0, seed=7, dtype=torch.float64)
    target = 0.9 * sample(gaussian_denoiser, noise, base.sigmas, "euler").x
    for fit, schedule in (("both", "fitted"), ("steps", "fitted"), ("gamma", "karras")):
        plan, _ = refine(gaussian_denoiser, noise, target, base, [1.0] * base.steps, fit=fit, sigma_floor=0.002,
                         max_solves=3)
        assert plan.schedule == schedule


def test_fit_splits_per_sample_extra_args_with_the_batch():
    """A class-conditional model (a shift per label): the fit and validation parts get their own labels."""
    means = torch.tensor([[2.0, 0.0, 0.0], [-1.0, 1.0, 0.5]], dtype=torch.float64)

    def model(x, sigma, y):
        w = (S**2 / (S**2 + sigma**2)).reshape(-1, 1)
        return w * x + (1 - w) * means[y]

    base = make_plan(VEProcess(), "euler", 4, "karras")
    noise = prior_noise((12, 3), 80.0, seed=8, dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 1])  # the validation half's labels differ from the fit half's
    labels = {"y": y}
    ref = reference_solve(model, noise, 80.0, 0.002, steps=16, keep=6, extra_args=labels)
    rec = fit_trajectory(model, base, noise, sigma_min=0.002, ref=ref, fit="gamma", max_solves=4,
                         extra_args=labels).record
    plain_val = sample(model, noise[6:], base.sigmas, "euler", extra_args={"y": y[6:]}).x
    from steindiff.trajectory import _rms

    assert rec["candidates"]["plain"]["val_rms"] == pytest.approx(_rms(plain_val, ref.final[6:]), rel=1e-12)
    assert rec["candidates"]["plain"]["residual_noise"] == pytest.approx(
        residual_noise(model, plain_val, 0.002, {"y": y[6:]}), rel=1e-12)


def _mixed_gains_case(n_better: int):
    """40 samples of |x| 0.5 to 2; the reference at (0.6 +- 0.05) x, so that the gain in squared distance of the
    candidate (gamma 0.6: 0.7 x) over plain (0.5 x) is +-0.02 x^2: positive on ``n_better`` samples."""
    x = torch.linspace(0.5, 2.0, 40, dtype=torch.float64)[:, None]
    e = torch.full((40, 1), -0.05, dtype=torch.float64)
    e[torch.linspace(0, 39, n_better).round().long()] = 0.05
    return x, (0.6 + e) * x


@pytest.mark.parametrize("n_better,passes", [(26, False), (29, True)])
def test_the_default_significance_threshold_is_a_z_of_two(n_better, passes):
    """By default a candidate must beat plain with a Wilcoxon z above 2: z = 1.65 (26 of 40 samples closer) is
    within the validation noise and keeps the plain plan; z = 2.49 (29 of 40) replaces it."""
    from steindiff.trajectory import choose_candidate, score_candidates, validate_candidates

    x, ref = _mixed_gains_case(n_better)
    d_plain, d_cand = (0.5 * x - ref).pow(2).mean(1), (0.7 * x - ref).pow(2).mean(1)
    z = wilcoxon_z(d_plain, d_cand)
    assert (1.5 < z < 1.8) if not passes else (2.3 < z < 2.7)
    cands = {"plain": one_step(1.0), "damped": one_step(0.6)}
    sc = score_candidates(halve, cands, x, ref, sigma_min=0.002, ref_residual=1.0)
    assert sc["damped"]["val_rank_z"] == pytest.approx(z, rel=1e-9)
    assert sc["damped"]["val_rms"] < sc["plain"]["val_rms"]  # closer on the mean either way
    assert sc["damped"]["passed_significance_check"] is passes
    assert choose_candidate(sc, ("significance",)) == ("damped" if passes else "plain")
    # the validation step of every fit method has the same default
    noise = torch.cat([x, x])  # the fit part, then the validation part
    ref_solve = ReferenceSolve(torch.tensor([1.0, 0.0], dtype=torch.float64), torch.zeros(2, 40, 1),
                               torch.cat([ref, ref]), "given", 1, 0.0, 0.0)
    from steindiff.trajectory import CalibrationBatch

    rec = validate_candidates(halve, CalibrationBatch(noise, ref_solve, 40), cands, sigma_min=0.002,
                              guards=("significance",))
    assert rec["significance"] == 2.0 and rec["chosen"] == ("damped" if passes else "plain")
    chosen = rec["candidates"][rec["chosen"]]["val_rms"]
    assert rec["val_ratio"] == pytest.approx(chosen / rec["candidates"]["plain"]["val_rms"], rel=1e-12)
    assert (rec["val_ratio"] < 1) is passes and (rec["n_fit"], rec["n_val"]) == (40, 40)


def test_fit_defaults_and_the_budget_split_between_the_two_refinements(monkeypatch):
    """fit_trajectory's documented defaults, as recorded, and what each refinement is given: half the solves and
    half the seconds (a calibration stays within max_solves and max_seconds), the bounds, the floor, the fit mode,
    one refinement on the distance alone and one with the residual-noise term."""
    import steindiff.trajectory as T

    calls = []

    def fake_refine(model, x, target, base, start, **kw):
        calls.append(kw)
        return SamplingPlan(base.solver, base.sigmas, base.schedule, list(start)), {"solves": 0}

    monkeypatch.setattr(T, "refine", fake_refine)
    base = make_plan(VEProcess(), "euler", 4, "karras")
    noise = prior_noise((8, 3), 80.0, seed=1, dtype=torch.float64)
    rec = fit_trajectory(gaussian_denoiser, base, noise, sigma_min=0.002).record
    assert (rec["n_fit"], rec["n_val"]) == (4, 4)
    assert rec["reference"]["solver"] == "dpmpp_2m" and rec["reference"]["steps"] == 200
    assert rec["gamma_bounds"] == [0.5, 1.5] and rec["plain_tail"] == 2
    assert (rec["reg_gamma"], rec["reg_steps"], rec["reg_residual"]) == (1e-2, 1e-3, 2.0)
    assert (rec["residual_tolerance"], rec["significance"]) == (1.05, 2.0)
    assert rec["guards"] == ["distribution", "significance"] and rec["fit"] == "both"
    assert [c["reg_residual"] for c in calls] == [0.0, 2.0]
    for c in calls:
        assert (c["max_solves"], c["max_seconds"]) == (100, 30.0)
        assert tuple(c["gamma_bounds"]) == (0.5, 1.5) and c["sigma_floor"] == 0.002 and c["fit"] == "both"
        assert c["plain_tail"] == 2 and (c["reg_gamma"], c["reg_steps"]) == (1e-2, 1e-3)
    calls.clear()
    fit_trajectory(gaussian_denoiser, base, noise, sigma_min=0.01, fit="gamma", max_solves=7, max_seconds=10.0,
                   gamma_bounds=(0.7, 1.2), plain_tail=1, reg_residual=0.5)
    assert [(c["max_solves"], c["max_seconds"], c["reg_residual"]) for c in calls] == [(3, 5.0, 0.0), (3, 5.0, 0.5)]
    assert all(tuple(c["gamma_bounds"]) == (0.7, 1.2) and c["sigma_floor"] == 0.01 and c["fit"] == "gamma"
               and c["plain_tail"] == 1 for c in calls)


def test_a_closed_form_that_is_not_finite_keeps_gamma_one():
    """Where the reference at a step's next level is not finite the coefficient is undefined: gamma 1 there,
    not a bound; the other steps are unaffected."""
    plan = SamplingPlan("euler", [80.0, 5.0, 0.4, 0.03, 0.0], "custom")
    noise = prior_noise((8, 4), 80.0, seed=0, dtype=torch.float64)
    ref = exact_reference(noise, 80.0, 0.002)
    good = closed_form_gammas(gaussian_denoiser, noise, plan, ref, gamma_bounds=(0.5, 1.5), plain_tail=1)
    states = ref.states.clone()
    near = (ref.sigmas - 0.4).abs() < 0.05  # the levels around 0.4: the second step's target
    states[near] = math.inf
    bad = closed_form_gammas(gaussian_denoiser, noise, plan, ReferenceSolve(ref.sigmas, states, ref.final, "inf",
                                                                            ref.steps, 0.0, 0.0),
                             gamma_bounds=(0.5, 1.5), plain_tail=1)
    assert bad[1] == 1.0 != good[1] and bad[0] == good[0]


def test_validation_distances_are_rms_per_coordinate_and_per_sample():
    """val_rms: RMS over every coordinate of every validation sample; val_max: the farthest sample's RMS over its
    coordinates (3 coordinates here, so per coordinate and per sample differ)."""
    from steindiff.trajectory import score_candidates

    x = torch.linspace(-2.0, 3.0, 30, dtype=torch.float64).reshape(10, 3)
    ref = 0.55 * x + 0.01 * torch.arange(30, dtype=torch.float64).reshape(10, 3)
    sc = score_candidates(halve, {"plain": one_step(1.0), "damped": one_step(0.8)}, x, ref, sigma_min=0.002,
                          ref_residual=1.0)
    for name, c in (("plain", 0.5), ("damped", 0.6)):
        diff = c * x - ref
        assert sc[name]["val_rms"] == pytest.approx(float(diff.pow(2).mean().sqrt()), rel=1e-12)
        assert sc[name]["val_max"] == pytest.approx(float(diff.pow(2).mean(1).sqrt().max()), rel=1e-12)


def test_a_reference_solve_of_other_noise_is_refused():
    """A reference given to the fit must be of the same batch: its final samples one per sample, its states those
    of the fit part at least."""
    from steindiff.trajectory import calibration_batch

    base = make_plan(VEProcess(), "euler", 4, "karras")
    noise = prior_noise((10, 3), 80.0, seed=1, dtype=torch.float64)
    ref = exact_reference(noise, 80.0, 0.002, steps=20)
    assert calibration_batch(gaussian_denoiser, base, noise, sigma_min=0.002, ref=ref).n_fit == 5
    short = ReferenceSolve(ref.sigmas, ref.states, ref.final[:8], "exact", 20, 0.0, 0.0)
    few_states = ReferenceSolve(ref.sigmas, ref.states[:, :4], ref.final, "exact", 20, 0.0, 0.0)
    for bad in (short, few_states):
        with pytest.raises(ValueError, match="does not match the calibration batch"):
            calibration_batch(gaussian_denoiser, base, noise, sigma_min=0.002, ref=bad)
    calibration_batch(gaussian_denoiser, base, noise, sigma_min=0.002, ref=few_states, keep_states=False)
