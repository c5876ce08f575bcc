"""The Stein stabilizer: estimator against the oracle, divergence paths, wrapper neutrality, errors."""

import math

import pytest
import torch

from steindiff import VEProcess, get_sigmas, prior_noise, sample
from steindiff.diagnostics import RhoRecorder
from steindiff.models import GaussianMixture, get_gmm
from steindiff.solvers import Denoise, StepOperator, get_solver
from steindiff.stabilizers import NotDifferentiableError, SteinStabilizer, make_stabilizer
from steindiff.stabilizers.divergence import jvp_quadratic_forms, make_probes, unit_probes, vjp_quadratic_forms

ALL_SOLVERS = ["euler", "heun", "dpmpp_2m", "dpmpp_3m", "unipc", "unipc_bh1", "ipndm", "ipndm_v"]


@pytest.fixture(scope="module")
def gmm():
    return get_gmm("gmm:image64")


def _one_step_gamma(gmm, stab, solver, x, sigmas):
    op = StepOperator(get_solver(solver), Denoise(gmm), 0, sigmas, get_solver(solver).init_state())
    _, _, rec = stab.step(op, x)
    return rec


@pytest.mark.parametrize("coords", ["ve", "vp"])
@pytest.mark.parametrize("solver", ["euler", "heun", "dpmpp_2m"])
def test_stein_estimate_matches_paired_oracle_on_true_marginal(gmm, coords, solver):
    """States drawn from the true marginal with their clean targets: the reference-free Stein
    coefficient equals the oracle gamma* = E<u, x - x*>/E||u||^2 within Monte Carlo error."""
    sigmas = [1.5, 0.6, 0.0]
    diffs = []
    for r in range(6):
        x_star, _ = gmm.sample(600, seed=100 + r, return_labels=True)
        eps = torch.randn(x_star.shape, generator=torch.Generator().manual_seed(200 + r), dtype=torch.float64)
        x = x_star + sigmas[0] * eps  # VE state; VP state is alpha * x, paired with the same x*
        stein = SteinStabilizer("stein", coords=coords, probes=5, seed=r)
        oracle = SteinStabilizer("oracle", coords=coords, clean_target=lambda x_, s_, xs=x_star: xs)
        g_s = _one_step_gamma(gmm, stein, solver, x, sigmas)["gamma_raw"]
        g_o = _one_step_gamma(gmm, oracle, solver, x, sigmas)["gamma_raw"]
        diffs.append(g_s - g_o)
    d = torch.tensor(diffs)
    se = float(d.std() / math.sqrt(len(d)))
    assert abs(float(d.mean())) < 4 * se + 1e-3, (diffs, se)
    # and the estimate is not trivially equal to 1 (the test has power)
    assert abs(g_o - 1.0) > 0.05


def test_oracle_gamma_is_one_over_h_for_euler_in_ve(gmm):
    """Method notes, item 2: with the exact posterior mean as target, Euler's u = h (x - D) and
    gamma* = 1/h, h = (sigma_k - sigma_{k-1}) / sigma_k."""
    sigmas = [2.0, 1.2, 0.0]
    x = gmm.sample(300, sigma=2.0, seed=3)
    rec = _one_step_gamma(gmm, SteinStabilizer("oracle", clean_target=gmm.denoise), "euler", x, sigmas)
    assert rec["gamma_raw"] == pytest.approx(1 / (1 - 1.2 / 2.0), rel=1e-9)


def test_vjp_jvp_exact_divergence_agree():
    g = get_gmm("gmm:toy2d")
    x = g.sample(50, sigma=0.7, seed=1)
    f = lambda z: g.denoise(z, 0.7)  # noqa: E731
    V = make_probes(x, 7, "rademacher", torch.Generator().manual_seed(0))
    xg = x.clone().requires_grad_(True)
    q_vjp = vjp_quadratic_forms(f(xg), xg, V)
    q_loop = vjp_quadratic_forms(f(xg), xg, V, batched=False)
    q_jvp = jvp_quadratic_forms(f, x, V)
    torch.testing.assert_close(q_vjp, q_jvp, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(q_vjp, q_loop, rtol=1e-10, atol=1e-10)
    exact = vjp_quadratic_forms(f(xg), xg, unit_probes(x)).sum(0)
    torch.testing.assert_close(exact, g.divergence(x, 0.7), rtol=1e-9, atol=1e-9)


def test_hutchinson_is_unbiased_for_the_exact_divergence(gmm):
    x = gmm.sample(20, sigma=0.8, seed=2)
    xg = x.clone().requires_grad_(True)
    out = gmm.denoise(xg, 0.8)
    V = make_probes(x, 4000, "gaussian", torch.Generator().manual_seed(1))
    q = vjp_quadratic_forms(out, xg, V)
    est, se = q.mean(0), q.std(0) / math.sqrt(q.shape[0])
    exact = gmm.divergence(x, 0.8)
    assert ((est - exact).abs() < 5 * se + 1e-9).all()


@pytest.mark.parametrize("coords", ["ve", "vp"])
@pytest.mark.parametrize("solver", ALL_SOLVERS)
def test_gamma_one_reproduces_the_plain_solver(gmm, solver, coords):
    """The wrapper is neutral at gamma = 1 for every solver, including multistep history and
    UniPC's corrector: it knows nothing about the solver it wraps."""
    sig = get_sigmas("karras", 6, VEProcess())
    x = prior_noise((64, gmm.dim), float(sig[0]), seed=0, dtype=torch.float64)
    plain = sample(gmm, x, sig, solver).x
    stab = SteinStabilizer("stein", coords=coords, gamma_min=1.0, gamma_max=1.0, probes=1)
    wrapped = sample(gmm, x, sig, solver, stabilizer=stab)
    torch.testing.assert_close(wrapped.x, plain, rtol=1e-12, atol=1e-12)
    assert all(r["gamma"] == 1.0 for r in wrapped.trace)


@pytest.mark.parametrize("solver", ["euler", "heun", "dpmpp_3m"])
def test_nfe_and_extra_pass_accounting(gmm, solver):
    sig = get_sigmas("karras", 4, VEProcess())
    x = prior_noise((32, gmm.dim), float(sig[0]), seed=0, dtype=torch.float64)
    plain = sample(gmm, x, sig, solver)
    for div in ["vjp", "jvp"]:
        res = sample(gmm, x, sig, solver, stabilizer=SteinStabilizer("stein", divergence=div, probes=3))
        assert res.nfe == plain.nfe == get_solver(solver).nfe(sig)
        assert res.extra_passes == 3 * plain.nfe
        assert sum(r["extra_passes"] for r in res.trace) == res.extra_passes


def test_jvp_and_vjp_give_the_same_trajectory(gmm):
    sig = get_sigmas("karras", 4, VEProcess())
    x = prior_noise((40, gmm.dim), float(sig[0]), seed=0, dtype=torch.float64)
    a = sample(gmm, x, sig, "dpmpp_2m", stabilizer=SteinStabilizer("stein", divergence="vjp", seed=5, gamma_max=3))
    b = sample(gmm, x, sig, "dpmpp_2m", stabilizer=SteinStabilizer("stein", divergence="jvp", seed=5, gamma_max=3))
    torch.testing.assert_close(a.x, b.x, rtol=1e-8, atol=1e-8)


def test_trace_fields_and_skip_options(gmm):
    sig = get_sigmas("karras", 4, VEProcess())
    x = prior_noise((32, gmm.dim), float(sig[0]), seed=0, dtype=torch.float64)
    stab = RhoRecorder(make_stabilizer("stein", None, first_step="skip", final_step="skip"), gmm.divergence)
    res = sample(gmm, x, sig, "euler", stabilizer=stab)
    assert res.trace[0]["skipped"] and res.trace[-1]["skipped"]
    mid = res.trace[1]
    for key in ["sigma", "sigma_next", "alpha", "gamma", "gamma_raw", "s_xu", "s_uu", "s_div", "rho", "extra_passes",
                "wall_s"]:
        assert key in mid
    assert mid["gamma"] == max(mid["gamma_raw"], 0.0)


def test_bad_input_errors(gmm):
    with pytest.raises(ValueError, match="probes"):
        SteinStabilizer(probes=0)
    with pytest.raises(ValueError, match="coords"):
        SteinStabilizer(coords="xy")
    sig = get_sigmas("karras", 3, VEProcess())
    x = prior_noise((1, gmm.dim), float(sig[0]), seed=0, dtype=torch.float64)
    with pytest.raises(ValueError, match="at least 2"):
        sample(gmm, x, sig, "euler", stabilizer=SteinStabilizer())
    x = prior_noise((4, gmm.dim), float(sig[0]), seed=0, dtype=torch.float64)
    with pytest.raises(NotDifferentiableError, match="calibrated"):
        sample(lambda z, s: gmm.denoise(z.detach(), s), x, sig, "euler", stabilizer=SteinStabilizer())
    with pytest.raises(ValueError, match="s_uu"):
        sample(lambda z, s: z * 1.0, x, sig, "euler", stabilizer=SteinStabilizer())
    with pytest.raises(ValueError, match="mixture"):
        make_stabilizer("stein-oracle", None)
    with pytest.raises(ValueError, match="unknown stabilizer"):
        make_stabilizer("stien", None)


def test_non_finite_statistics_name_the_step():
    g = GaussianMixture(torch.zeros(1, 3))
    sig = torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64)
    x = torch.ones(4, 3, dtype=torch.float64) * 1e200  # squares overflow to inf in the statistics
    with pytest.raises(FloatingPointError, match="step 0"):
        sample(lambda z, s: z * 0.5, x, sig, "euler", stabilizer=SteinStabilizer(), check_finite=False)
    del g


def test_registry_options_none_means_the_variants_default():
    assert make_stabilizer("stein-energy", None, gamma_min=None).gamma_min == 0.5
    assert make_stabilizer("stein-energy", None, gamma_min=0.0).gamma_min == 0.0  # an explicit 0 is kept
    tr = make_stabilizer("stein-tr", None, gamma_max=None)
    assert (tr.gamma_min, tr.gamma_max) == (0.8, 1.25)
    assert make_stabilizer("stein-exact", get_gmm_spec(), divergence="vjp").divergence == "exact"


def get_gmm_spec():
    return type("Spec", (), {"gmm": get_gmm("gmm:toy2d"), "name": "gmm:toy2d"})()


# ------------------------------------------------------------------ closed forms: Gaussian data
# Data x0 ~ N(0, v I): the exact denoiser is linear, D(x, s) = c(s) x with c(s) = v / (v + s^2), so
# an Euler step is T(x) = t x with t = c + r (1 - c), r = s'/s, and every statistic of the
# stabilizers is a closed form in X = mean ||x||^2.  With the exact divergence (unit probes)
# nothing is random: the coefficients must match to rounding.

V_DATA, DIM = 1.0, 6


def linear_denoiser(x, s):
    return V_DATA / (V_DATA + s.reshape(-1, *([1] * (x.ndim - 1))) ** 2) * x


def _euler_linear(s, s_next):
    c = V_DATA / (V_DATA + s**2)
    return c + (s_next / s) * (1 - c)


def _alphas(coords, s, s_next):
    if coords == "ve":
        return 1.0, 1.0
    return 1 / math.sqrt(1 + s**2), 1 / math.sqrt(1 + s_next**2)


def _linear_step(stab, x, sigmas, i=0):
    op = StepOperator(get_solver("euler"), Denoise(linear_denoiser), i, sigmas, {})
    return stab.step(op, x)


@pytest.mark.parametrize("coords", ["ve", "vp"])
@pytest.mark.parametrize("s,s_next", [(2.0, 1.0), (0.7, 0.3)])
def test_stein_coefficient_closed_form(coords, s, s_next):
    """gamma = ((1 - 1/a) <u, x_c> + (a s)^2 / a (d - (a'/a) div T)) / ||u||^2 with x_c = a x and
    u = (a - a' t) x reduces to ((a - 1) X + s^2 d) / ((a - a' t) X); in VE (a = 1) to
    s^2 d / ((1 - t) X).  Any dropped coordinate factor (alpha, the square on sigma, the VP sigma
    a s) changes the value."""
    x = torch.randn(5, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 1.7
    X = float((x**2).sum(1).mean())
    t = _euler_linear(s, s_next)
    a, a1 = _alphas(coords, s, s_next)
    expected = ((a - 1) * X + s**2 * DIM) / ((a - a1 * t) * X)
    stab = SteinStabilizer("stein", coords=coords, divergence="exact", gamma_min=None)
    x_next, st, rec = _linear_step(stab, x, [s, s_next, 0.0])
    assert rec["gamma_raw"] == pytest.approx(expected, rel=1e-12)
    torch.testing.assert_close(st.x_next, t * x, rtol=1e-14, atol=0)
    torch.testing.assert_close(x_next, (a * x - expected * (a - a1 * t) * x) / a1, rtol=1e-12, atol=0)


def test_stein_coefficient_on_the_marginal_equals_the_oracle_closed_form():
    """On the exact marginal (X = d (v + s^2)) the VE Stein coefficient is the oracle's
    gamma* = E<u, x - x*>/E||u||^2 = s^2 / ((1 - t)(v + s^2)) (x - x* = s eps, u = (1 - t) x)."""
    s, s_next = 1.5, 0.6
    x = torch.randn(4, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x = x * math.sqrt(DIM * (V_DATA + s**2) / float((x**2).sum(1).mean()))
    t = _euler_linear(s, s_next)
    rec = _linear_step(SteinStabilizer("stein", divergence="exact", gamma_min=None), x, [s, s_next, 0.0])[2]
    assert rec["gamma_raw"] == pytest.approx(s**2 / ((1 - t) * (V_DATA + s**2)), rel=1e-12)


@pytest.mark.parametrize("coords", ["ve", "vp"])
def test_lookahead_coefficient_closed_form(coords):
    """stein-sc: the clean target of x is D(T(x), s') = c' t x, so
    gamma = <u, x_c - c' t x> / ||u||^2 = (a - c' t) / (a - a' t); one extra model pass per step.
    At a final step to sigma = 0 the target is T(x) itself and gamma = 1."""
    s, s_next = 2.0, 0.8
    x = torch.randn(5, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    t = _euler_linear(s, s_next)
    c1 = V_DATA / (V_DATA + s_next**2)
    a, a1 = _alphas(coords, s, s_next)
    stab = make_stabilizer("stein-sc", None, coords=coords, gamma_min=None)
    x_next, _, rec = _linear_step(stab, x, [s, s_next, 0.0])
    expected = (a - c1 * t) / (a - a1 * t)
    assert abs(expected - 1) > 0.1
    assert rec["gamma_raw"] == pytest.approx(expected, rel=1e-12)
    assert rec["nfe_step"] == 2 and rec["extra_passes"] == 0
    torch.testing.assert_close(x_next, (a * x - expected * (a - a1 * t) * x) / a1, rtol=1e-12, atol=0)
    rec_last = _linear_step(stab, x, [s, s_next, 0.0], i=1)[2]
    assert rec_last["gamma_raw"] == pytest.approx(1.0, rel=1e-12)


@pytest.mark.parametrize("variant,options", [
    ("stein", {"divergence": "exact"}),
    ("stein-sc", {}),
    ("stein-energy", {"divergence": "exact", "energy_from": "each", "min_sensitivity": 0.0}),
])
@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_per_sample_gamma_is_the_batch_formula_on_each_sample_alone(variant, options, solver):
    """per_sample=True gives sample i the coefficient (and clip) that the batch formula gives a
    batch made of sample i alone (two copies of it: batch means are then its own statistics)."""
    g = get_gmm("gmm:toy2d")
    sigmas = [1.2, 0.5, 0.0]
    x = g.sample(6, sigma=sigmas[0], seed=4)

    def run(xb, per_sample, lo=None, hi=None):
        stab = make_stabilizer(variant, type("S", (), {"gmm": g, "name": "g"})(), per_sample=per_sample, **options)
        stab.gamma_min, stab.gamma_max = lo, hi
        op = StepOperator(get_solver(solver), Denoise(g), 0, sigmas, get_solver(solver).init_state())
        return stab.step(op, xb)

    def alone(i, lo=None, hi=None):
        return run(torch.cat([x[i : i + 1]] * 2), False, lo, hi)

    raw = sorted(alone(i)[2]["gamma_raw"] for i in range(x.shape[0]))
    assert raw[-1] - raw[0] > 0.1  # the samples' coefficients differ
    lo, hi = (raw[0] + raw[1]) / 2, (raw[-2] + raw[-1]) / 2  # clips the extreme ones only
    x_ps, _, rec = run(x, True, lo, hi)
    runs = [alone(i, lo, hi) for i in range(x.shape[0])]
    torch.testing.assert_close(x_ps, torch.cat([r[0][:1] for r in runs]), rtol=1e-10, atol=1e-12)
    assert rec["gamma"] == pytest.approx(sum(r[2]["gamma"] for r in runs) / len(runs), rel=1e-12)
    assert rec["gamma_raw"] == pytest.approx(sum(raw) / len(raw), rel=1e-12)


def test_stein_matches_the_oracle_at_a_later_multistep_step(gmm):
    """dpmpp_2m at step 2 (second order, its history from steps 0 and 1): with x_2 = x* + s_2 eps and
    fresh eps, Stein's identity holds given x* and the history, so the reference-free coefficient
    equals the paired oracle within Monte Carlo error."""
    sigmas = [float(s) for s in get_sigmas("karras", 4, VEProcess())]
    solver = get_solver("dpmpp_2m")
    assert solver.step_order(2, sigmas) == 2
    diffs, g_first = [], []
    for r in range(6):
        x_star = gmm.sample(500, seed=300 + r)
        gen = torch.Generator().manual_seed(400 + r)
        x = x_star + sigmas[0] * torch.randn(x_star.shape, generator=gen, dtype=torch.float64)
        state, den = solver.init_state(), Denoise(gmm)
        for i in range(2):  # the plain solver's history
            st = solver.step(den, x, i, sigmas, state)
            x, state = st.x_next, st.state
        x2 = x_star + sigmas[2] * torch.randn(x_star.shape, generator=gen, dtype=torch.float64)
        out = []
        for est in (SteinStabilizer("stein", probes=5, seed=r),
                    SteinStabilizer("oracle", clean_target=lambda x_, s_, xs=x_star: xs)):
            op = StepOperator(solver, Denoise(gmm), 2, sigmas, state)
            out.append(est.step(op, x2)[2]["gamma_raw"])
        diffs.append(out[0] - out[1])
        # the first-order step (DPM-Solver++ order 1 = Euler) from the same state has another
        # coefficient: the history term matters here
        op1 = StepOperator(get_solver("euler"), Denoise(gmm), 2, sigmas, {})
        oracle = SteinStabilizer("oracle", clean_target=lambda x_, s_, xs=x_star: xs)
        g_first.append(oracle.step(op1, x2)[2]["gamma_raw"])
    d = torch.tensor(diffs)
    se = float(d.std() / math.sqrt(len(d)))
    assert abs(float(d.mean())) < 4 * se + 1e-3, (diffs, se)
    assert abs(out[1] - g_first[-1]) > 10 * (4 * se + 1e-3)
