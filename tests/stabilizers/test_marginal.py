"""stein-energy (energy matching to the next marginal): the corrected batch reaches the target
energy, the root nearest 1 is taken, the clip applies, and gamma falls back to 1 where no root
exists or the quadratic is ill-conditioned.

Closed-form setting: data x0 ~ N(0, v I), exact denoiser D(x, s) = c x with c = v / (v + s^2).
Tweedie's second-order identity then gives E||x0||^2 = c^2 X + s^2 c d = d v exactly when
X = mean ||x||^2 = d (v + s^2) (the marginal's energy), and the next marginal's energy is
d (v + s'^2) in VE coordinates: both are known without the stabilizer's formulas."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from steindiff.solvers import Denoise, StepOperator, get_solver
from steindiff.stabilizers import make_stabilizer
from steindiff.stabilizers.marginal import EnergyMatchingStabilizer

V_DATA, DIM = 0.8, 5


def linear_denoiser(x, s):
    return V_DATA / (V_DATA + s.reshape(-1, *([1] * (x.ndim - 1))) ** 2) * x


def on_marginal(n: int, sigma: float, seed: int, scale: float = 1.0) -> torch.Tensor:
    """n states whose batch energy is exactly scale^2 * d (v + sigma^2)."""
    x = torch.randn(n, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return x * scale * math.sqrt(DIM * (V_DATA + sigma**2) / float((x**2).sum(1).mean()))


def energy(x: torch.Tensor) -> float:
    return float((x**2).sum(1).mean())


def step(stab, x, sigmas, i=0, solver="euler", state=None):
    s = get_solver(solver)
    op = StepOperator(s, Denoise(linear_denoiser), i, sigmas, s.init_state() if state is None else state)
    return stab.step(op, x)


def energy_stab(**kw) -> EnergyMatchingStabilizer:
    base = dict(divergence="exact", gamma_min=None, gamma_max=None, min_sensitivity=0.0)
    return EnergyMatchingStabilizer(**{**base, **kw})


@pytest.mark.parametrize("coords", ["ve", "vp"])
@pytest.mark.parametrize("solver", ["euler", "heun"])
@pytest.mark.parametrize("s,s_next", [(3.0, 1.2), (0.9, 0.4)])
def test_corrected_batch_reaches_the_next_marginal_energy(coords, solver, s, s_next):
    x = on_marginal(7, s, seed=1)
    x_next, _, rec = step(energy_stab(coords=coords), x, [s, s_next, 0.0], solver=solver)
    # the data energy estimate (Tweedie: ||D||^2 + sigma^2 div D) is exact on Gaussian data
    assert rec["s_e0"] == pytest.approx(DIM * V_DATA, rel=1e-12)
    assert energy(x_next) == pytest.approx(DIM * (V_DATA + s_next**2), rel=1e-10)
    assert abs(rec["gamma"] - 1) > 1e-3  # the plain step misses the target: the correction acts


@pytest.mark.parametrize("coords", ["ve", "vp"])
def test_euler_root_closed_form(coords):
    """Euler: T(x) = t x, x_c = a x, u = (a - a' t) x; the corrected energy (a - g k)^2 X with
    k = a - a' t equals the target a'^2 d (v + s'^2) at g = (a -+ a' sqrt(d (v + s'^2) / X)) / k,
    and the root nearest 1 is the minus one here."""
    s, s_next = 2.0, 1.0
    x = on_marginal(6, s, seed=2)
    X = energy(x)
    c = V_DATA / (V_DATA + s**2)
    t = c + (s_next / s) * (1 - c)
    a, a1 = (1.0, 1.0) if coords == "ve" else (1 / math.sqrt(1 + s**2), 1 / math.sqrt(1 + s_next**2))
    k = a - a1 * t
    q = a1 * math.sqrt(DIM * (V_DATA + s_next**2) / X)
    roots = sorted(((a - q) / k, (a + q) / k), key=lambda r: abs(r - 1))
    assert abs(roots[0] - roots[1]) > 1
    rec = step(energy_stab(coords=coords), x, [s, s_next, 0.0])[2]
    assert rec["gamma_raw"] == pytest.approx(roots[0], rel=1e-10)


def test_default_clip_and_its_bounds():
    """The default clip is [0.5, 1.5]; a raw root outside it is clipped and the update uses the
    clipped value.  A batch with 4x the marginal's energy needs a large step: root ~ 1.7."""
    stab = make_stabilizer("stein-energy", None, divergence="exact", min_sensitivity=0.0)
    assert (stab.gamma_min, stab.gamma_max) == (0.5, 1.5)
    s, s_next = 2.0, 1.0
    for scale, bound in ((2.0, 1.5), (0.3, 0.5)):
        x = on_marginal(6, s, seed=3, scale=scale)
        x_next, st, rec = step(stab, x, [s, s_next, 0.0])
        assert rec["gamma"] == bound and abs(rec["gamma_raw"] - bound) > 0.05
        torch.testing.assert_close(x_next, x - bound * (x - st.x_next), rtol=1e-12, atol=1e-12)
    # inside the clip: untouched
    rec = step(stab, on_marginal(6, s, seed=3), [s, s_next, 0.0])[2]
    assert 0.5 < rec["gamma"] == rec["gamma_raw"] < 1.5


def test_ill_conditioned_step_falls_back_to_the_plain_solver():
    """A tiny step (s' = 0.99 s) barely changes the energy: |d energy / d gamma| / target at the
    root is ~0.01 < min_sensitivity = 0.05, so gamma = 1 and the step is the plain solver's."""
    s, s_next = 1.0, 0.99
    x = on_marginal(6, s, seed=4)
    x_next, st, rec = step(EnergyMatchingStabilizer(divergence="exact"), x, [s, s_next, 0.0])
    assert rec["gamma_raw"] == 1.0 and rec["gamma"] == 1.0
    torch.testing.assert_close(x_next, st.x_next, rtol=0, atol=0)
    # without the guard the root is taken
    assert step(energy_stab(), x, [s, s_next, 0.0])[2]["gamma_raw"] != 1.0


def test_data_energy_from_the_first_step_is_reused():
    """energy_from="first": the data energy is estimated at the first step (no Jacobian products
    later) and the later targets use it, so a batch pushed off the marginal at step 0 (clip) still
    lands on the energy d (v + s_2^2) after step 1; "each" re-estimates it from the off-marginal
    batch and lands elsewhere."""
    sig = [3.0, 1.5, 0.6, 0.0]
    x = on_marginal(6, sig[0], seed=5)
    out = {}
    for mode in ("first", "each"):
        stab = energy_stab(energy_from=mode, gamma_min=1.0)
        state = get_solver("euler").init_state()
        x1, _, r0 = step(stab, x, sig, 0, state=state)
        assert r0["gamma"] == 1.0 > r0["gamma_raw"] + 0.02  # clipped: x1 is off the marginal
        stab.gamma_min = None
        x2, _, r1 = step(stab, x1, sig, 1, state=state)
        out[mode] = (energy(x2), r1)
    assert out["first"][0] == pytest.approx(DIM * (V_DATA + sig[2] ** 2), rel=1e-10)
    assert out["first"][1]["extra_passes"] == 0 and out["each"][1]["extra_passes"] > 0
    assert abs(out["each"][0] / (DIM * (V_DATA + sig[2] ** 2)) - 1) > 0.01


# ------------------------------------------------------------------ the coefficient alone
# coefficient(m, s) with batch means m = {xx, xu, uu, e0}; with sigma' = 0 and VE coordinates the
# target is e0 itself.  The quadratic uu g^2 - 2 xu g + (xx - target) = 0 is built from its roots.


def _means(r1: float, r2: float, target: float = 4.0, uu: float = 1.0) -> dict:
    return {"uu": uu, "xu": uu * (r1 + r2) / 2, "xx": target + uu * r1 * r2, "e0": target}


STATS = SimpleNamespace(alpha_next=1.0, op=SimpleNamespace(sigma_next=0.0), dim=DIM)


@pytest.mark.parametrize("r1,r2,expected", [
    (0.1, 1.3, 1.3),  # the larger root is nearer 1
    (0.95, 2.0, 0.95),  # the smaller one
    (0.5, 0.9, 0.9),  # both below 1
    (-0.8, 1.6, 1.6),
])
def test_the_root_nearest_one_is_taken(r1, r2, expected):
    stab = EnergyMatchingStabilizer(energy_from="each")
    assert stab.coefficient(_means(r1, r2), STATS) == pytest.approx(expected, rel=1e-12)
    m = _means(r1, r2)
    g = expected
    assert m["xx"] - 2 * g * m["xu"] + g**2 * m["uu"] == pytest.approx(m["e0"], rel=1e-12)


def test_no_root_or_flat_root_gives_one():
    stab = EnergyMatchingStabilizer(energy_from="each")
    # no real root: the lowest reachable energy xx - xu^2/uu exceeds the target
    m = {"uu": 1.0, "xu": 0.7, "xx": 5.0, "e0": 4.0}
    assert m["xx"] - m["xu"] ** 2 / m["uu"] > m["e0"]
    assert stab.coefficient(m, STATS) == 1.0
    # roots 0.68 and 0.72: at 0.72 |d energy/d gamma| / target = 2 * 0.02 / 4 = 0.01 < 0.05
    assert stab.coefficient(_means(0.68, 0.72), STATS) == 1.0
    assert EnergyMatchingStabilizer(energy_from="each", min_sensitivity=0.001).coefficient(
        _means(0.68, 0.72), STATS) == pytest.approx(0.72, rel=1e-12)


def test_per_sample_coefficient_equals_the_scalar_one():
    cases = [(0.1, 1.3), (0.95, 2.0), (0.68, 0.72), (0.5, 0.9)]
    ms = [_means(*c) for c in cases] + [{"uu": 1.0, "xu": 0.7, "xx": 5.0, "e0": 4.0}]
    stab = EnergyMatchingStabilizer(energy_from="each")
    per = stab.coefficient({k: torch.tensor([m[k] for m in ms], dtype=torch.float64) for k in ms[0]}, STATS)
    assert per.tolist() == pytest.approx([stab.coefficient(m, STATS) for m in ms], rel=1e-12)
