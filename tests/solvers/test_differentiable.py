"""Every solver is differentiable in its noise levels (0-d float64 tensors), with the same formulas as the
float path: gradients of a few-step solve against central finite differences on an exact mixture."""

from __future__ import annotations

import pytest
import torch

import steindiff as sd
from steindiff.models.registry import load_model
from steindiff.solvers import SOLVERS, Denoise, get_solver
from steindiff.solvers.base import scalar_expm1, scalar_solve
from steindiff.solvers.ipndm import adams_bashforth_weights
from steindiff.solvers.unipc import unipc_weights

SPEC = load_model("gmm:toy2d")
CONFIGS = [(name, {}) for name in SOLVERS] + [("unipc", {"order": 3}), ("dpmpp_3m", {"exact_third_order": True}),
                                              ("ipndm_v", {"order": 3})]


def _setup(steps: int = 5, schedule: str = "karras"):
    x0 = sd.prior_noise((12, 2), 80.0, seed=3, dtype=torch.float64)
    w = torch.randn(12, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return x0, w, sd.get_sigmas(schedule, steps, SPEC.process)


@pytest.mark.parametrize("name, options", CONFIGS)
@pytest.mark.parametrize("schedule", ["karras", "logsnr"])
def test_gradient_in_each_interior_sigma_matches_finite_differences(name, options, schedule):
    x0, w, base = _setup(schedule=schedule)

    def f(sig: torch.Tensor) -> torch.Tensor:
        return (sd.sample(SPEC.denoiser, x0, sig, name, solver_options=options).x * w).sum()

    s = base.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(f(s), s)
    with torch.no_grad():
        for j in range(1, len(base) - 1):
            h = 1e-6 * float(base[j])
            up, down = base.clone(), base.clone()
            up[j] += h
            down[j] -= h
            fd = float(f(up) - f(down)) / (2 * h)
            assert abs(float(g[j]) - fd) <= 1e-4 * abs(fd) + 1e-7, (j, float(g[j]), fd)
    assert float(g[1:-1].abs().max()) > 1e-4  # the check is not vacuous: the solve depends on its levels


@pytest.mark.parametrize("name, options", CONFIGS)
def test_tensor_levels_give_the_float_paths_samples(name, options):
    """The same solve with 0-d tensor noise levels (no grad) and with floats: equal to rounding."""
    x0, _, base = _setup(steps=6)
    solver = get_solver(name, **options)
    out = []
    for sig in ([float(s) for s in base], list(base.unbind(0))):
        den, state, x = Denoise(SPEC.denoiser), solver.init_state(), x0
        for i in range(len(sig) - 1):
            st = solver.step(den, x, i, sig, state)
            x, state = st.x_next, st.state
        out.append(x)
    torch.testing.assert_close(out[1], out[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["dpmpp_2m", "unipc", "heun"])
def test_checkpointed_solve_gives_the_same_gradient_and_samples(name):
    x0, w, base = _setup()
    grads, xs = [], []
    for checkpoint in (False, True):
        s = base.clone().requires_grad_(True)
        x = x0.clone().requires_grad_(True)
        res = sd.sample(SPEC.denoiser, x, s, name, checkpoint=checkpoint)
        (res.x * w).sum().backward()
        grads.append((s.grad, x.grad))
        xs.append(res.x.detach())
        assert res.nfe == get_solver(name).nfe(base)  # the backward's recomputation is not NFE
    assert torch.equal(xs[0], xs[1])
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_plain_solve_builds_no_graph():
    x0, _, base = _setup()
    res = sd.sample(SPEC.denoiser, x0, base, "dpmpp_2m")
    assert not res.x.requires_grad


def test_scalar_helpers_dispatch_on_type():
    assert isinstance(scalar_expm1(0.3), float) and isinstance(scalar_expm1(torch.tensor(0.3)), torch.Tensor)
    a = scalar_solve([[2.0, 1.0], [1.0, 3.0]], [1.0, 2.0])
    assert all(isinstance(v, float) for v in a)
    t = scalar_solve([[torch.tensor(2.0, dtype=torch.float64), 1.0], [1.0, 3.0]], [1.0, 2.0])
    assert all(isinstance(v, torch.Tensor) for v in t)
    assert [float(v) for v in t] == pytest.approx(a, rel=1e-15)


def test_weight_functions_float_and_tensor_agree():
    pred, corr, b = unipc_weights([-0.7, -1.9], 0.8, 3, "bh2")
    assert all(isinstance(v, float) for v in [*pred, *corr, b])
    tp, tc, tb = unipc_weights([torch.tensor(-0.7, dtype=torch.float64), torch.tensor(-1.9, dtype=torch.float64)],
                               torch.tensor(0.8, dtype=torch.float64), 3, "bh2")
    assert [float(v) for v in [*tp, *tc, tb]] == pytest.approx([*pred, *corr, b], rel=1e-13)
    w = adams_bashforth_weights([3.0, 4.5, 7.0], 3.0, 2.1)
    assert sum(w) == pytest.approx(1.0, rel=1e-14)  # the rule integrates constants exactly
    tw = adams_bashforth_weights([torch.tensor(v, dtype=torch.float64) for v in (3.0, 4.5, 7.0)], 3.0, 2.1)
    assert [float(v) for v in tw] == w
