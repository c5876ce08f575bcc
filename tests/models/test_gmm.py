"""Exact Gaussian mixtures against independent references: torch.distributions densities,
autograd scores and Jacobian traces, and Monte Carlo moments."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Categorical, MixtureSameFamily, MultivariateNormal

from steindiff.models import GaussianMixture, get_gmm


def small_lowrank() -> GaussianMixture:
    g = torch.Generator().manual_seed(7)
    K, d, r = 3, 5, 2
    basis = torch.linalg.qr(torch.randn(K, d, r, generator=g, dtype=torch.float64))[0]
    lam = torch.rand(K, r, generator=g, dtype=torch.float64) + 0.2
    return GaussianMixture(torch.randn(K, d, generator=g, dtype=torch.float64),
                           torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64),
                           basis=basis, lam=lam, s2=torch.tensor([0.01, 0.04, 0.02], dtype=torch.float64))


def reference(gmm: GaussianMixture, sigma: float) -> MixtureSameFamily:
    """The noisy marginal built from dense covariances with torch.distributions."""
    covs = torch.einsum("kdr,kr,ker->kde", gmm.basis, gmm.lam, gmm.basis)
    covs = covs + (gmm.s2[:, None, None] + sigma**2) * torch.eye(gmm.dim, dtype=torch.float64)
    return MixtureSameFamily(Categorical(probs=gmm.weights), MultivariateNormal(gmm.means, covariance_matrix=covs))


MIXTURES = {"toy2d": lambda: get_gmm("gmm:toy2d"), "lowrank": small_lowrank, "image64": lambda: get_gmm("image64")}


@pytest.mark.parametrize("name", list(MIXTURES))
@pytest.mark.parametrize("sigma", [0.0, 0.05, 0.7, 12.0])
def test_log_prob_matches_dense_mixture(name, sigma):
    gmm = MIXTURES[name]()
    ref = reference(gmm, sigma)
    x = gmm.sample(32, sigma=sigma, seed=1)
    torch.testing.assert_close(gmm.log_prob(x, sigma), ref.log_prob(x), rtol=1e-10, atol=1e-9)


@pytest.mark.parametrize("name", ["toy2d", "lowrank"])
@pytest.mark.parametrize("sigma", [0.03, 0.5, 5.0])
def test_denoiser_is_tweedie_and_divergence_is_jacobian_trace(name, sigma):
    gmm = MIXTURES[name]()
    x = gmm.sample(16, sigma=sigma, seed=2)
    ref = reference(gmm, sigma)
    xr = x.clone().requires_grad_(True)
    (score,) = torch.autograd.grad(ref.log_prob(xr).sum(), xr)
    torch.testing.assert_close(gmm.score(x, sigma), score, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(gmm.denoise(x, sigma), x + sigma**2 * score, rtol=1e-8, atol=1e-10)
    jac = torch.func.vmap(torch.func.jacrev(lambda v: gmm.denoise(v[None], sigma)[0]))(x)
    torch.testing.assert_close(gmm.divergence(x, sigma), jac.diagonal(dim1=-2, dim2=-1).sum(-1), rtol=1e-8, atol=1e-9)


def test_per_sample_sigma():
    gmm = small_lowrank()
    x = gmm.sample(6, seed=3) + torch.randn(6, gmm.dim, dtype=torch.float64)
    sig = torch.tensor([0.01, 0.1, 0.3, 1.0, 3.0, 30.0], dtype=torch.float64)
    batched = gmm.denoise(x, sig)
    for i in range(6):
        torch.testing.assert_close(batched[i], gmm.denoise(x[i:i + 1], float(sig[i]))[0])


def test_sample_moments():
    gmm = small_lowrank()
    n = 200_000
    x, labels = gmm.sample(n, seed=4, return_labels=True)
    freq = torch.bincount(labels, minlength=gmm.K).double() / n
    assert torch.allclose(freq, gmm.weights, atol=5e-3)
    mean = (gmm.weights[:, None] * gmm.means).sum(0)
    assert torch.allclose(x.mean(0), mean, atol=1e-2)
    assert abs(float((x**2).mean()) - gmm.second_moment()) < 0.02 * gmm.second_moment()
    comp = reference(gmm, 0.0).component_distribution
    second = (gmm.weights[:, None,
                          None] * (comp.covariance_matrix + gmm.means[:, :, None] * gmm.means[:, None, :])).sum(0)
    torch.testing.assert_close(torch.cov(x.T), second - mean[:, None] * mean[None, :], atol=0.02, rtol=0)


def test_noisy_samples_have_added_variance():
    gmm = get_gmm("toy2d")
    a = gmm.sample(100_000, seed=5)
    b = gmm.sample(100_000, sigma=2.0, seed=5)
    assert abs(float(b.var(0).mean() - a.var(0).mean()) - 4.0) < 0.1


def test_from_covariances_reconstructs_covariance():
    g = torch.Generator().manual_seed(8)
    A = torch.randn(2, 3, 3, generator=g, dtype=torch.float64)
    covs = A @ A.transpose(1, 2) + 0.1 * torch.eye(3, dtype=torch.float64)
    gmm = GaussianMixture.from_covariances(torch.zeros(2, 3, dtype=torch.float64), covs)
    rebuilt = torch.einsum("kdr,kr,ker->kde", gmm.basis, gmm.lam, gmm.basis) + gmm.s2[:, None, None] * torch.eye(3)
    torch.testing.assert_close(rebuilt, covs)


def test_bad_inputs():
    with pytest.raises(ValueError, match="unknown mixture preset"):
        get_gmm("gmm:nope")
    with pytest.raises(ValueError, match="weights"):
        GaussianMixture(torch.zeros(2, 2), torch.tensor([0.7, 0.7]))
    with pytest.raises(ValueError, match="means"):
        GaussianMixture(torch.zeros(2))


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_mixture_moves_and_samples_the_same_anywhere(device):
    ref = get_gmm("gmm:image64")
    g = get_gmm("gmm:image64")
    assert g.to(device) is g and g.device.type == device
    x = ref.sample(50, sigma=0.5, seed=3)
    assert torch.equal(g.sample(50, sigma=0.5, seed=3).cpu(), x)  # drawn on the CPU, then moved
    xd = x.to(device)
    for f in ("denoise", "divergence", "log_prob", "score"):
        torch.testing.assert_close(getattr(g, f)(xd, 0.5).cpu(), getattr(ref, f)(x, 0.5), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(g.denoise(xd, torch.full((50,), 0.5, dtype=torch.float64, device=device)).cpu(),
                               ref.denoise(x, 0.5), rtol=1e-10, atol=1e-10)
    assert g.to("cpu").device.type == "cpu"


def test_input_on_another_device_is_named():
    g = get_gmm("gmm:toy2d").to("meta")
    with pytest.raises(ValueError, match="mixture is on meta but its input is on cpu"):
        g.denoise(torch.zeros(3, 2, dtype=torch.float64), 1.0)
