"""Noise processes against diffusers' tables and closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from steindiff import ContinuousVPProcess, DiscreteVPProcess, VEProcess
from steindiff.noise import betas_for_schedule, log_snr, sigma_from_log_snr, zero_snr_alphas_cumprod

diffusers = pytest.importorskip("diffusers")

SCHEDULES = {
    "linear": dict(beta_start=0.0001, beta_end=0.02),
    "scaled_linear": dict(beta_start=0.00085, beta_end=0.012),
    "squaredcos_cap_v2": dict(),
}


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_betas_and_alphas_cumprod_match_diffusers(name):
    kw = SCHEDULES[name]
    sch = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=name, **kw)
    ours = betas_for_schedule(name, 1000, **kw)
    # diffusers builds betas with a float32 linspace (scaled_linear: of sqrt(beta), then squared)
    np.testing.assert_allclose(ours, sch.betas.double().numpy(), rtol=1e-6, atol=0)
    proc = DiscreteVPProcess(beta_schedule=name, num_train_timesteps=1000, **kw)
    # float32 rounding of beta_j (relative 2^-24) perturbs log(1 - beta_j) by up to 2^-24 beta_j / (1 - beta_j)
    # (a lot for the clipped 0.999 of the cosine schedule); diffusers' float32 product adds 2^-24 per factor
    b = ours
    beta_bound = np.cumsum(2.0**-24 * b / (1 - b))
    ac = proc.alphas_cumprod.numpy()
    f64_of_theirs = np.cumprod(1 - sch.betas.double().numpy())
    assert np.all(np.abs(ac / f64_of_theirs - 1) <= 1.5 * beta_bound + 1e-15)
    f32_bound = beta_bound + 2.0**-24 * np.arange(1, 1001)
    assert np.all(np.abs(ac / sch.alphas_cumprod.double().numpy() - 1) <= 1.5 * f32_bound)
    sig = np.sqrt((1 - proc.alphas_cumprod.numpy()) / proc.alphas_cumprod.numpy())
    np.testing.assert_allclose(proc.sigmas_table.numpy(), sig, rtol=1e-12)
    assert proc.sigma_min == pytest.approx(sig[0]) and proc.sigma_max == pytest.approx(sig[-1])


def test_squaredcos_closed_form():
    """Nichol & Dhariwal 2021, Eq. 17: abar(t) = f(t)/f(0), f(t) = cos((t/T + s)/(1 + s) pi/2)^2, beta <= 0.999."""
    T = 1000
    f = [math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2 for t in range(T + 1)]
    proc = DiscreteVPProcess(beta_schedule="squaredcos_cap_v2")
    expected = np.array([f[t + 1] / f[0] for t in range(T)])
    clipped = np.array([1 - f[t + 1] / f[t] >= 0.999 for t in range(T)])
    assert clipped.sum() <= 1  # only the very last beta is clipped
    np.testing.assert_allclose(proc.alphas_cumprod.numpy()[~clipped], expected[~clipped], rtol=1e-10)


def test_discrete_t_sigma_round_trip():
    proc = DiscreteVPProcess()
    t = torch.linspace(0, 999, 2001, dtype=torch.float64)
    torch.testing.assert_close(proc.sigma_to_t(proc.t_to_sigma(t)), t, rtol=0, atol=1e-8)
    ints = torch.arange(1000, dtype=torch.float64)
    torch.testing.assert_close(proc.t_to_sigma(ints), proc.sigmas_table, rtol=1e-14, atol=0)
    sig = torch.exp(torch.linspace(math.log(proc.sigma_min), math.log(proc.sigma_max), 777, dtype=torch.float64))
    torch.testing.assert_close(proc.t_to_sigma(proc.sigma_to_t(sig)), sig, rtol=1e-10, atol=0)
    # sigma_to_t is increasing, and clamps outside the table
    assert (torch.diff(proc.sigma_to_t(sig)) > 0).all()
    assert float(proc.sigma_to_t(proc.sigma_min / 10)) == 0.0
    assert float(proc.sigma_to_t(proc.sigma_max * 10)) == 999.0


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_sigma_to_t_matches_diffusers(name):
    proc = DiscreteVPProcess(beta_schedule=name, **SCHEDULES[name])
    log_sigmas = proc.log_sigmas.numpy()
    g = np.random.default_rng(0)
    sig = np.exp(g.uniform(np.log(proc.sigma_min) - 0.5, np.log(proc.sigma_max) + 0.5, 500))
    sig = np.concatenate([sig, proc.sigmas_table.numpy()[[0, 1, 500, 998, 999]]])
    theirs = diffusers.EulerDiscreteScheduler(beta_schedule=name, **SCHEDULES[name])._sigma_to_t(sig, log_sigmas)
    np.testing.assert_allclose(proc.sigma_to_t(torch.from_numpy(sig)).numpy(), theirs, rtol=0, atol=1e-9)


def _linear_sigma(t, b0=0.1, b1=20.0):
    """Song et al. 2021 VP-SDE: alpha_t^2 = exp(-int_0^t beta) = exp(-b0 t - (b1 - b0) t^2 / 2)."""
    a2 = math.exp(-b0 * t - (b1 - b0) * t * t / 2)
    return math.sqrt((1 - a2) / a2)


def _cosine_sigma(t, s=0.008):
    a = math.cos((t + s) / (1 + s) * math.pi / 2) / math.cos(s / (1 + s) * math.pi / 2)
    return math.sqrt(1 - a * a) / a


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_zero_snr_alphas_cumprod_matches_diffusers(name):
    """Lin et al. 2024, Alg. 1, as diffusers implements it on betas (``rescale_zero_terminal_snr``): the same
    ``alphas_cumprod`` but the last, which is exactly 0 there and ``2**-24`` here, as diffusers' Euler scheduler
    sets it (a terminal SNR of 0 has no VE noise level)."""
    from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr

    betas = betas_for_schedule(name, 1000, **SCHEDULES[name])
    ours = zero_snr_alphas_cumprod(np.cumprod(1.0 - betas))
    theirs = torch.cumprod(1.0 - rescale_zero_terminal_snr(torch.from_numpy(betas)), 0).numpy()
    assert theirs[-1] == 0.0 and ours[-1] == 2.0**-24
    np.testing.assert_allclose(ours[:-1], theirs[:-1], rtol=1e-9, atol=0)
    euler = diffusers.EulerDiscreteScheduler(beta_schedule=name, rescale_betas_zero_snr=True, **SCHEDULES[name])
    # diffusers computes in float32: near the end sqrt(abar) - sqrt(abar_T) loses a few digits there
    np.testing.assert_allclose(ours, euler.alphas_cumprod.double().numpy(), rtol=1e-4, atol=0)


def test_zero_snr_alphas_cumprod_closed_form():
    """``sqrt(abar)`` is mapped affinely onto itself: the first value kept, the last sent to 0 (then set
    to ``2**-24``), so the SNR still falls monotonically and ends at ~0."""
    ac = np.cumprod(1.0 - betas_for_schedule("scaled_linear", 1000, 0.00085, 0.012))
    out = zero_snr_alphas_cumprod(ac.copy())
    s, r = np.sqrt(ac), np.sqrt(out)
    scale = s[0] / (s[0] - s[-1])
    np.testing.assert_allclose(r[:-1], (s[:-1] - s[-1]) * scale, rtol=1e-12, atol=1e-15)
    assert out[0] == pytest.approx(ac[0], rel=1e-14) and out[-1] == 2.0**-24
    assert (np.diff(out) < 0).all() and out[-2] > out[-1] > 0
    snr = out / (1 - out)
    assert snr[-1] < 1e-7 < ac[-1] / (1 - ac[-1])  # the original schedule's terminal SNR is far from 0
    np.testing.assert_array_equal(ac, np.cumprod(1.0 - betas_for_schedule("scaled_linear", 1000, 0.00085, 0.012)))


@pytest.mark.parametrize("kind,closed", [("linear", _linear_sigma), ("cosine", _cosine_sigma)])
def test_continuous_vp(kind, closed):
    proc = ContinuousVPProcess(kind)
    t = torch.linspace(proc.t_min, proc.t_max, 501, dtype=torch.float64)
    sig = proc.t_to_sigma(t)
    np.testing.assert_allclose(sig.numpy(), [closed(float(v)) for v in t], rtol=1e-9)
    torch.testing.assert_close(proc.sigma_to_t(sig), t, rtol=0, atol=1e-9)
    assert (torch.diff(sig) > 0).all()
    assert proc.sigma_min == pytest.approx(closed(proc.t_min)) and proc.sigma_max == pytest.approx(closed(proc.t_max))


@pytest.mark.parametrize("proc", [VEProcess(), DiscreteVPProcess(), ContinuousVPProcess("cosine")], ids=repr)
def test_coordinates_and_log_snr(proc):
    x = torch.randn(4, 3, dtype=torch.float64)
    for sigma in (0.01, 0.7, 30.0):
        torch.testing.assert_close(proc.to_ve(proc.to_vp(x, sigma), sigma), x)
        alpha = float(proc.alpha(sigma))
        torch.testing.assert_close(proc.to_vp(x, sigma), alpha * x)
        assert float(log_snr(torch.tensor(sigma, dtype=torch.float64))) == pytest.approx(-math.log(sigma))
        assert float(sigma_from_log_snr(log_snr(sigma))) == pytest.approx(sigma)
        if isinstance(proc, VEProcess):
            assert alpha == 1.0
        else:  # variance preserving: alpha^2 + sigma_vp^2 = 1, and lambda = log(alpha / sigma_vp)
            assert alpha**2 + float(proc.sigma_vp(sigma)) ** 2 == pytest.approx(1.0)
            assert math.log(alpha / float(proc.sigma_vp(sigma))) == pytest.approx(log_snr(sigma))


def test_prior_scale():
    assert VEProcess().prior_scale(80.0) == 80.0
    assert DiscreteVPProcess().prior_scale(3.0) == pytest.approx(math.sqrt(10.0))


def test_bad_arguments():
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        VEProcess(1.0, 0.5)
    with pytest.raises(ValueError, match="unknown beta schedule"):
        betas_for_schedule("quadratic")
    with pytest.raises(ValueError, match="unknown continuous VP schedule"):
        ContinuousVPProcess("sigmoid")
    with pytest.raises(ValueError, match="betas"):
        DiscreteVPProcess(betas=[0.1, 1.5])
    with pytest.raises(ValueError, match="strictly decreasing"):
        DiscreteVPProcess(alphas_cumprod=[0.9, 0.95])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                                      reason="no CUDA device"))])
def test_discrete_tables_follow_the_input_device(device):
    p = DiscreteVPProcess()
    sig = torch.tensor([0.01, 0.5, 3.0, 80.0], dtype=torch.float64)
    t = p.sigma_to_t(sig.to(device))
    assert t.device.type == device
    torch.testing.assert_close(t.cpu(), p.sigma_to_t(sig))
    torch.testing.assert_close(p.t_to_sigma(t).cpu(), p.t_to_sigma(t.cpu()))


def test_vp_alpha_and_log_snr_of_floats_and_tensors():
    from steindiff.noise import vp_alpha

    assert vp_alpha(0.75) == pytest.approx(0.8, rel=1e-15)  # 1 / sqrt(1 + 9/16)
    assert float(vp_alpha(torch.tensor(0.75, dtype=torch.float64))) == pytest.approx(0.8, rel=1e-15)
    assert vp_alpha(0.0) == 1.0
    assert log_snr(0.0) == math.inf and float(log_snr(torch.tensor([0.0]))[0]) == math.inf
    assert log_snr(math.e) == pytest.approx(-1.0, rel=1e-15)


def test_continuous_vp_defaults_and_other_betas():
    """Defaults of score-SDE / DPM-Solver (Song et al. 2021; Lu et al. 2022): beta 0.1 to 20, t in [1e-3, 1] for
    the linear schedule and [1e-3, 0.9946] for the cosine one; other betas follow the closed form too."""
    lin, cos = ContinuousVPProcess("linear"), ContinuousVPProcess("cosine")
    assert (lin.t_min, lin.t_max, cos.t_min, cos.t_max) == (1e-3, 1.0, 1e-3, 0.9946)
    assert lin.sigma_min == pytest.approx(_linear_sigma(1e-3), rel=1e-10)
    assert cos.sigma_max == pytest.approx(_cosine_sigma(0.9946), rel=1e-10)
    proc = ContinuousVPProcess("linear", beta_min=0.5, beta_max=8.0)
    t = torch.linspace(proc.t_min, proc.t_max, 101, dtype=torch.float64)
    np.testing.assert_allclose(proc.t_to_sigma(t).numpy(), [_linear_sigma(float(v), 0.5, 8.0) for v in t], rtol=1e-9)
    torch.testing.assert_close(proc.sigma_to_t(proc.t_to_sigma(t)), t, rtol=0, atol=1e-9)


def test_discrete_t_to_sigma_clamps_outside_the_table():
    proc = DiscreteVPProcess()
    sig = proc.t_to_sigma(torch.tensor([-5.0, -0.5, 999.0, 1003.5], dtype=torch.float64))
    assert sig.tolist() == pytest.approx([float(proc.sigmas_table[0])] * 2 + [float(proc.sigmas_table[-1])] * 2,
                                         rel=1e-14)
