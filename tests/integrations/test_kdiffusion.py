"""k-diffusion-style sampler functions: equal to steindiff.sample, and k-diffusion's conventions."""

from __future__ import annotations

import math

import pytest
import torch

from steindiff import karras_sigmas, sample
from steindiff.integrations import kdiffusion as kd
from steindiff.models import get_gmm
from steindiff.stabilizers import SteinStabilizer

GMM = get_gmm("gmm:toy2d")
SIGMAS = karras_sigmas(6, 0.002, 80.0)


def noise(n=16, dtype=torch.float64):
    return torch.randn(n, 2, dtype=dtype, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name,solver",
                         [("sample_euler", "euler"), ("sample_heun", "heun"), ("sample_dpmpp_2m", "dpmpp_2m"),
                                         ("sample_dpmpp_3m", "dpmpp_3m"), ("sample_unipc", "unipc"),
                                         ("sample_ipndm", "ipndm")])
def test_equals_sample(name, solver):
    fn = getattr(kd, name)
    x = noise() * SIGMAS[0]  # the caller scales the noise, as in k-diffusion
    assert torch.equal(fn(GMM, x, SIGMAS, disable=True), sample(GMM, x, SIGMAS, solver).x)
    stab = lambda: SteinStabilizer(probes=2, seed=1)  # noqa: E731
    assert torch.equal(fn(GMM, x, SIGMAS, stabilizer=stab()), sample(GMM, x, SIGMAS, solver, stabilizer=stab()).x)


def test_solver_options_and_extra_args_pass_through():
    x = noise() * SIGMAS[0]
    assert torch.equal(kd.sample_ipndm(GMM, x, SIGMAS, order=2), sample(GMM, x, SIGMAS, "ipndm",
                                                                        solver_options={"order": 2}).x)
    assert torch.equal(kd.sample_unipc(GMM, x, SIGMAS, variant="bh1"), sample(GMM, x, SIGMAS, "unipc_bh1").x)
    seen = []

    def model(x, sigma, *, scale):
        seen.append(scale)
        return GMM(x, sigma) * scale

    kd.sample_euler(model, x, SIGMAS, extra_args={"scale": 0.5})
    assert seen == [0.5] * 6
    with pytest.raises(ValueError, match="s_churn"):
        kd.sample_euler(GMM, x, SIGMAS, s_churn=1.0)
    kd.sample_euler(GMM, x, SIGMAS, s_churn=0.0, s_noise=1.0)  # neutral values are accepted


# k-diffusion's own algorithms (k_diffusion/sampling.py, deterministic settings), for reference
def ref_euler(model, x, sigmas, callback):
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * x.new_ones(x.shape[0]))
        callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
    return x


def ref_heun(model, x, sigmas, callback):
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * x.new_ones(x.shape[0]))
        callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        d = (x - denoised) / sigmas[i]
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x2 = x + d * dt
            d2 = (x2 - model(x2, sigmas[i + 1] * x.new_ones(x.shape[0]))) / sigmas[i + 1]
            x = x + (d + d2) / 2 * dt
    return x


def ref_dpmpp_2m(model, x, sigmas, callback):
    t_fn = lambda s: s.log().neg()  # noqa: E731
    old = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * x.new_ones(x.shape[0]))
        callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        t, t_next = t_fn(sigmas[i]), t_fn(sigmas[i + 1])
        h = t_next - t
        if old is None or sigmas[i + 1] == 0:
            x = (sigmas[i + 1] / sigmas[i]) * x - (-h).expm1() * denoised
        else:
            r = (t - t_fn(sigmas[i - 1])) / h
            x = (sigmas[i + 1] / sigmas[i]) * x - (-h).expm1() * ((1 + 1 / (2 * r)) * denoised - old / (2 * r))
        old = denoised
    return x


@pytest.mark.parametrize("name,ref",
                         [("sample_euler", ref_euler), ("sample_heun", ref_heun), ("sample_dpmpp_2m", ref_dpmpp_2m)])
def test_matches_k_diffusion_algorithm_and_callback(name, ref):
    x = noise() * SIGMAS[0]
    want_cb, got_cb = [], []
    want = ref(GMM, x, SIGMAS, want_cb.append)
    got = getattr(kd, name)(GMM, x, SIGMAS, callback=got_cb.append, disable=True)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert len(got_cb) == len(want_cb) == len(SIGMAS) - 1
    for g, w in zip(got_cb, want_cb):
        assert set(g) == {"x", "i", "sigma", "sigma_hat", "denoised"}
        assert g["i"] == w["i"] and float(g["sigma"]) == float(w["sigma"]) == float(g["sigma_hat"])
        torch.testing.assert_close(g["x"], w["x"], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(g["denoised"], w["denoised"], rtol=1e-10, atol=1e-10)
    assert torch.equal(got_cb[0]["x"], x)  # the state before the first step, as k-diffusion reports it


def test_dtype_is_kept():
    x = (noise() * SIGMAS[0]).float()
    out = kd.sample_dpmpp_2m(lambda x, s: GMM(x.double(), s.double()).to(x.dtype), x, SIGMAS)
    assert out.dtype == torch.float32 and math.isfinite(float(out.abs().max()))
