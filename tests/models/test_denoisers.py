"""VPDenoiser (epsilon / v / x0 / score networks on a VP process) and EDM preconditioning.

Each VP network is built from the exact Gaussian-mixture marginal straight from its definition
(Ho et al. 2020; Salimans & Ho 2022; the score by autograd of the VP log-density), so recovering the
exact denoiser checks the adapter's algebra independently.
"""

from __future__ import annotations

import math

import pytest
import torch

from steindiff import ContinuousVPProcess, DiscreteVPProcess
from steindiff.models import EDMPrecond, VPDenoiser, get_gmm

GMM = get_gmm("gmm:toy2d")


def vp_quantities(x_vp: torch.Tensor, t: torch.Tensor, process):
    """sigma (VE), alpha, sigma_vp, x_ve and exact x0 = E[x0 | x] at the network's input."""
    sigma = process.t_to_sigma(t.to(torch.float64))
    s = sigma.reshape(-1, 1)
    alpha = torch.rsqrt(1 + s**2)
    x = x_vp / alpha
    return sigma, alpha, alpha * s, x, GMM.denoise(x, sigma)


def make_net(prediction: str, process):
    if prediction == "epsilon":
        return GMM.epsilon_net(process)

    def net(x_vp, t):
        sigma, alpha, sigma_vp, x, x0 = vp_quantities(x_vp, t, process)
        eps = (x_vp - alpha * x0) / sigma_vp  # x_vp = alpha x0 + sigma_vp eps
        if prediction == "v":
            return alpha * eps - sigma_vp * x0  # Salimans & Ho 2022, Sec. 4
        if prediction == "x0":
            return x0
        # score of the VP marginal p_vp(x_vp) = p_ve(x_vp / alpha) / alpha^d, by autograd
        xv = x_vp.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            logp = GMM.log_prob(xv / alpha, sigma).sum()
            (g,) = torch.autograd.grad(logp, xv)
        return g

    return net


def points(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    sigma = torch.exp(torch.empty(n, dtype=torch.float64).uniform_(math.log(0.02), math.log(50.0), generator=g))
    x0 = GMM.sample(n, seed=seed)
    x = x0 + sigma[:, None] * torch.randn(n, 2, generator=g, dtype=torch.float64)
    return x, sigma


@pytest.mark.parametrize("prediction", ["epsilon", "v", "x0", "score"])
@pytest.mark.parametrize("proc", ["discrete", "continuous"])
def test_vp_denoiser_recovers_exact_denoiser(prediction, proc):
    process = DiscreteVPProcess() if proc == "discrete" else ContinuousVPProcess("linear")
    D = VPDenoiser(make_net(prediction, process), process, prediction)
    x, sigma = points()
    sigma = sigma.clamp(process.sigma_min * 1.01, process.sigma_max * 0.99)
    out = D(x, sigma)
    torch.testing.assert_close(out, GMM.denoise(x, sigma), rtol=1e-7, atol=1e-9)


def test_vp_denoiser_score_matches_tweedie_in_ve():
    """Independent check of the score branch: a VP score from the mixture's own VE score."""
    process = DiscreteVPProcess()

    def score_net(x_vp, t):
        sigma = process.t_to_sigma(t.to(torch.float64))
        alpha = torch.rsqrt(1 + sigma**2).reshape(-1, 1)
        return GMM.score(x_vp / alpha, sigma) / alpha

    x, sigma = points(seed=3)
    out = VPDenoiser(score_net, process, "score")(x, sigma)
    torch.testing.assert_close(out, x + sigma[:, None] ** 2 * GMM.score(x, sigma), rtol=1e-7, atol=1e-9)


def test_vp_denoiser_timestep_and_input():
    """The network sees x_vp = x / sqrt(1 + sigma^2) and the (fractional or rounded) timestep."""
    process = DiscreteVPProcess()
    seen = {}

    def net(x_vp, t):
        seen["x_vp"], seen["t"] = x_vp, t
        return torch.zeros_like(x_vp)

    sigma = process.t_to_sigma(torch.tensor([10.0, 123.4, 987.6], dtype=torch.float64))
    x = torch.randn(3, 2, dtype=torch.float64)
    VPDenoiser(net, process, "epsilon")(x, sigma)
    torch.testing.assert_close(seen["x_vp"], x / (1 + sigma[:, None] ** 2).sqrt())
    torch.testing.assert_close(seen["t"], torch.tensor([10.0, 123.4, 987.6], dtype=torch.float64))
    VPDenoiser(net, process, "epsilon", timestep="round")(x, sigma)
    assert seen["t"].tolist() == [10.0, 123.0, 988.0]


def test_vp_denoiser_rejects_bad_options_and_shapes():
    process = DiscreteVPProcess()
    with pytest.raises(ValueError, match="prediction"):
        VPDenoiser(lambda x, t: x, process, "noise")
    D = VPDenoiser(lambda x, t: x[:, :1], process, "epsilon")
    with pytest.raises(ValueError, match=r"\(4, 1\).*\(4, 2\)"):
        D(torch.zeros(4, 2), torch.ones(4))


@pytest.mark.parametrize("sigma_data", [0.5, 1.0])
def test_edm_precond_coefficients_table1(sigma_data):
    """Karras et al. 2022, Table 1 ("Network and preconditioning"), computed with ``math``."""
    sigmas = [0.002, 0.05, 0.5, 1.0, 7.3, 80.0]
    pre = EDMPrecond(lambda x, c: x, sigma_data=sigma_data)
    c_skip, c_out, c_in, c_noise = pre.coefficients(torch.tensor(sigmas, dtype=torch.float64))
    for k, s in enumerate(sigmas):
        sd = sigma_data
        assert math.isclose(c_skip[k], sd**2 / (s**2 + sd**2), rel_tol=1e-12)
        assert math.isclose(c_out[k], s * sd / math.sqrt(sd**2 + s**2), rel_tol=1e-12)
        assert math.isclose(c_in[k], 1 / math.sqrt(s**2 + sd**2), rel_tol=1e-12)
        assert math.isclose(c_noise[k], 0.25 * math.log(s), rel_tol=1e-12, abs_tol=1e-15)
        # the EDM design targets: unit-variance input and effective training target (Eqs. 8, 114-117)
        assert math.isclose(c_in[k] ** 2 * (sd**2 + s**2), 1.0, rel_tol=1e-12)


def test_edm_precond_forward_and_exact_net():
    sd = 0.5
    seen = {}

    def net(x_in, c_noise):
        seen["x_in"], seen["c_noise"] = x_in, c_noise
        return torch.sin(x_in) + c_noise[:, None]

    pre = EDMPrecond(net, sigma_data=sd)
    x = torch.randn(5, 2, dtype=torch.float64)
    sigma = torch.tensor([0.01, 0.3, 1.0, 5.0, 60.0], dtype=torch.float64)
    out = pre(x, sigma)
    s = sigma[:, None]
    c_in = 1 / (s**2 + sd**2).sqrt()
    expected = sd**2 / (s**2 + sd**2) * x + s * sd / (s**2 + sd**2).sqrt() * (torch.sin(c_in * x) + torch.log(s) / 4)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(seen["x_in"], c_in * x)
    torch.testing.assert_close(seen["c_noise"], torch.log(sigma) / 4)

    # the ideal F = (D - c_skip x) / c_out, fed through EDMPrecond, gives back the exact denoiser
    def ideal(x_in, c_noise):
        sig = torch.exp(4 * c_noise)[:, None]
        xx = x_in * (sig**2 + sd**2).sqrt()
        return (GMM.denoise(xx, sig.reshape(-1)) - sd**2 / (sig**2 + sd**2) * xx) / (sig * sd / (sig**2 + sd**2).sqrt())

    x, sig = points(seed=5)
    torch.testing.assert_close(EDMPrecond(ideal, sd)(x, sig), GMM.denoise(x, sig), rtol=1e-9, atol=1e-9)
