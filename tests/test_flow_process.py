"""FlowProcess, flow_time_shift and FlowDenoiser against closed forms and diffusers' flow scheduler."""

import math

import pytest
import torch

from steindiff.models import FlowDenoiser, get_gmm
from steindiff.noise import FlowProcess
from steindiff.sampling import prior_noise
from steindiff.schedules import flow_time_shift


def test_flow_process_coordinates():
    p = FlowProcess(0.01, 0.99)
    t = torch.tensor([0.01, 0.25, 0.5, 0.9, 0.99], dtype=torch.float64)
    s = p.t_to_sigma(t)
    torch.testing.assert_close(s, t / (1 - t))
    torch.testing.assert_close(p.sigma_to_t(s), t)
    torch.testing.assert_close(p.alpha(s), 1 - t)  # x_t = (1 - t) x_ve
    assert p.sigma_min == pytest.approx(0.01 / 0.99) and p.sigma_max == pytest.approx(99.0)
    assert p.prior_scale(p.sigma_max) == pytest.approx(100.0)
    # x_t of the prior is N(0, I): the VE state times (1 - t)
    x = prior_noise((20000, 2), p.sigma_max, p, seed=0, dtype=torch.float64)
    assert float(p.to_vp(x, p.sigma_max).std()) == pytest.approx(1.0, abs=0.02)
    for bad in ((0.0, 0.5), (0.5, 0.4), (0.1, 1.0)):
        with pytest.raises(ValueError, match="t_min"):
            FlowProcess(*bad)


def test_flow_time_shift_closed_forms():
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    torch.testing.assert_close(flow_time_shift(t, 1.0), t)
    torch.testing.assert_close(flow_time_shift(t, 3.0), 3 * t / (1 + 2 * t))
    torch.testing.assert_close(flow_time_shift(t, mu=0.0), t)  # e^0 = 1: no shift
    torch.testing.assert_close(flow_time_shift(t, mu=math.log(3.0)), 3 * t / (1 + 2 * t))
    torch.testing.assert_close(flow_time_shift(t, mu=2.0, kind="linear"), 2 / (2 + 1 / t - 1))
    with pytest.raises(ValueError, match="kind"):
        flow_time_shift(t, mu=1.0, kind="cubic")
    with pytest.raises(ValueError, match="shift"):
        flow_time_shift(t, 0.0)


def test_flow_time_shift_matches_diffusers():
    diffusers = pytest.importorskip("diffusers")
    sch = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    sch.set_timesteps(8)
    # the scheduler's range ends at its training table's last level, already shifted once, and shifts again
    t_min = float(flow_time_shift(torch.tensor(1 / 1000), 3.0))
    ours = flow_time_shift(torch.linspace(1.0, t_min, 8, dtype=torch.float64), 3.0)
    torch.testing.assert_close(ours.float(), sch.sigmas[:-1].float(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("prediction,time_scale", [("velocity", 1.0), ("velocity", 1000.0), ("x0", 1.0),
                                                   ("epsilon", 1.0)])
def test_flow_denoiser_recovers_the_exact_denoiser(prediction, time_scale):
    """A network that predicts the flow's velocity (or x0, or eps) of an exact mixture, from x_t and t,
    gives back the mixture's own VE denoiser."""
    gmm = get_gmm("gmm:toy2d")
    seen = []

    def net(x_t, t):
        seen.append(t)
        t = (t / time_scale).to(torch.float64)[:, None]
        x_ve = x_t / (1 - t)
        sigma = (t / (1 - t))[:, 0]
        x0 = gmm.denoise(x_ve, sigma)
        eps = (x_t - (1 - t) * x0) / t
        return {"velocity": eps - x0, "x0": x0, "epsilon": eps}[prediction]

    den = FlowDenoiser(net, prediction=prediction, time_scale=time_scale)
    x = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 3
    sigma = torch.linspace(0.05, 20.0, 64, dtype=torch.float64)
    torch.testing.assert_close(den(x, sigma), gmm.denoise(x, sigma), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(seen[-1], sigma / (1 + sigma) * time_scale)
    with pytest.raises(ValueError, match="prediction"):
        FlowDenoiser(net, prediction="v")
