"""Schedules: shape, monotonicity, endpoints, spacing, and validation errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from steindiff import (
    ContinuousVPProcess,
    DiscreteVPProcess,
    VEProcess,
    get_sigmas,
    karras_sigmas,
    logsnr_sigmas,
    time_sigmas,
    validate_sigmas,
)

PROCESSES = [VEProcess(), DiscreteVPProcess(), ContinuousVPProcess("linear"), ContinuousVPProcess("cosine")]


@pytest.mark.parametrize("schedule", ["karras", "logsnr", "time"])
@pytest.mark.parametrize("proc", PROCESSES, ids=repr)
@pytest.mark.parametrize("n", [1, 2, 7, 50])
def test_schedule_shape_monotone_final_zero(schedule, proc, n):
    s = get_sigmas(schedule, n, proc)
    assert s.dtype == torch.float64 and s.shape == (n + 1,)
    assert s[-1] == 0 and (s[:-1] > 0).all()
    assert (torch.diff(s) < 0).all()
    assert validate_sigmas(s) is not s  # a validated copy
    torch.testing.assert_close(validate_sigmas(s), s)


def test_karras_endpoints_and_formula():
    n, smin, smax, rho = 10, 0.002, 80.0, 7.0
    s = karras_sigmas(n, smin, smax, rho)
    assert s.shape == (n + 1,) and s[-1] == 0
    assert math.isclose(s[0], smax, rel_tol=1e-14) and math.isclose(s[-2], smin, rel_tol=1e-12)
    for i in range(n):  # Karras et al. 2022, Eq. 5
        expected = (smax ** (1 / rho) + i / (n - 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
        assert math.isclose(s[i], expected, rel_tol=1e-12)
    # rho = 1 is uniform in sigma; large rho tends to uniform in log sigma
    torch.testing.assert_close(karras_sigmas(5, 1.0, 5.0, rho=1.0, final_zero=False),
                               torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0], dtype=torch.float64))
    big = karras_sigmas(6, 0.01, 100.0, rho=1e6, final_zero=False)
    np.testing.assert_allclose(np.diff(np.log(big.numpy())), np.full(5, math.log(1e-4) / 5), rtol=1e-4)


def test_logsnr_uniform_in_log_sigma():
    s = logsnr_sigmas(12, 0.03, 15.0, final_zero=False)
    assert s.shape == (12,)
    assert math.isclose(s[0], 15.0, rel_tol=1e-14) and math.isclose(s[-1], 0.03, rel_tol=1e-13)
    lam = -torch.log(s)
    np.testing.assert_allclose(torch.diff(lam).numpy(), np.full(11, math.log(15.0 / 0.03) / 11), rtol=1e-12)
    s0 = logsnr_sigmas(12, 0.03, 15.0)
    assert s0[-1] == 0 and torch.equal(s0[:-1], s)


def test_time_sigmas():
    # VE: uniform in sigma
    ve = VEProcess(0.1, 10.0)
    np.testing.assert_allclose(time_sigmas(4, ve, final_zero=False).numpy(), np.linspace(10.0, 0.1, 4))
    # continuous VP: uniform in t from t_max to t_min
    cvp = ContinuousVPProcess("linear")
    s = time_sigmas(5, cvp, final_zero=False)
    np.testing.assert_allclose(cvp.sigma_to_t(s).numpy(), np.linspace(cvp.t_max, cvp.t_min, 5), atol=1e-10)
    # discrete VP: "trailing" integer timesteps T-1, T-1-T/n, ...
    dvp = DiscreteVPProcess()
    s = time_sigmas(10, dvp, final_zero=False)
    np.testing.assert_allclose(dvp.sigma_to_t(s).numpy(), np.arange(999, 0, -100), atol=1e-8)


def test_time_sigmas_match_diffusers_trailing():
    diffusers = pytest.importorskip("diffusers")
    for n in (4, 7, 10, 25):
        sch = diffusers.EulerDiscreteScheduler(beta_schedule="linear", timestep_spacing="trailing")
        sch.set_timesteps(n)
        proc = DiscreteVPProcess()
        ours = time_sigmas(n, proc)
        np.testing.assert_allclose(proc.sigma_to_t(ours[:-1]).numpy(), sch.timesteps.double().numpy(), rtol=0,
                                   atol=1e-8)
        # diffusers evaluates sqrt((1 - abar) / abar) in float32: 1 - abar loses ~2^-24 / (1 - abar) relative
        np.testing.assert_allclose(ours.numpy(), sch.sigmas.double().numpy(), rtol=1e-5)
        assert ours[-1] == 0 == sch.sigmas[-1]


def test_get_sigmas_options_and_explicit():
    proc = VEProcess(0.002, 80.0)
    s = get_sigmas("karras", 8, proc, sigma_min=0.01, sigma_max=20.0, rho=3.0)
    torch.testing.assert_close(s, karras_sigmas(8, 0.01, 20.0, 3.0))
    explicit = [5.0, 2.0, 0.5, 0.0]
    torch.testing.assert_close(get_sigmas(explicit, 123, proc), torch.tensor(explicit, dtype=torch.float64))
    with pytest.raises(ValueError, match="unknown schedule 'cosine'"):
        get_sigmas("cosine", 5, proc)


@pytest.mark.parametrize("bad,match", [
    ([3.0, 1.0, 2.0, 0.0], r"strictly decreasing: sigmas\[1\]=1 <= sigmas\[2\]=2"),
    ([3.0, 3.0, 0.0], r"strictly decreasing: sigmas\[0\]=3 <= sigmas\[1\]=3"),
    ([3.0, -1.0, -2.0], "positive except a final 0"),
    ([3.0, 1.0, -0.5], "positive except a final 0"),
    ([3.0, float("nan"), 0.0], "finite"),
    ([float("inf"), 1.0, 0.0], "finite"),
    ([1.0], "at least 2"),
    ([], "at least 2"),
    ([[2.0, 1.0], [1.0, 0.0]], "1-D"),
])
def test_validate_sigmas_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        validate_sigmas(bad)


def test_validate_sigmas_accepts_truncated_and_zero_final():
    assert validate_sigmas([2.0, 1.0]).tolist() == [2.0, 1.0]
    assert validate_sigmas(np.array([2.0, 0.0])).tolist() == [2.0, 0.0]


@pytest.mark.parametrize("fn", [lambda: karras_sigmas(0, 0.1, 1.0), lambda: logsnr_sigmas(5, 1.0, 0.1),
                                lambda: karras_sigmas(5, 0.0, 1.0), lambda: time_sigmas(0, VEProcess())])
def test_schedule_argument_errors(fn):
    with pytest.raises(ValueError, match="steps must be >= 1|0 < sigma_min < sigma_max"):
        fn()


@pytest.mark.parametrize("schedule", ["karras", "logsnr"])
@pytest.mark.parametrize("proc", PROCESSES, ids=repr)
def test_schedules_span_the_processs_noise_range_by_default(schedule, proc):
    s = get_sigmas(schedule, 6, proc)
    assert float(s[0]) == pytest.approx(proc.sigma_max, rel=1e-12)
    assert float(s[-2]) == pytest.approx(proc.sigma_min, rel=1e-12)
    t = get_sigmas(schedule, 6, proc, sigma_min=2 * proc.sigma_min)
    assert float(t[0]) == pytest.approx(proc.sigma_max, rel=1e-12) and float(t[-2]) == pytest.approx(2 * proc.sigma_min)
