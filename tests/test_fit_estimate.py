"""steindiff.fit_estimate: the announced calibration time against the fit's own, on a fake clock (the mechanism:
what is timed and how it is counted) and on the real one (a small fit, generous bounds)."""

import time

import pytest
import torch

import steindiff.calibration as cal
from steindiff.fit_estimate import describe_seconds, estimate_fit
from steindiff.models.gmm import get_gmm
from steindiff.models.registry import ModelSpec, load_model
from steindiff.noise import VEProcess
from steindiff.plan import make_plan


class FakeClock:
    """``time.perf_counter`` that only model passes advance: ``fixed + per_sample * batch`` seconds each, and the
    very first pass ``first`` seconds more (a slow start: lazy initialisation, first allocations)."""

    def __init__(self, fixed: float, per_sample: float, first: float = 0.0):
        self.t, self.fixed, self.per_sample, self.first = 1000.0, fixed, per_sample, first

    def __call__(self) -> float:
        return self.t

    def model(self, inner):
        def denoise(x, sigma, **kw):
            self.t += self.fixed + self.per_sample * x.shape[0] + self.first
            self.first = 0.0
            return inner(x, sigma, **kw)
        return denoise


@pytest.mark.parametrize("solver,nfe,budget", [("euler", 4, {"max_solves": 12}), ("heun", 5, {"max_solves": 8}),
                                               ("dpmpp_2m", 6, {"max_solves": 400, "max_seconds": 3.0})])
def test_the_estimate_counts_what_the_fit_does_on_a_fake_clock(monkeypatch, solver, nfe, budget):
    """Model passes cost fake seconds (a fixed part and a part per sample, so batch sizes matter); everything
    else is free.  The estimate, measured on the model, must then give the fit's own duration: the reference
    solve and its check on the whole batch, the refinements on half of it (by solves, or by their time
    budget), the closed form and the validation.  A slow first pass must not inflate it."""
    clock = FakeClock(fixed=0.002, per_sample=0.0005, first=5.0)
    monkeypatch.setattr(time, "perf_counter", clock)
    gmm = get_gmm("gmm:toy2d")
    spec = ModelSpec("fake-clock", clock.model(gmm), VEProcess(0.002, 80.0), (2,), fingerprint="fake-clock-v1")
    base = make_plan(spec.process, solver, nfe, "karras")
    opts = cal.calibration_options(spec, objective="trajectory", n=64, ref_steps=24, dtype="float64", **budget)
    est = estimate_fit(spec, base, opts)
    assert est.measured and est.batch == 64
    t0 = clock.t
    sched = cal.calibrate(spec, base, **opts)
    took = clock.t - t0
    refine = list(sched.meta["calibration"]["refine"].values())
    assert all(r["stopped"] == "budget" for r in refine)  # the case the estimate counts: budgets used up
    assert 0.85 < est.seconds / took < 1.15, (est, took)


def test_the_estimate_holds_on_the_real_clock():
    """A small fit on a fast model: the announced time within a factor 2 of the measured one.  Timing on a
    shared machine is noisy, so three tries; a wrong count or a one-time cost in the wrong place fails all."""
    spec = load_model("gmm:image64")
    base = make_plan(spec.process, "unipc", 5, "karras")
    opts = cal.calibration_options(spec, objective="trajectory", n=128, ref_steps=40, max_solves=24)
    ratios = []
    for _ in range(3):
        est = estimate_fit(spec, base, opts)
        t0 = time.perf_counter()
        sched = cal.calibrate(spec, base, **opts)
        ratios.append(est.seconds / (time.perf_counter() - t0))
        if all(r["stopped"] == "budget" for r in sched.meta["calibration"]["refine"].values()) and \
                0.5 <= ratios[-1] <= 2.0:
            break
    assert 0.5 <= ratios[-1] <= 2.0, ratios


@pytest.mark.parametrize("fixed,per_sample", [(0.0, 0.01), (0.3, 0.0005)])
def test_a_bounded_probe_extends_passes_to_the_batch(monkeypatch, fixed, per_sample):
    """With ``probe_seconds`` the passes stop at the batch reached in that time and are extended to the whole
    batch along a line through the two largest batches timed: on a model whose passes cost a fixed time plus a
    time per sample (a CPU; a GPU, where small batches cost the same) that is exact, and scaling the largest
    batch's time in proportion would not be (it is 30x too long in the second case)."""
    clock = FakeClock(fixed=fixed, per_sample=per_sample)
    monkeypatch.setattr(time, "perf_counter", clock)
    gmm = get_gmm("gmm:toy2d")
    spec = ModelSpec("fake-clock", clock.model(gmm), VEProcess(0.002, 80.0), (2,), fingerprint="fake-clock-v1")
    base = make_plan(spec.process, "euler", 4, "karras")
    opts = cal.calibration_options(spec, objective="trajectory", n=4096)
    full = estimate_fit(spec, base, opts)
    bounded = estimate_fit(spec, base, opts, probe_seconds=1.0)
    assert bounded.batch < 4096 and not bounded.measured and full.measured
    assert bounded.probe_s < full.probe_s / 3
    assert bounded.seconds == pytest.approx(full.seconds, rel=0.05)


def test_durations_read_as_people_read_them():
    assert describe_seconds(0.2) == "about 1 s" and describe_seconds(42) == "about 42 s"
    assert describe_seconds(540) == "about 9 min" and describe_seconds(9000) == "about 2.5 h"
    assert describe_seconds(float("inf")) == "an unknown time"


def test_conditioning_rows_follow_the_timed_batch():
    seen = []

    def model(x, sigma, label=None):
        seen.append((x.shape[0], None if label is None else label.shape[0]))
        return x

    spec = ModelSpec("cond", model, VEProcess(0.002, 80.0), (2,), fingerprint="cond-v1")
    base = make_plan(spec.process, "euler", 3, "karras")
    opts = cal.calibration_options(spec, objective="trajectory", n=16, ref_steps=8, max_solves=2)
    estimate_fit(spec, base, opts, extra_args={"label": torch.arange(16)})
    assert seen and all(b == rows for b, rows in seen)


def test_a_gradient_fit_is_counted_by_its_adam_steps_within_its_time_budget():
    """The gradient fit's estimate: the reference solve, then Adam steps whose cost grows with their number and
    with the mini-batch, one fit per learning rate, capped by the time budget; the derivative-free count is
    another (it does not depend on the Adam steps)."""
    from steindiff.fit_estimate import fit_seconds

    spec = load_model("gmm:toy2d")
    units = {"ref_step_s": 0.01, "solve_s": 0.1, "pass_s": 0.02}

    def est(max_seconds=None, **g):
        o = cal.calibration_options(spec, objective="trajectory", n=256, ref_steps=50, fit_method="gradient",
                                    gradient_options=g or None, max_seconds=max_seconds or 1e9)
        return fit_seconds(o, **units)

    few, many = est(max_iters=10, lr=0.03), est(max_iters=100, lr=0.03)
    assert many - few == pytest.approx(90 * 2.5 * 0.1 * 64 / 128 * 1.2)  # per Adam step: 2.5 solves of a batch
    assert est(max_iters=100, lr=[0.03, 0.1]) - est(max_iters=0, lr=[0.03, 0.1]) == pytest.approx(2 * (many - est(
        max_iters=0, lr=0.03)))  # one fit per learning rate
    assert est(max_iters=100, batch_size=32, lr=0.03) < many
    assert est(max_seconds=5.0, max_iters=10_000, lr=0.03) < est(max_seconds=50.0, max_iters=10_000, lr=0.03) < \
        est(max_iters=10_000, lr=0.03)
    plain = cal.calibration_options(spec, objective="trajectory", n=256, ref_steps=50, max_seconds=1e9)
    assert "gradient" not in plain and fit_seconds(plain, **units) != few


def test_a_feature_distance_and_the_residual_term_each_add_three_model_passes_per_adam_step():
    """Each runs a network forward and backward on the mini-batch: about 3 model passes of it per Adam step."""
    from steindiff.distances import LaplacianPyramid
    from steindiff.fit_estimate import fit_seconds

    spec = load_model("gmm:toy2d")
    units = {"ref_step_s": 0.01, "solve_s": 0.1, "pass_s": 0.02}

    def est(iters, **loss):
        o = cal.calibration_options(spec, objective="trajectory", n=256, ref_steps=50, fit_method="gradient",
                                    gradient_options={"max_iters": iters, "lr": 0.03}, max_seconds=1e9, **loss)
        return fit_seconds(o, **units)

    per_step_passes = 3 * 0.02 * 64 / 128 * 1.2  # 3 passes of a 64-pair batch (pass_s is on the 128-sample fit half)
    l2 = est(100) - est(0)
    feats = est(100, loss="features", features=LaplacianPyramid((1.0, 1.0))) - est(0, loss="features",
                                                                                  features=LaplacianPyramid((1.0, 1.0)))
    both = est(100, loss="features", features=LaplacianPyramid((1.0, 1.0)), residual_weight=1.0) - est(
        0, loss="features", features=LaplacianPyramid((1.0, 1.0)), residual_weight=1.0)
    assert feats - l2 == pytest.approx(100 * per_step_passes)
    assert both - l2 == pytest.approx(200 * per_step_passes)


def test_a_gits_start_counts_one_pass_per_level_and_heun_one_more_per_jump():
    """GITS's cost matrix (steindiff.peers.gits.gits_cost_matrix) runs one model pass of the fit half per level
    of its grid; heun evaluates the model at each jump's end too, one more pass per jump between two levels
    above 0.  The estimate counts what the cost matrix counts on a real grid."""
    from steindiff.fit_estimate import fit_seconds, gits_passes
    from steindiff.peers.gits import gits_cost_matrix

    spec = load_model("gmm:toy2d")
    units = {"ref_step_s": 0.01, "solve_s": 0.1, "pass_s": 0.02}
    sig = [80.0, 10.0, 2.0, 0.5, 0.1, 0.0]
    states = torch.randn(len(sig), 8, 2, dtype=torch.float64)
    for solver in ("euler", "heun", "dpmpp_2m"):
        _, passes = gits_cost_matrix(spec.denoiser, solver, sig, states)
        assert gits_passes(solver, levels=len(sig) - 1) == passes
    assert gits_passes("heun") > 10 * gits_passes("euler") == 10 * gits_passes("unipc")

    def est(start, solver):
        o = cal.calibration_options(spec, objective="trajectory", n=256, ref_steps=50, fit_method="gradient",
                                    gradient_options={"max_iters": 10, "lr": 0.03, "start": start}, max_seconds=1e9)
        return fit_seconds(o, **units, solver=solver)

    for solver in ("euler", "heun"):
        assert est("gits", solver) - est("plain", solver) == pytest.approx(gits_passes(solver) * units["pass_s"])
