"""The data-free candidate checks (steindiff.guards) against closed forms and exact likelihoods, and as
score_candidates records them."""

import math

import pytest
import torch

from steindiff.guards import CHECKS, diffusion_loss, judge, sample_stats, statistics
from steindiff.metrics import nll_per_dim
from steindiff.models.gmm import get_gmm
from steindiff.plan import SamplingPlan
from steindiff.sampling import prior_noise
from steindiff.trajectory import choose_candidate, score_candidates

S = 0.5


def gaussian_denoiser(x, sigma):
    s2 = sigma.reshape(-1, *([1] * (x.ndim - 1))) ** 2
    return S**2 / (S**2 + s2) * x


def expected_loss(m2, lo, hi):
    """E over eps of the diffusion loss of a point with |x|^2 / d = m2 under N(0, S^2 I) data:
    int_lo^hi [m2 sigma^2 / (S^2 + sigma^2)^2 + S^4 / (S^2 + sigma^2)^2] dlog sigma, in closed form."""
    def first(s):  # int sigma / (S^2 + sigma^2)^2 dsigma
        return -0.5 / (S**2 + s**2)

    def second(s):  # int S^4 / (sigma (S^2 + sigma^2)^2) dsigma
        u = s**2
        return 0.5 * (math.log(u / (S**2 + u)) + S**2 / (S**2 + u))

    return m2 * (first(hi) - first(lo)) + second(hi) - second(lo)


def test_diffusion_loss_is_the_closed_form_for_gaussian_data():
    x = torch.randn(4000, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.7
    m2 = x.pow(2).mean(1)
    want = torch.tensor([expected_loss(float(v), 0.002, 80.0) for v in m2])
    got = diffusion_loss(gaussian_denoiser, x, 0.002, 80.0, levels=128)
    assert float(got.mean()) == pytest.approx(float(want.mean()), rel=0.01)
    # the same noise for sets of one shape: a set and itself score the same
    assert torch.equal(got, diffusion_loss(gaussian_denoiser, x, 0.002, 80.0, levels=128))


def test_diffusion_loss_follows_the_exact_likelihood_of_a_mixture():
    """With the exact denoiser the loss bounds the NLL: added noise raises both by the same amount per dim."""
    gmm = get_gmm("gmm:image64")
    x = gmm.sample(400, seed=1)
    base = diffusion_loss(gmm, x, 0.002, 80.0).mean()
    for tau in (0.03, 0.1):
        y = x + tau * torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=x.dtype)
        d_loss = float(diffusion_loss(gmm, y, 0.002, 80.0).mean() - base)
        d_nll = nll_per_dim(y, gmm) - nll_per_dim(x, gmm)
        assert d_nll > 0.3 and d_loss == pytest.approx(d_nll, rel=0.15)


def test_statistics_see_noise_and_blur_on_images():
    g = torch.Generator().manual_seed(0)
    clean = torch.nn.functional.avg_pool2d(torch.randn(64, 3, 16, 16, generator=g), 3, 1, 1)
    noisy = clean + 0.2 * torch.randn(clean.shape, generator=g)
    blurred = torch.nn.functional.avg_pool2d(clean, 3, 1, 1)
    ident = lambda x, s: x  # noqa: E731  (a denoiser that leaves every sample where it is)
    ref = sample_stats(ident, clean, 0.002)
    assert statistics(sample_stats(ident, noisy, 0.002), ref)["spectrum"] > 0.1
    assert statistics(sample_stats(ident, blurred, 0.002), ref)["spectrum"] < -0.1
    assert statistics(ref, ref)["spectrum"] == 0.0
    flat = sample_stats(ident, clean.reshape(64, -1), 0.002)  # not images: the spectrum check does not apply
    assert flat.spectrum is None and statistics(flat, flat)["spectrum"] is None


@pytest.mark.parametrize("check, cand, plain, tol, margin, ok", [
    ("residual", 0.04, 0.0, 0.05, 0.0, True), ("residual", -0.06, 0.0, 0.05, 0.0, False),
    ("residual", 0.3, -0.4, 0.05, 0.0, True), ("residual", 0.7, -0.4, 0.05, 0.0, False),
    ("residual", 0.7, -0.4, 0.05, 1.0, True), ("residual", -0.81, -0.4, 0.05, 1.0, False),
    ("elbo", 0.2, 0.1, 0.05, 0.0, False), ("elbo", -0.05, 0.1, 0.05, 0.0, True), ("elbo", 0.2, 0.1, 0.05, 1.0, True),
    ("spectrum", None, None, 0.05, 0.0, True), ("spectrum", None, 0.1, 0.05, 0.0, False),
    ("denoised", 0.105, 0.1, 0.0, 0.0, False), ("denoised", 0.1, 0.1, 0.0, 0.0, True),
    ("modes", 0.16, 0.1, 0.05, 0.0, False), ("modes", 0.14, 0.1, 0.05, 0.0, True),
    ("elbo", float("nan"), 0.1, 0.05, 0.0, False),
    # denoised: a relative tolerance (2.0 * 1.1 = 2.2); modes: an absolute one (2.0 + 0.1 = 2.1)
    ("denoised", 2.15, 2.0, 0.1, 0.0, True), ("denoised", 2.25, 2.0, 0.1, 0.0, False),
    ("modes", 2.15, 2.0, 0.1, 0.0, False), ("modes", 2.05, 2.0, 0.1, 0.0, True),
    # two-sided checks: a tolerance is a floor under the band, not added to it
    ("spectrum", -0.04, 0.01, 0.05, 0.0, True), ("spectrum", 0.06, 0.01, 0.05, 0.0, False),
    ("residual_tail", -0.3, 0.25, 0.05, 0.0, False), ("residual_tail", -0.25, 0.25, 0.05, 0.0, True),
])
def test_judge(check, cand, plain, tol, margin, ok):
    assert judge(check, cand, plain, tol, margin) is ok


def test_default_margins():
    """The residual and likelihood checks pass up to 1.2 times the plain solver's deviation (docs/guards.md)."""
    assert judge("residual", 1.19, 1.0) and not judge("residual", 1.21, 1.0)
    assert judge("elbo", -1.19, 1.0) and not judge("elbo", -1.21, 1.0)
    assert not judge("residual_tail", 1.01, 1.0)


def test_judge_rejects_an_unknown_check():
    with pytest.raises(ValueError, match="unknown check 'magic'"):
        judge("magic", 0.0, 0.0)


def test_score_candidates_records_every_check_and_rejects_residual_noise():
    """A candidate whose final step stops halfway to the data (gamma 0.5 on the last step) keeps noise: the
    residual and likelihood checks reject it, and every check is recorded for every candidate."""
    gmm = get_gmm("gmm:image64")
    noise = prior_noise((128, 64), 80.0, seed=5, dtype=torch.float64)
    sig = [80.0, 10.0, 2.0, 0.5, 0.1, 0.0]
    fine = SamplingPlan("dpmpp_2m", torch.cat([torch.logspace(math.log10(80), math.log10(0.002), 100,
                                                              dtype=torch.float64), torch.zeros(1)]))
    from steindiff.sampling import sample

    ref = sample(gmm, noise, fine.sigmas, "dpmpp_2m").x
    cands = {"plain": SamplingPlan("dpmpp_2m", sig), "noisy": SamplingPlan("dpmpp_2m", sig, gammas=[1.0] * 4 + [0.5])}
    scores = score_candidates(gmm, cands, noise, ref, sigma_min=0.002, checks=CHECKS)
    for v in scores.values():
        assert set(v["checks"]) >= set(CHECKS) and all(f"passed_{c}_check" in v for c in CHECKS)
    assert all(scores["plain"][f"passed_{c}_check"] for c in CHECKS)
    noisy = scores["noisy"]
    assert not noisy["passed_residual_check"] and not noisy["passed_elbo_check"]
    assert noisy["checks"]["elbo"] > abs(scores["plain"]["checks"]["elbo"]) + 0.1
    assert noisy["passed_spectrum_check"] and noisy["checks"]["spectrum"] is None  # not images
    # by default the likelihood check (16 model passes per candidate) is not measured, and cannot be chosen under
    cheap = score_candidates(gmm, cands, noise, ref, sigma_min=0.002)
    assert cheap["noisy"]["checks"]["elbo"] is None and "passed_elbo_check" not in cheap["noisy"]
    assert not cheap["noisy"]["passed_residual_check"]
    with pytest.raises(ValueError, match="without the elbo check"):
        choose_candidate(cheap, ("elbo",))
    with pytest.raises(ValueError, match="unknown check"):
        score_candidates(gmm, cands, noise, ref, sigma_min=0.002, checks=("magic",))


def test_choose_candidate_refuses_records_without_a_check():
    old = {"plain": {"val_rms": 1.0}, "refined": {"val_rms": 0.5, "passed_distribution_check": True}}
    with pytest.raises(ValueError, match="without the elbo check"):
        choose_candidate(old, ("distribution", "elbo"))


def test_statistics_are_the_documented_deviations_from_the_reference():
    """Each deviation written out: residual the ratio of the batch RMS (of per-sample RMS residuals) minus 1,
    residual_tail the ratio of 90th percentiles minus 1, denoised the sliced W2 of the denoised sets, modes the total
    variation of the histograms over the reference's clusters, spectrum log10 of the highest band's power ratio,
    elbo the difference of the mean losses."""
    from steindiff.guards import SampleStats, mode_histogram
    from steindiff.metrics import sliced_w2

    g = torch.Generator().manual_seed(0)
    r_ref = torch.linspace(0.5, 1.5, 20, dtype=torch.float64)
    r = torch.cat([torch.full((17,), 0.8, dtype=torch.float64), torch.tensor([3.0, 4.0, 5.0], dtype=torch.float64)])
    d_ref, d = torch.randn(20, 3, generator=g, dtype=torch.float64), torch.randn(20, 3, generator=g) + 0.5
    centroids = torch.tensor([[-5.0, 0, 0], [5.0, 0, 0], [0, 5.0, 0]], dtype=torch.float64)
    x_ref = torch.cat([centroids[i].expand(n, 3) for i, n in ((0, 10), (1, 6), (2, 4))])
    x = torch.cat([centroids[i].expand(n, 3) for i, n in ((0, 4), (1, 10), (2, 6))])
    ref = SampleStats(r_ref, d_ref, x_ref, torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64),
                      torch.full((20,), 0.3, dtype=torch.float64), centroids)
    cand = SampleStats(r, d, x, torch.tensor([1.0, 2.0, 2.0], dtype=torch.float64),
                       torch.linspace(0.0, 1.0, 20, dtype=torch.float64))
    s = statistics(cand, ref)
    rms = float(r.pow(2).mean().sqrt())
    assert s["residual"] == pytest.approx(rms / float(r_ref.pow(2).mean().sqrt()) - 1, rel=1e-12)
    assert s["residual_value"] == pytest.approx(rms, rel=1e-12)
    q = float(torch.quantile(r, 0.9)) / float(torch.quantile(r_ref, 0.9))
    assert q > 1.5 and s["residual_tail"] == pytest.approx(q - 1, rel=1e-12)  # the noisy few, the mean hides them
    assert s["denoised"] == pytest.approx(sliced_w2(d, d_ref), rel=1e-12) and s["denoised"] > 0
    assert mode_histogram(x, centroids).tolist() == [0.2, 0.5, 0.3]
    assert s["modes"] == pytest.approx(0.5 * (0.3 + 0.2 + 0.1), rel=1e-12)
    assert s["spectrum"] == pytest.approx(math.log10(0.5), rel=1e-12)
    assert s["elbo"] == pytest.approx(0.5 - 0.3, rel=1e-12) and s["elbo_value"] == pytest.approx(0.5, rel=1e-12)
    same = statistics(ref, ref)
    assert same["residual"] == same["residual_tail"] == same["modes"] == same["spectrum"] == same["elbo"] == 0.0
    # without clusters given, the modes check makes them from the reference's samples (k-means, MODES clusters)
    from steindiff.guards import MODES, kmeans

    spread = torch.randn(40, 3, generator=g, dtype=torch.float64) * torch.tensor([4.0, 1.0, 0.2], dtype=torch.float64)
    other = torch.randn(40, 3, generator=g, dtype=torch.float64) + 3.0
    bare = SampleStats(r_ref.repeat(2), d_ref.repeat(2, 1), spread)
    got = statistics(SampleStats(r.repeat(2), d.repeat(2, 1), other), bare)["modes"]
    c = kmeans(spread, MODES)
    assert torch.equal(bare.centroids, c)
    assert got == pytest.approx(float(0.5 * (mode_histogram(other, c) - mode_histogram(spread, c)).abs().sum()))
