"""The sampling loop: NFE accounting, determinism, dtypes, callbacks, extra arguments, shapes, errors."""

from __future__ import annotations

import pytest
import torch

from steindiff import SOLVERS, get_solver, karras_sigmas, logsnr_sigmas, prior_noise, sample
from steindiff.models import get_gmm
from steindiff.solvers import NonFiniteModelOutput

GMM = get_gmm("toy2d")


class Counting:
    """A VE denoiser (shrinks towards 0) that records every call."""

    def __init__(self, fn=None):
        self.calls, self.fn = [], fn

    def __call__(self, x, sigma, **extra):
        out = x / (1 + sigma.reshape(-1, *([1] * (x.ndim - 1))) ** 2) if self.fn is None else self.fn(x, sigma)
        self.calls.append({"x": x.clone(), "sigma": sigma.clone(), "extra": extra, "out": out.clone(),
                           "dtype": x.dtype})
        return out


SCHEDS = {
    "karras_to_zero": karras_sigmas(7, 0.01, 20.0),
    "logsnr_truncated": logsnr_sigmas(6, 0.05, 10.0, final_zero=False),
    "one_step": torch.tensor([5.0, 0.0], dtype=torch.float64),
}


@pytest.mark.parametrize("sched", list(SCHEDS))
@pytest.mark.parametrize("name", list(SOLVERS))
def test_nfe_counts_model_calls(name, sched):
    sig = SCHEDS[sched]
    model = Counting()
    r = sample(model, torch.randn(3, 2), sig, name)
    assert r.nfe == len(model.calls) == get_solver(name).nfe(sig)
    n = len(sig) - 1
    expected = 2 * n - (1 if sig[-1] == 0 else 0) if name in ("heun", "heun_flow") else n
    assert r.nfe == expected
    # each call is batched over the whole batch at a single noise level from the schedule
    for c in model.calls:
        assert c["sigma"].shape == (3,) and bool((c["sigma"] == c["sigma"][0]).all())
        assert any(abs(float(c["sigma"][0]) - float(s)) < 1e-6 for s in sig if s > 0)


def test_determinism_with_prior_noise_seed():
    shape, smax = (4, 2), 20.0
    a = prior_noise(shape, smax, seed=7, dtype=torch.float64)
    b = prior_noise(shape, smax, seed=7, dtype=torch.float64)
    assert torch.equal(a, b) and not torch.equal(a, prior_noise(shape, smax, seed=8, dtype=torch.float64))
    sig = karras_sigmas(6, 0.01, smax)
    for name in ("euler", "dpmpp_3m", "unipc"):
        assert torch.equal(sample(GMM, a, sig, name).x, sample(GMM, b, sig, name).x)
    g = torch.Generator().manual_seed(7)
    assert torch.equal(prior_noise(shape, smax, generator=g, dtype=torch.float64), a)


def test_prior_noise_scale():
    from steindiff import DiscreteVPProcess, VEProcess
    big = (5000, 4)  # std estimate: relative standard error 1/sqrt(2 * 20000) = 0.5%
    ve = prior_noise(big, 20.0, VEProcess(), seed=0)
    vp = prior_noise(big, 20.0, DiscreteVPProcess(), seed=0)
    assert abs(float(ve.std()) / 20.0 - 1) < 0.02
    assert abs(float(vp.std()) / (1 + 20.0**2) ** 0.5 - 1) < 0.02
    torch.testing.assert_close(vp, ve * (1 + 20.0**2) ** 0.5 / 20.0)


@pytest.mark.parametrize("name", ["euler", "heun", "dpmpp_2m", "unipc"])
def test_half_precision_input_gets_float32_state(name):
    model = Counting()
    x = torch.randn(2, 3, dtype=torch.float16)
    r = sample(model, x, karras_sigmas(4, 0.05, 10.0), name)
    assert r.x.dtype == torch.float32
    assert all(c["dtype"] == torch.float32 for c in model.calls)
    # float64 input keeps float64, and an explicit dtype wins
    assert sample(Counting(), x.double(), karras_sigmas(4, 0.05, 10.0), name).x.dtype == torch.float64
    assert sample(Counting(), x.double(), karras_sigmas(4, 0.05, 10.0), name,
                  dtype=torch.float32).x.dtype == torch.float32


@pytest.mark.parametrize("name", ["euler", "heun", "dpmpp_3m", "unipc", "ipndm"])
def test_callback_every_step(name):
    sig = karras_sigmas(5, 0.05, 10.0)
    model = Counting()
    seen = []
    r = sample(model, torch.randn(2, 2, dtype=torch.float64), sig, name, callback=seen.append)
    assert [d["step"] for d in seen] == list(range(5))
    for d in seen:
        i = d["step"]
        assert d["sigma"] == pytest.approx(float(sig[i])) and d["sigma_next"] == pytest.approx(float(sig[i + 1]))
        assert d["x"].shape == (2, 2) and d["denoised"].shape == (2, 2)
        # denoised is the model output at the step's own state and noise level
        call = model.calls[2 * i if name == "heun" else i]  # Heun: predictor and corrector per step
        assert float(call["sigma"][0]) == pytest.approx(float(sig[i]))
        torch.testing.assert_close(d["denoised"], call["out"])
    torch.testing.assert_close(seen[-1]["x"], r.x)


def test_extra_args_pass_through():
    labels = torch.tensor([3, 1, 4])
    model = Counting()
    sample(model, torch.randn(3, 2), karras_sigmas(4, 0.05, 10.0), "heun",
           extra_args={"class_labels": labels, "cfg": 2.5})
    assert len(model.calls) == 7
    for c in model.calls:
        assert c["extra"]["class_labels"] is labels and c["extra"]["cfg"] == 2.5


@pytest.mark.parametrize("shape", [(2, 1, 4, 4), (1, 3, 2, 2, 2), (5,)])
@pytest.mark.parametrize("name", list(SOLVERS))
def test_any_tensor_shape(name, shape):
    x = torch.randn(*shape, dtype=torch.float64)
    sig = karras_sigmas(4, 0.05, 10.0)
    r = sample(Counting(), x, sig, name)
    assert r.x.shape == x.shape and torch.isfinite(r.x).all()
    # the batch dimension is independent: solving one sample alone gives the same result
    r1 = sample(Counting(), x[:1], sig, name)
    torch.testing.assert_close(r1.x, r.x[:1])


def test_unknown_solver_names_it():
    with pytest.raises(ValueError, match="unknown solver 'rk45'"):
        sample(Counting(), torch.randn(2, 2), karras_sigmas(3, 0.1, 5.0), "rk45")
    with pytest.raises(ValueError, match="dpmpp_2m"):  # bad option for a known solver
        sample(Counting(), torch.randn(2, 2), karras_sigmas(3, 0.1, 5.0), "dpmpp_2m", solver_options={"bogus": 1})


def test_wrong_output_shape_names_shapes():
    with pytest.raises(ValueError, match=r"shape \(2, 1, 4\).*expected \(2, 1, 4, 4\)"):
        sample(lambda x, s: x[..., 0], torch.randn(2, 1, 4, 4), karras_sigmas(3, 0.1, 5.0), "euler")


@pytest.mark.parametrize("name", ["euler", "heun", "dpmpp_2m", "unipc", "ipndm"])
def test_nan_output_names_step_and_sigma(name):
    sig = karras_sigmas(6, 0.05, 10.0)
    bad_sigma = float(sig[3])

    def model(x, s):
        out = x / (1 + s.reshape(-1, 1) ** 2)
        return out * float("nan") if abs(float(s[0]) - bad_sigma) < 1e-12 else out

    with pytest.raises(NonFiniteModelOutput, match=rf"step [23] \(sigma={bad_sigma:.6g}\)"):
        sample(model, torch.randn(2, 2, dtype=torch.float64), sig, name)
    # the message names the step whose own noise level produced NaN (Heun may hit it as step 2's corrector)
    with pytest.raises(NonFiniteModelOutput, match=rf"step 3 \(sigma={bad_sigma:.6g}\)"):
        sample(model, torch.randn(2, 2, dtype=torch.float64), sig, "euler")
    # check_finite=False lets NaN through
    r = sample(model, torch.randn(2, 2, dtype=torch.float64), sig, "euler", check_finite=False)
    assert torch.isnan(r.x).all()


def test_bad_input_dtype_and_shape():
    with pytest.raises(ValueError, match="float32 or float64"):
        sample(Counting(), torch.zeros(2, 2, dtype=torch.int64), karras_sigmas(3, 0.1, 5.0))
    with pytest.raises(ValueError, match="batch-first"):
        sample(Counting(), torch.zeros(0, 2), karras_sigmas(3, 0.1, 5.0))
    with pytest.raises(ValueError, match="strictly decreasing"):
        sample(Counting(), torch.zeros(2, 2), [1.0, 2.0, 0.0])


@pytest.mark.parametrize("name", ["heun", "dpmpp_2m"])
def test_finiteness_is_read_back_once_per_step(name, read_backs):
    """The loop queues each model output's finiteness check on the device and reads them back once per
    step (on CUDA a read-back per model call would wait for the device each time); Heun makes two calls a step."""
    from steindiff.sampling import steps

    sig = karras_sigmas(5, 0.05, 10.0)
    model = Counting()
    gen = steps(model, torch.randn(3, 2, dtype=torch.float64), sig, name)
    next(gen)  # the checks of the arguments read the schedule once, before the first step
    with read_backs() as r:
        n = sum(1 for _ in gen)
    assert n == len(sig) - 2 and r.count == n
    assert len(model.calls) == get_solver(name).nfe(sig)


def test_denoise_outside_the_loop_checks_each_call():
    """Outside the loop's steps (e.g. a diagnostic calling the step operator after a step) a NaN is refused at once."""
    from steindiff.solvers import Denoise

    d = Denoise(lambda x, s: x * float("nan"))
    with pytest.raises(NonFiniteModelOutput, match=r"step 7 \(sigma=2\)"):
        d(torch.ones(2, 2), 2.0, 7)
    with pytest.raises(NonFiniteModelOutput, match=r"step 1 \(sigma=3\)"):
        with d.deferred_checks():
            d(torch.ones(2, 2), 3.0, 1)  # queued: raised when the block ends
            d(torch.ones(2, 2), 4.0, 2)
    assert d.pending_checks() is None  # nothing left queued after the block
