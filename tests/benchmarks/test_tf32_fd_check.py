"""benchmarks/tf32_fd_check.py: its TF32 emulation rounds as TF32 does, and theta_of inverts the fit's decoding."""

import numpy as np
import pytest
import torch

from steindiff.noise import VEProcess
from steindiff.plan import SamplingPlan, make_plan
from steindiff.trajectory import _Params


@pytest.fixture(scope="module")
def check(load_benchmark):
    return load_benchmark("tf32_fd_check")


def test_tf32_round_keeps_ten_mantissa_bits(check):
    x = torch.randn(10_000) * torch.logspace(-6, 6, 10_000)
    r = check.tf32_round(x)
    rel = ((r - x) / x).abs()
    assert float(rel.max()) <= 2.0**-11 * (1 + 1e-6)  # half a unit in the 11th significant bit
    assert float(rel.max()) > 2.0**-13  # it does round: float32 itself keeps 2^-24
    assert torch.equal(torch.sign(r), torch.sign(x))
    exact = torch.tensor([1.0, -1.5, 1 + 2.0**-10, 3.0 * 2.0**20])  # representable in TF32: unchanged
    assert torch.equal(check.tf32_round(exact), exact)


def test_emulated_tf32_perturbs_a_layer_at_tf32_precision(check):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(8, 3, 3, padding=1))
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        exact, tf32 = net(x), check.emulate_tf32(net)(x)
    rel = float((tf32 - exact).norm() / exact.norm())
    assert 1e-5 < rel < 5e-3
    assert torch.equal(net(x), exact)  # the original module is left as it was


def test_theta_of_inverts_the_fit_decoding(check):
    base = make_plan(VEProcess(), "unipc", 5, "karras")
    P = _Params(base, "both", 0.002, [1.0] * base.steps, plain_tail=2)
    theta = P.initial() + np.random.default_rng(0).uniform(-0.2, 0.2, P.initial().size)
    sigmas, gammas = P.decode(theta)
    back = check.theta_of(P, SamplingPlan(base.solver, sigmas, "fitted", gammas, base.coords))
    s2, g2 = P.decode(back)
    assert torch.allclose(s2, sigmas, rtol=1e-12) and np.allclose(g2, gammas)
