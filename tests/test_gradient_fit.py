"""The gradient fit of the calibrated sampler (steindiff/gradient_fit.py): it fits what it says it fits, what it
fits is what sampling applies, bad models and diverging fits are refused or stopped with a message, and it
goes through calibrate(), the cache and the CLI.  Small exact mixtures, few Adam steps."""

from __future__ import annotations

import json
import math

import pytest
import torch

import steindiff as sd
from steindiff.calibration import calibrated_plan, calibration_key, gradient_fit_options
from steindiff.gradient_fit import check_params, fit_trajectory_gradient, gradient_fit
from steindiff.models import get_gmm
from steindiff.models.registry import load_model
from steindiff.stabilizers.base import NotDifferentiableError
from steindiff.stabilizers.schedule import load_gamma_schedule
from steindiff.trajectory import reference_solve

GMM = get_gmm("gmm:toy2d")
ALL = ("steps", "gamma", "model_sigmas", "history")


@pytest.fixture(scope="module")
def pairs():
    noise = sd.prior_noise((160, 2), 80.0, seed=12345, dtype=torch.float64)
    ref = reference_solve(GMM, noise, 80.0, 0.002, steps=60)
    return noise, ref


def _rms(plan, x, target):
    y = sd.sample(GMM, x, plan.sigmas, plan.solver, stabilizer=plan.stabilizer()).x
    return float((y - target).pow(2).mean().sqrt())


@pytest.mark.parametrize("params", [("steps",), ("gamma",), ("model_sigmas",), ("history",), ALL])
def test_each_parameter_set_fits_and_only_what_it_names(pairs, params):
    noise, ref = pairs
    base = sd.make_plan(sd.VEProcess(), "dpmpp_2m", 4, "karras")
    plan, info = gradient_fit(GMM, base, noise[:96], ref.final[:96], val_noise=noise[96:128],
                              val_target=ref.final[96:128], sigma_floor=0.002, params=params, max_iters=40,
                              val_every=5, lr=0.03)
    assert info["val_best"] < info["val_start"]  # the held-out loss went down
    assert _rms(plan, noise[128:], ref.final[128:]) < _rms(base, noise[128:], ref.final[128:])
    assert torch.equal(plan.sigmas, base.sigmas) == ("steps" not in params)
    assert (plan.gammas == [1.0] * 4) == ("gamma" not in params)
    assert plan.gammas[-2:] == [1.0, 1.0]  # the plain tail
    assert (plan.model_sigmas is None) == ("model_sigmas" not in params)
    assert (plan.history is None) == ("history" not in params)
    # the plan is the same solve at sampling time, at the plain NFE
    res = sd.sample(GMM, noise[:8], plan.sigmas, "dpmpp_2m", stabilizer=plan.stabilizer())
    assert res.nfe == 4 and res.extra_passes == 0


def test_the_fit_keeps_the_best_held_out_parameters(pairs):
    noise, ref = pairs
    base = sd.make_plan(sd.VEProcess(), "euler", 4, "karras")
    plan, info = gradient_fit(GMM, base, noise[:96], ref.final[:96], val_noise=noise[96:128],
                              val_target=ref.final[96:128], sigma_floor=0.002, params="steps,gamma", max_iters=30,
                              val_every=5, patience=100)
    # the returned plan's held-out loss is the best recorded one (recomputed here from the plan alone)
    plain = sd.sample(GMM, noise[:96], base.sigmas, "euler").x
    scale = float((plain - ref.final[:96]).pow(2).mean())
    y = sd.sample(GMM, noise[96:128], plan.sigmas, "euler", stabilizer=plan.stabilizer()).x
    assert float((y - ref.final[96:128]).pow(2).mean()) / scale == pytest.approx(info["val_best"], rel=1e-9)
    assert info["best_iter"] > 0 and info["distance"]["loss"] == "l2"


def test_soft_teacher_forcing_and_residual_term_and_features_run(pairs):
    noise, ref = pairs
    base = sd.make_plan(sd.VEProcess(), "unipc", 4, "logsnr")
    for kw in ({"teacher_ball": 0.05}, {"residual_weight": 1.0}, {"loss": "features", "features": lambda x: x ** 2}):
        plan, info = gradient_fit(GMM, base, noise[:96], ref.final[:96], val_noise=noise[96:128],
                                  val_target=ref.final[96:128], sigma_floor=0.002, max_iters=10, val_every=5, **kw)
        assert math.isfinite(info["val_best"]) and torch.isfinite(plan.sigmas).all()
    assert info["distance"]["features"] == "test_soft_teacher_forcing_and_residual_term_and_features_run.<locals>." \
                                          "<lambda>"
    with pytest.raises(ValueError, match="features"):
        gradient_fit(GMM, base, noise[:8], ref.final[:8], val_noise=noise[8:16], val_target=ref.final[8:16],
                     sigma_floor=0.002, loss="features")


def test_models_without_gradients_are_refused_naming_the_derivative_free_fit(pairs):
    noise, ref = pairs
    base = sd.make_plan(sd.VEProcess(), "dpmpp_2m", 3, "karras")
    kw = {"val_noise": noise[32:48], "val_target": ref.final[32:48], "sigma_floor": 0.002, "max_iters": 2}

    def no_grad_model(x, s):
        with torch.no_grad():
            return GMM(x, s)

    def numpy_model(x, s):
        return torch.from_numpy(GMM(x.detach(), s.detach()).numpy())

    def detached_sigma(x, s):  # differentiable in x only
        return GMM(x, s.detach())

    for model in (no_grad_model, numpy_model):
        with pytest.raises(NotDifferentiableError, match="fit_method='derivative-free'"):
            gradient_fit(model, base, noise[:32], ref.final[:32], **kw)
    with pytest.raises(NotDifferentiableError, match="noise level"):
        gradient_fit(detached_sigma, base, noise[:32], ref.final[:32], params="steps", **kw)
    gradient_fit(detached_sigma, base, noise[:32], ref.final[:32], params="gamma", **kw)  # needs d/dx only


def test_a_diverging_fit_stops_with_a_message_and_keeps_a_valid_plan(pairs):
    noise, ref = pairs
    base = sd.make_plan(sd.VEProcess(), "dpmpp_2m", 4, "karras")
    kw = {"val_noise": noise[32:48], "val_target": ref.final[32:48], "sigma_floor": 0.002, "max_iters": 50,
          "val_every": 1, "params": "steps,gamma"}

    def after(n_calls, how):  # the exact denoiser for the checks and the first steps, then broken
        calls = {"n": 0}

        def model(x, s):
            calls["n"] += 1
            return how(GMM(x, s)) if calls["n"] > n_calls else GMM(x, s)

        return model

    for how, message in ((lambda d: d * float("nan"), "non-finite model output"),
                         (lambda d: d * 1e4, "loss exploded")):
        plan, info = gradient_fit(after(30, how), base, noise[:32], ref.final[:32], **kw)
        assert message in info["stopped"] and "kept the best held-out parameters" in info["stopped"]
        assert 0 < info["iters"] < 50
        assert torch.isfinite(plan.sigmas).all() and all(math.isfinite(g) for g in plan.gammas)
        sd.make_plan(sd.VEProcess(), "dpmpp_2m", 4, sigmas=plan.sigmas)  # a valid schedule


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="unknown or no gradient-fit parameter"):
        check_params("steps,warp")
    with pytest.raises(ValueError, match="unknown or no"):
        check_params("")
    assert check_params("history,steps") == ("steps", "history")
    spec = load_model("gmm:toy2d")
    with pytest.raises(ValueError, match="options of the gradient fit"):
        sd.calibrate(spec, solver="euler", nfe=3, params="steps", n=8)
    with pytest.raises(ValueError, match="fit_method must be"):
        sd.calibrate(spec, solver="euler", nfe=3, fit_method="magic", n=8)


def test_calibrate_with_the_gradient_fit_records_it_and_round_trips(tmp_path):
    spec = load_model("gmm:toy2d")
    sched = sd.calibrate(spec, solver="dpmpp_2m", nfe=4, dtype=torch.float64, n=64, ref_steps=40,
                         fit_method="gradient", params=ALL, gradient_options={"max_iters": 20, "val_every": 5})
    cal = sched.meta["calibration"]
    assert cal["fit_method"] == "gradient" and cal["params"] == list(ALL) and "cpu_s" in cal
    assert cal["distance"] == {"loss": "l2", "features": None, "residual_weight": 0.0, "teacher_ball": 0.0}
    assert set(cal["candidates"]) == {"plain", "gits", "gradient"} and cal["guards"] == [
        "residual:margin=0:dominance=4", "modes:tolerance=0.02", "distribution", "significance"]
    assert cal["start"]["name"] == "gits"  # the default start
    tries = cal["gradient"]["tries"]  # one fit per default learning rate; the lower held-out loss is the candidate
    assert [t["lr"] for t in tries] == [0.03, 0.1]
    assert cal["gradient"]["val_best"] == min(t["val_best"] for t in tries)
    assert cal["gradient"]["lr"] == tries[[t["val_best"] for t in tries].index(cal["gradient"]["val_best"])]["lr"]
    path = tmp_path / "g.json"
    sched.save(path)
    back = load_gamma_schedule(path)
    assert back.model_sigmas == sched.model_sigmas and back.history == sched.history
    if cal["chosen"] == "gradient":
        assert json.loads(path.read_text())["schema"] == "steindiff.gamma-schedule/2"


def test_cache_keys_tell_the_fit_methods_apart(tmp_path):
    spec = load_model("gmm:toy2d")
    base = sd.make_plan(spec.process, "euler", 3, "karras")
    plain_key = calibration_key(spec, base)
    # derivative-free keys are what they were (shipped files still found)
    assert not {"gradient", "fit_method", "params"} & set(plain_key["options"])
    assert gradient_fit_options({"fit_method": "derivative-free", "params": ["steps"]}) is None
    key = calibration_key(spec, base, options={"fit_method": "gradient", "params": ["steps"], "ref_steps": 40})
    assert key["options"]["gradient"]["params"] == ["steps"] and key["options"]["ref_steps"] == 40
    assert key != plain_key
    other = calibration_key(spec, base, options={"fit_method": "gradient", "params": ["steps", "gamma"],
                                                 "ref_steps": 40})
    assert other["options"]["gradient"] != key["options"]["gradient"]
    small = {"n": 32, "ref_steps": 40, "fit_method": "gradient", "params": "steps",
             "gradient_options": {"max_iters": 5}}
    plan = calibrated_plan(spec, base, cache_dir=tmp_path, **small)
    again = calibrated_plan(spec, base, cache_dir=tmp_path, calibrate_missing=False, **small)
    assert torch.equal(plan.sigmas, again.sigmas)
    said = []  # another key: the gradient fit's file is not used for a derivative-free request, and that is said
    assert calibrated_plan(spec, base, cache_dir=tmp_path, calibrate_missing=False, n=32, notice=said.append) is base
    assert len(said) == 1 and "gradient" in said[0] and "not used" in said[0]


def test_fit_trajectory_gradient_on_a_user_module(pairs):
    """A model the library has never seen (a module, no mixture special case): the fitted candidate wins."""
    noise, ref = pairs

    class UserModel(torch.nn.Module):
        def forward(self, x, sigma):
            return GMM(x, sigma)

    base = sd.make_plan(sd.VEProcess(), "euler", 4, "karras")
    fit = fit_trajectory_gradient(UserModel(), base, noise, sigma_min=0.002, ref=ref, params="steps,gamma",
                                  max_iters=60, val_every=5, lr=0.03)
    rec = fit.record
    assert rec["chosen"] == "gradient" and rec["val_ratio"] < 0.8
    assert rec["n_train"] + rec["n_holdout"] == rec["n_fit"] == 80


def test_the_fit_runs_in_full_precision_whatever_the_callers_settings(pairs):
    noise, ref = pairs
    seen = []

    def model(x, s):
        seen.append((torch.backends.cuda.matmul.allow_tf32, torch.is_autocast_enabled("cpu")))
        return GMM(x, s)

    base = sd.make_plan(sd.VEProcess(), "euler", 3, "karras")
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            gradient_fit(model, base, noise[:16], ref.final[:16], val_noise=noise[16:24], val_target=ref.final[16:24],
                         sigma_floor=0.002, max_iters=2)
        assert seen and set(seen) == {(False, False)}
        assert torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


def test_cli_calibrate_with_the_gradient_fit(tmp_path, capsys):
    from steindiff.cli import main

    out = tmp_path / "c.json"
    rc = main(["calibrate", "--model", "gmm:toy2d", "--solver", "euler", "--nfe", "3", "--n", "32", "--ref-steps", "20",
               "--fit-method", "gradient", "--params", "steps,history", "--max-iters", "5", "--out", str(out),
               "--no-progress", "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["calibration"]["fit_method"] == "gradient" and out.exists()
    assert main(["calibrate", "--model", "gmm:toy2d", "--solver", "euler", "--nfe", "3", "--params", "steps",
                 "--out", str(tmp_path / "d.json")]) == 2
    assert "options of --fit-method gradient" in capsys.readouterr().err


def test_cli_calibrate_with_a_named_distance(tmp_path, capsys):
    """--distance names the fit's distance; the calibration records it; bad names are refused before any work."""
    from steindiff.cli import main

    out = tmp_path / "c.json"
    base = ["calibrate", "--model", "digits", "--solver", "euler", "--nfe", "3", "--n", "8", "--ref-steps", "8",
            "--calibration-dir", str(tmp_path / "cache"), "--no-progress"]
    rc = main([*base, "--fit-method", "gradient", "--params", "steps", "--max-iters", "2",
               "--distance", "denoiser:0.5:1", "--out", str(out), "--json"])
    assert rc == 0
    cal = json.loads(capsys.readouterr().out)["calibration"]
    assert cal["distance"]["loss"] == "features" and cal["distance"]["features"] == "DenoiserFeatures"
    assert json.loads(out.read_text())["calibration"]["distance"] == cal["distance"]
    assert main([*base, "--fit-method", "gradient", "--distance", "lpips", "--out", str(tmp_path / "d.json")]) == 2
    assert "unknown distance 'lpips'" in capsys.readouterr().err
    assert main([*base, "--distance", "pyramid:2/1/1", "--out", str(tmp_path / "e.json")]) == 2
    assert "--distance" in capsys.readouterr().err
    assert not (tmp_path / "d.json").exists() and not (tmp_path / "e.json").exists()


def test_several_parameter_sets_are_spelt_one_way():
    from steindiff.gradient_fit import check_param_sets, params_record

    assert check_param_sets("steps,gamma") == check_param_sets(["steps", "gamma"]) == (("steps", "gamma"),)
    several = check_param_sets("steps,gamma/history,steps/gamma,steps")  # a set named twice counts once
    assert several == check_param_sets([("steps", "gamma"), ["steps", "history"]]) == (
        ("steps", "gamma"), ("steps", "history"))
    assert params_record(several) == [["steps", "gamma"], ["steps", "history"]]
    assert params_record(check_param_sets("gamma,steps")) == ["steps", "gamma"]  # one set: as before
    with pytest.raises(ValueError, match="unknown or no gradient-fit parameter.*'warp'"):
        check_param_sets("steps/warp")
    with pytest.raises(ValueError, match="no gradient-fit parameter set"):
        check_param_sets("/")


def test_several_parameter_sets_each_fit_one_candidate_and_the_validation_keeps_the_closest(pairs):
    """Each set is fitted as it would be alone (same seed, same learning rates) and competes with plain and the
    other sets on the validation half under the guards: the kept candidate is the closest that passes."""
    from steindiff.trajectory import choose_candidate

    noise, ref = pairs
    base = sd.make_plan(sd.VEProcess(), "euler", 4, "karras")
    opts = {"sigma_min": 0.002, "ref": ref, "max_iters": 20, "val_every": 5, "lr": 0.03, "start": "plain"}
    both = fit_trajectory_gradient(GMM, base, noise, params="steps,gamma/steps,history", **opts).record
    assert set(both["candidates"]) == {"plain", "gradient:steps+gamma", "gradient:steps+history"}
    assert both["params"] == [["steps", "gamma"], ["steps", "history"]]
    assert set(both["gradient"]["sets"]) == {"gradient:steps+gamma", "gradient:steps+history"}
    assert both["chosen"] == choose_candidate(both["candidates"], both["guards"]) != "plain"
    alone = fit_trajectory_gradient(GMM, base, noise, params="steps,history", **opts).record
    assert both["candidates"]["gradient:steps+history"]["val_rms"] == pytest.approx(
        alone["candidates"]["gradient"]["val_rms"], rel=1e-9)
    assert both["gradient"]["sets"]["gradient:steps+history"]["val_best"] == pytest.approx(
        alone["gradient"]["val_best"], rel=1e-9)


def test_several_parameter_sets_through_calibrate_the_cache_and_the_cli(tmp_path, capsys):
    from steindiff.cli import main
    from steindiff.fit_estimate import fit_seconds

    spec = load_model("gmm:toy2d")
    base = sd.make_plan(spec.process, "euler", 3, "karras")
    one = calibration_key(spec, base, options={"fit_method": "gradient", "params": "steps,gamma"})
    two = calibration_key(spec, base, options={"fit_method": "gradient", "params": "steps,gamma/steps,history"})
    assert one["options"]["gradient"]["params"] == ["steps", "gamma"]
    assert two["options"]["gradient"]["params"] == [["steps", "gamma"], ["steps", "history"]] and one != two
    units = {"ref_step_s": 0.01, "solve_s": 0.1, "pass_s": 0.02}
    opts = {"fit_method": "gradient", "gradient_options": {"max_iters": 100}, "max_seconds": 1e9, "ref_steps": 10}
    t0 = fit_seconds(sd.calibration.calibration_options(spec, **{**opts, "gradient_options": {"max_iters": 0}}),
                     **units)
    t1 = fit_seconds(sd.calibration.calibration_options(spec, params="steps", **opts), **units)
    t2 = fit_seconds(sd.calibration.calibration_options(spec, params="steps/gamma", **opts), **units)
    assert t2 - t0 == pytest.approx(2 * (t1 - t0))  # the Adam steps of each set
    out = tmp_path / "c.json"
    rc = main(["calibrate", "--model", "gmm:toy2d", "--solver", "euler", "--nfe", "3", "--n", "32", "--ref-steps", "20",
               "--fit-method", "gradient", "--params", "steps,gamma/steps,history", "--max-iters", "5",
               "--out", str(out), "--no-progress", "--json"])
    assert rc == 0
    cal = json.loads(capsys.readouterr().out)["calibration"]
    assert cal["params"] == [["steps", "gamma"], ["steps", "history"]]
    assert main(["calibrate", "--model", "gmm:toy2d", "--solver", "euler", "--nfe", "3", "--fit-method", "gradient",
                 "--params", "steps/warp", "--out", str(tmp_path / "d.json")]) == 2
    assert "'warp'" in capsys.readouterr().err and not (tmp_path / "d.json").exists()


def test_a_gits_start_searches_the_fit_part_competes_and_is_where_the_fit_begins(pairs):
    """start="gits": GITS's levels from the fit part's trajectories are a candidate, and the fit starts there
    (fitting only gamma keeps them); the validation part is never searched."""
    from steindiff.peers.gits import gits_plan
    from steindiff.trajectory import choose_candidate

    noise, ref = pairs
    base = sd.make_plan(sd.VEProcess(), "euler", 4, "karras")
    opts = {"sigma_min": 0.002, "ref": ref, "max_iters": 10, "val_every": 5, "lr": 0.03}
    rec = fit_trajectory_gradient(GMM, base, noise, params="gamma", start="gits", **opts)
    start = rec.record["start"]
    assert start["name"] == "gits" and start["n"] == rec.record["n_fit"] == 80
    searched = gits_plan(GMM, base, ref, n=80)
    assert start["sigmas"] == pytest.approx(searched.sigmas.tolist(), rel=1e-12)
    assert start["sigmas"] != pytest.approx(base.sigmas.tolist())
    assert set(rec.record["candidates"]) == {"plain", "gits", "gradient"}
    assert rec.record["chosen"] == choose_candidate(rec.record["candidates"], rec.record["guards"])
    cands = rec.record["candidates"]  # gamma alone never moves the levels it starts from
    assert cands["gradient"]["sigmas"] == pytest.approx(start["sigmas"], rel=1e-12) == cands["gits"]["sigmas"]
    assert cands["gradient"]["gammas"] != [1.0] * 4
    if rec.record["chosen"] != "plain":
        assert rec.plan.sigmas.tolist() == pytest.approx(start["sigmas"], rel=1e-12)
    plain = fit_trajectory_gradient(GMM, base, noise, params="gamma", start="plain", **opts).record
    assert plain["start"] == {"name": "plain"} and "gits" not in plain["candidates"]
    with pytest.raises(ValueError, match="start must be one of plain, gits"):
        fit_trajectory_gradient(GMM, base, noise, params="gamma", start="ld3", **opts)
    bare = reference_solve(GMM, noise, 80.0, 0.002, steps=60, keep=0)  # no trajectories to search
    with pytest.raises(ValueError, match="keeps too few of them.*start='plain'"):
        fit_trajectory_gradient(GMM, base, noise, params="gamma", **{**opts, "ref": bare})
    assert fit_trajectory_gradient(GMM, base, noise, params="gamma", start="plain",
                                   **{**opts, "ref": bare}).record["start"] == {"name": "plain"}


def test_a_gits_start_through_the_cache_key_the_estimate_and_the_cli(tmp_path, capsys):
    from steindiff.cli import main
    from steindiff.fit_estimate import fit_seconds

    spec = load_model("gmm:toy2d")
    base = sd.make_plan(spec.process, "euler", 3, "karras")
    default = calibration_key(spec, base, options={"fit_method": "gradient"})
    plain = calibration_key(spec, base, options={"fit_method": "gradient", "gradient_options": {"start": "plain"}})
    gits = calibration_key(spec, base, options={"fit_method": "gradient", "gradient_options": {"start": "gits"}})
    assert (plain["options"]["gradient"]["start"], gits["options"]["gradient"]["start"]) == ("plain", "gits")
    assert default == gits and plain != gits  # the start is named once, whether given or not
    assert gits["options"]["gradient"]["gradient_options"] == {}
    units = {"ref_step_s": 0.01, "solve_s": 0.1, "pass_s": 0.02}
    t = [fit_seconds(sd.calibration.calibration_options(spec, fit_method="gradient", gradient_options=g), **units)
         for g in ({"start": "plain"}, {"start": "gits"}, None)]
    assert t[1] > t[0] and t[2] == t[1]  # GITS's cost matrix counted; the default start is gits
    out = tmp_path / "c.json"
    assert main(["calibrate", "--model", "gmm:toy2d", "--solver", "euler", "--nfe", "3", "--n", "32", "--ref-steps",
                 "20", "--fit-method", "gradient", "--start", "gits", "--max-iters", "5", "--out", str(out),
                 "--no-progress", "--json"]) == 0
    cal = json.loads(capsys.readouterr().out)["calibration"]
    assert cal["start"]["name"] == "gits" and "gits" in cal["candidates"]
    assert main(["calibrate", "--model", "gmm:toy2d", "--solver", "euler", "--nfe", "3", "--start", "gits",
                 "--out", str(tmp_path / "d.json")]) == 2
    assert "--start are options of --fit-method gradient" in capsys.readouterr().err
    assert not (tmp_path / "d.json").exists()
