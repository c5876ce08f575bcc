"""LD3 (steindiff.peers.ld3): built on the gradient engine, the plan it returns, its parameters and its window,
its soft teacher forcing, and that its fit moves the few-step solve toward the teacher."""

import json
import math

import pytest
import torch

import steindiff as sd
from steindiff.bench.peers import PEERS, fit_peer
from steindiff.models.gmm import get_gmm
from steindiff.peers import ld3_plan
from steindiff.peers.ld3 import DEFAULT_PAIRS, DEFAULT_RADIUS, LD3_PARAMS, model_sigma_bounds
from steindiff.trajectory import reference_solve

GMM = get_gmm("gmm:toy2d")
SIGMA_MIN = 0.002


@pytest.fixture(scope="module")
def pairs():
    noise = sd.prior_noise((120, 2), 80.0, seed=12345, dtype=torch.float64)
    return noise, reference_solve(GMM, noise, 80.0, SIGMA_MIN, steps=60)


def _rms(plan, x, target):
    y = sd.sample(GMM, x, plan.sigmas, plan.solver, stabilizer=plan.stabilizer())
    return float((y.x - target).pow(2).mean().sqrt()), y.nfe


def test_ld3_plan_is_valid_applies_at_the_plain_nfe_and_moves_toward_the_teacher(pairs):
    noise, ref = pairs
    base = sd.make_plan(sd.VEProcess(SIGMA_MIN, 80.0), "dpmpp_2m", 4, "karras")
    plan = ld3_plan(GMM, base, noise, ref, sigma_min=SIGMA_MIN, max_iters=30, radius=0.0)
    rec = plan.meta["ld3"]
    # the documented parameters: interior levels and decoupled model levels, nothing else
    assert rec["params"] == list(LD3_PARAMS) == ["steps", "model_sigmas"]
    assert plan.gammas is None and plan.history is None and len(plan.model_sigmas) == base.steps
    assert rec["pairs"] == DEFAULT_PAIRS and rec["n_fit"] == DEFAULT_PAIRS // 2
    assert rec["distance"]["loss"] == "l2" and rec["teacher"] == {"solver": ref.solver, "steps": ref.steps}
    # a valid plan: same start, strictly decreasing, ends at 0, the model's levels within LD3's window
    assert plan.sigmas[0] == base.sigmas[0] and plan.sigmas[-1] == 0 and len(plan.sigmas) == len(base.sigmas)
    assert bool((plan.sigmas[1:] < plan.sigmas[:-1]).all())
    bounds = model_sigma_bounds(base)
    assert bounds[0] == 0.0 and plan.model_sigmas[0] == pytest.approx(float(plan.sigmas[0]))
    for s, m, b in zip(plan.sigmas[:-1].tolist(), plan.model_sigmas, bounds):
        assert abs(math.log(m / s)) <= b + 1e-9
    assert not torch.equal(plan.sigmas, base.sigmas)  # the fit moved the levels
    # the sampler applies it at the plain solver's model passes
    fit = slice(0, rec["n_fit"])
    before, nfe_plain = _rms(base, noise[fit], ref.final[fit])
    after, nfe = _rms(plan, noise[fit], ref.final[fit])
    assert nfe == nfe_plain == base.nfe
    assert rec["fit"]["val_best"] < rec["fit"]["val_start"]  # the held-out half improved
    assert after < 0.9 * before  # and on the fit noise the solve came closer to the teacher


def test_ld3_window_and_soft_teacher_forcing_are_the_papers(pairs, monkeypatch):
    noise, ref = pairs
    base = sd.make_plan(sd.VEProcess(SIGMA_MIN, 80.0), "euler", 3, "logsnr")
    levels = base.sigmas[:-1].tolist()
    gaps = [math.log(a / b) for a, b in zip(levels, levels[1:])]
    assert model_sigma_bounds(base) == pytest.approx([0.0, 0.5 * min(gaps), 0.5 * min(gaps)]) and min(gaps) > 0
    seen = {}
    import steindiff.peers.ld3 as ld3_module

    real = ld3_module.gradient_fit

    def spy(*args, **kwargs):
        seen.update(kwargs, n_fit=len(args[2]))
        return real(*args, **kwargs)

    monkeypatch.setattr(ld3_module, "gradient_fit", spy)
    plan = ld3_plan(GMM, base, noise, ref, sigma_min=SIGMA_MIN, pairs=40, max_iters=4)
    # the ball of radius r sigma_T around the teacher's noise, in the engine's units (relative to ||x_T||)
    assert seen["teacher_ball"] == pytest.approx(DEFAULT_RADIUS / math.sqrt(2))
    assert seen["params"] == LD3_PARAMS and seen["n_fit"] == 20 and len(seen["val_noise"]) == 20
    assert plan.meta["ld3"]["teacher_ball"] == seen["teacher_ball"]


def test_ld3_is_a_bench_peer_and_refuses_bad_input(pairs):
    noise, ref = pairs
    base = sd.make_plan(sd.VEProcess(SIGMA_MIN, 80.0), "euler", 3, "karras")
    assert "LD3" in PEERS["ld3"].paper and "L2" in PEERS["ld3"].distance
    plan = fit_peer("peer:ld3", GMM, base, noise, ref, sigma_min=SIGMA_MIN)
    assert plan.meta["peer"]["name"] == "ld3" and plan.meta["ld3"]["fit"]["iters"] >= 1
    with pytest.raises(ValueError, match="pairs"):
        ld3_plan(GMM, base, noise, ref, sigma_min=SIGMA_MIN, pairs=2)
    with pytest.raises(ValueError, match="do not match"):
        ld3_plan(GMM, base, noise[:10], ref, sigma_min=SIGMA_MIN)
    with pytest.raises(ValueError, match="radius"):
        ld3_plan(GMM, base, noise, ref, sigma_min=SIGMA_MIN, radius=-1)


def test_bench_runs_ld3_beside_gits(tmp_path, capsys):
    from steindiff.cli import main

    j, md = tmp_path / "r.json", tmp_path / "r.md"
    assert main(["bench", "--model", "gmm:toy2d", "--solvers", "euler", "--nfe", "3", "--schedules", "karras",
                 "--coords", "ve", "--stabilizers", "none,peer:ld3", "--peers", "gits,ld3", "--seeds", "0", "--n",
                 "32", "--ref-steps", "20", "--calibration-solves", "5", "--no-progress", "--json-out", str(j),
                 "--markdown", str(md)]) == 0
    capsys.readouterr()
    res = json.loads(j.read_text())
    rows = {r["stabilizer"]: r for r in res["rows"]}
    assert set(rows) == {"none", "peer:gits", "peer:ld3"}
    ld3 = rows["peer:ld3"]
    assert ld3["status"] == "ok" and ld3["nfe"] == rows["none"]["nfe"]
    assert ld3["peer"]["name"] == "ld3" and ld3["peer"]["record"]["params"] == ["steps", "model_sigmas"]
    assert "### peer:ld3 (a peer)" in md.read_text()
