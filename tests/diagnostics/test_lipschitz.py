"""Local Lipschitz constants from Jacobian products: closed forms (linear denoiser), the full
Jacobian (nonlinear mixtures, several solvers incl. multistep history), pass counting, errors."""

import math

import pytest
import torch

from steindiff import VEProcess, get_sigmas, prior_noise
from steindiff.diagnostics.lipschitz import NotDifferentiableError, denoiser_lipschitz, local_lipschitz, step_lipschitz
from steindiff.models import get_gmm
from steindiff.solvers import Denoise, StepOperator, get_solver

S2 = torch.tensor([4.0, 1.0, 0.5, 0.25, 0.1, 0.05], dtype=torch.float64)  # data N(0, diag(S2))


def gauss_denoiser(x, sigma):
    """Exact posterior mean of N(0, diag(S2)) data: D(x) = S2 / (S2 + sigma^2) x."""
    s = sigma.to(torch.float64).reshape(-1, 1)
    return (S2 / (S2 + s**2) * x.to(torch.float64)).to(x.dtype)


def shrink(sigma):
    return S2 / (S2 + sigma**2)


def gauss_states(n, sigma, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, len(S2), generator=g, dtype=torch.float64) * (S2 + sigma**2).sqrt()


def full_jacobian_norms(f, x):
    """Largest singular value of each sample's block of the full Jacobian (float64)."""
    J = torch.autograd.functional.jacobian(f, x.to(torch.float64))
    return torch.stack([torch.linalg.matrix_norm(J[i].reshape(x[i].numel(),
                                                              -1)[:, i * x[i].numel():(i + 1) * x[i].numel()], ord=2)
                        for i in range(x.shape[0])])


@pytest.mark.parametrize("method, jvp",
                         [("lanczos", "forward"), ("power", "double_backward"), ("lanczos", "double_backward")])
def test_euler_linear_denoiser_closed_form(method, jvp):
    """Euler with D(x) = c x (c = S2/(S2+s^2)): T = (t/s + (1 - t/s) c) x, so L_T = max_j of that
    and L_D = max_j c_j, the same for every sample."""
    s, t = 2.0, 0.7
    x = gauss_states(12, s)
    op = StepOperator(get_solver("euler"), Denoise(gauss_denoiser), 0, [s, t, 0.0], {})
    L = step_lipschitz(op, x, iters=30, method=method, jvp=jvp)
    expected = float((t / s + (1 - t / s) * shrink(s)).max())
    assert L.shape == (12,) and L.dtype == torch.float64
    torch.testing.assert_close(L, torch.full_like(L, expected), rtol=1e-6, atol=0)
    LD = denoiser_lipschitz(gauss_denoiser, x, s, iters=30, method=method, jvp=jvp)
    torch.testing.assert_close(LD, torch.full_like(LD, float(shrink(s).max())), rtol=1e-6, atol=0)


def test_final_step_to_zero_is_the_denoiser():
    x = gauss_states(5, 0.3)
    op = StepOperator(get_solver("euler"), Denoise(gauss_denoiser), 0, [0.3, 0.0], {})
    L = step_lipschitz(op, x, iters=10)
    torch.testing.assert_close(L, torch.full_like(L, float(shrink(0.3).max())), rtol=1e-8, atol=0)


def test_dpmpp_2m_with_history_linear_closed_form():
    """DPM-Solver++(2M) second step: T(x) = (t/s) x - expm1(-h)(1 + 1/(2 r0)) D(x) + (history term),
    the history held fixed; L_T = max_j (t/s - expm1(-h)(1 + 1/(2 r0)) c_j)."""
    sig = [10.0, 3.0, 1.0, 0.3, 0.0]
    solver, den = get_solver("dpmpp_2m"), Denoise(gauss_denoiser)
    x = gauss_states(8, sig[0])
    st = StepOperator(solver, den, 0, sig, solver.init_state())(x)
    op = StepOperator(solver, den, 1, sig, st.state)
    assert solver.step_order(1, sig) == 2 and len(st.state["denoised"]) == 1
    s, t, prev = sig[1], sig[2], sig[0]
    h = math.log(s / t)
    r0 = math.log(prev / s) / h
    factor = t / s - math.expm1(-h) * (1 + 0.5 / r0) * shrink(s)
    L = step_lipschitz(op, st.x_next, iters=20)
    torch.testing.assert_close(L, torch.full_like(L, float(factor.abs().max())), rtol=1e-6, atol=0)


def _trajectory_ops(gmm, solver_name, sigmas, n, seed=0):
    """(op, x) at every step of a float64 solve on ``sigmas``."""
    solver, den = get_solver(solver_name), Denoise(gmm)
    x = prior_noise((n, gmm.dim), sigmas[0], seed=seed, dtype=torch.float64)
    state, out = solver.init_state(), []
    for i in range(len(sigmas) - 1):
        op = StepOperator(solver, den, i, sigmas, state)
        out.append((op, x))
        with torch.no_grad():
            st = op(x)
        x, state = st.x_next, st.state
    return out


@pytest.mark.parametrize("solver", ["euler", "heun", "dpmpp_2m", "dpmpp_3m", "unipc"])
def test_matches_full_jacobian_toy2d(solver):
    """Nonlinear exact mixture (8 modes in 2-D): per-sample estimates equal the top singular value of
    the full Jacobian's diagonal block at every step of a real trajectory (history included)."""
    gmm = get_gmm("gmm:toy2d")
    sig = [float(s) for s in get_sigmas("karras", 5, VEProcess(0.002, 80.0))]
    for op, x in _trajectory_ops(gmm, solver, sig, 10, seed=1):
        true = full_jacobian_norms(lambda z: op(z).x_next, x)
        est = step_lipschitz(op, x, iters=4, jvp="double_backward")
        torch.testing.assert_close(est, true, rtol=1e-7, atol=1e-12)
        # power iteration: a lower bound, converging (slowly where the two singular values are close)
        pw = step_lipschitz(op, x, iters=12, method="power", jvp="double_backward")
        assert bool((pw <= true * (1 + 1e-9)).all())
        assert float(((true - pw) / true).max()) < 5e-2


@pytest.mark.parametrize("solver", ["heun", "dpmpp_2m"])
def test_matches_full_jacobian_image64(solver):
    """64-D mixture (near-degenerate top singular values): Lanczos hits the full Jacobian's value;
    power iteration stays below it."""
    gmm = get_gmm("gmm:image64")
    sig = [float(s) for s in get_sigmas("karras", 4, VEProcess(0.002, 80.0))]
    for op, x in _trajectory_ops(gmm, solver, sig, 3, seed=2)[1:3]:
        true = full_jacobian_norms(lambda z: op(z).x_next, x)
        torch.testing.assert_close(step_lipschitz(op, x, iters=20, jvp="double_backward"), true, rtol=1e-6, atol=1e-12)
        pw = step_lipschitz(op, x, iters=20, method="power", jvp="double_backward")
        assert bool((pw <= true * (1 + 1e-9)).all()) and float(((true - pw) / true).max()) < 0.1


def test_pass_counting_and_nfe_untouched():
    gmm = get_gmm("gmm:toy2d")
    x = gmm.sample(6, sigma=1.0, seed=0)
    for solver, per_T in (("euler", 1), ("heun", 2)):
        den = Denoise(gmm)
        op = StepOperator(get_solver(solver), den, 0, [1.0, 0.5, 0.0], get_solver(solver).init_state())
        _, info = step_lipschitz(op, x, iters=7, jvp="forward", return_info=True)
        assert (info["jvp_passes"], info["vjp_passes"], info["graph_passes"]) == (7, 7, 1)
        assert info["jvp_mode"] == "forward" and info["model_passes"] == 8 * per_T
        assert den.calls == 0 and den.extra_calls == 8 * per_T  # Jacobian passes are not NFE
        _, info = step_lipschitz(op, x, iters=7, jvp="double_backward", return_info=True)
        assert info["jvp_mode"] == "double_backward" and info["model_passes"] == per_T
        assert (info["jvp_passes"], info["vjp_passes"]) == (7, 7)
        assert den.calls == 0
    _, info = denoiser_lipschitz(Denoise(gmm), x, 1.0, iters=4, return_info=True)
    assert info["model_passes"] == 5 and info["rel_change"].shape == (6,)


def test_batch_independence_and_seed():
    """The estimator is per sample: one sample's value does not depend on the rest of the batch."""
    gmm = get_gmm("gmm:toy2d")
    x = gmm.sample(8, sigma=0.5, seed=3)
    op = StepOperator(get_solver("euler"), Denoise(gmm), 0, [0.5, 0.2, 0.0], {})
    full = step_lipschitz(op, x, iters=6)
    part = step_lipschitz(op, x[2:5], iters=6, seed=11)
    torch.testing.assert_close(full[2:5], part, rtol=1e-7, atol=0)


def test_errors():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="iters"):
        local_lipschitz(lambda z: 2 * z, x, iters=0)
    with pytest.raises(ValueError, match="method"):
        local_lipschitz(lambda z: 2 * z, x, method="svd")
    with pytest.raises(ValueError, match="jvp"):
        local_lipschitz(lambda z: 2 * z, x, jvp="reverse")
    with pytest.raises(NotDifferentiableError):
        local_lipschitz(lambda z: z.detach() * 2, x)
    with pytest.raises(ValueError, match="shape"):
        local_lipschitz(lambda z: z.sum(1), x)
    # a zero Jacobian gives 0, not NaN
    zero = local_lipschitz(lambda z: 0 * z, x, iters=3)
    assert torch.equal(zero, torch.zeros(4, dtype=torch.float64))
    torch.testing.assert_close(local_lipschitz(lambda z: -3 * z, x, iters=3),
                               torch.full((4,), 3.0, dtype=torch.float64))


@pytest.mark.parametrize("d", [1, 2, 3, 8])
def test_lanczos_breakdown_isotropic_float32(d):
    """An isotropic Jacobian (A = c^2 I, float32 products) exhausts the Krylov space at once:
    continuing past the breakdown must not invent larger Ritz values."""
    x = torch.randn(5, d, generator=torch.Generator().manual_seed(d))
    L = local_lipschitz(lambda z: 0.3 * z, x, iters=12)
    torch.testing.assert_close(L, torch.full((5,), 0.3, dtype=torch.float64), rtol=1e-6, atol=0)
    f = lambda z: 0.3 * torch.tanh(z)  # noqa: E731
    exact = (0.3 * (1 - torch.tanh(x.double()) ** 2)).amax(1)
    torch.testing.assert_close(local_lipschitz(f, x, iters=12), exact, rtol=1e-6, atol=0)
