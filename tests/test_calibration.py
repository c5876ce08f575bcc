"""steindiff.calibration: the trajectory objective's file, the fingerprint, and the cache behind ``auto``."""

import json

import pytest
import torch

import steindiff.calibration as cal
from steindiff.calibration import calibrate, calibrated_plan, model_fingerprint, plan_from_schedule
from steindiff.models.gmm import GaussianMixture
from steindiff.models.registry import ModelSpec, load_model
from steindiff.noise import VEProcess
from steindiff.plan import make_plan
from steindiff.stabilizers.schedule import load_gamma_schedule

FAST = {"n": 64, "ref_steps": 40, "max_solves": 30}


@pytest.fixture(scope="module")
def toy():
    return load_model("gmm:toy2d")


def test_trajectory_calibration_file_round_trip(toy, tmp_path):
    sched = calibrate(toy, solver="dpmpp_2m", nfe=4, dtype=torch.float64, **FAST)
    m = sched.meta
    assert m["objective"] == "trajectory" and m["fingerprint"] == model_fingerprint(toy)
    assert len(m["sigmas"]) == len(m["base_sigmas"]) == len(sched.gammas) + 1 == 5
    rec = m["calibration"]
    assert set(rec["candidates"]) >= {"plain", "closed_form", "refined"} and rec["chosen"] in rec["candidates"]
    assert rec["n"] == 64 and rec["seed"] == cal.CALIBRATION_SEED and rec["wall_s"] > 0
    assert sched.gammas == rec["candidates"][rec["chosen"]]["gammas"]
    sched.save(tmp_path / "c.json")
    back = load_gamma_schedule(tmp_path / "c.json")
    plan = plan_from_schedule(back, make_plan(toy.process, "dpmpp_2m", 4))
    assert plan.gammas == sched.gammas and plan.sigmas.tolist() == m["sigmas"]


def test_fingerprint_follows_the_weights():
    g = GaussianMixture(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    h = GaussianMixture(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    k = GaussianMixture(torch.tensor([[0.0, 1.0], [1.0, 1e-9]]))
    spec = lambda m: ModelSpec("m", m, VEProcess(), (2,), gmm=m)  # noqa: E731
    assert model_fingerprint(spec(g)) == model_fingerprint(spec(h)) != model_fingerprint(spec(k))
    net = torch.nn.Linear(2, 2)
    a = model_fingerprint(ModelSpec("n", net, VEProcess(), (2,)))
    with torch.no_grad():
        net.weight[0, 0] += 1e-6
    assert model_fingerprint(ModelSpec("n", net, VEProcess(), (2,))) != a
    # a plain function is known by its code; a builtin has nothing to read and needs an explicit identity
    assert model_fingerprint(ModelSpec("f", lambda x, s: x, VEProcess(), (2,))) != \
        model_fingerprint(ModelSpec("f", lambda x, s: 2 * x, VEProcess(), (2,)))
    with pytest.raises(ValueError, match="cannot fingerprint model 'f'.*fingerprint=.*--model-name"):
        model_fingerprint(ModelSpec("f", torch.tanh, VEProcess(), (2,)))
    assert model_fingerprint(ModelSpec("f", torch.tanh, VEProcess(), (2,), fingerprint="tanh-v1")) != \
        model_fingerprint(ModelSpec("f", torch.tanh, VEProcess(), (2,), fingerprint="tanh-v2"))


def test_calibrated_plan_fits_once_then_reads_the_cache(toy, tmp_path, monkeypatch):
    base = make_plan(toy.process, "euler", 4, "karras")
    notices = []
    plan = calibrated_plan(toy, base, cache_dir=tmp_path, notice=notices.append, **FAST)
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1 and len(notices) == 1 and "calibrating euler / karras / NFE 4" in notices[0]
    assert json.loads(files[0].read_text())["key"]["fingerprint"] == model_fingerprint(toy)
    monkeypatch.setattr(cal, "calibrate", lambda *a, **k: pytest.fail("calibrated again"))
    again = calibrated_plan(toy, base, cache_dir=tmp_path, notice=notices.append, **FAST)
    assert len(notices) == 1 and again.gammas == plan.gammas and torch.equal(again.sigmas, plan.sigmas)
    # another NFE is another key: with calibration off it is the plain plan, and nothing is written
    other = make_plan(toy.process, "euler", 5, "karras")
    assert calibrated_plan(toy, other, cache_dir=tmp_path, calibrate_missing=False) is other
    assert len(list(tmp_path.glob("*.json"))) == 1


def test_corrupt_cache_file_is_refitted_with_a_warning(toy, tmp_path):
    base = make_plan(toy.process, "euler", 3, "karras")
    calibrated_plan(toy, base, cache_dir=tmp_path, **FAST)
    (f,) = tmp_path.glob("*.json")
    f.write_text(f.read_text()[:100])
    with pytest.warns(UserWarning, match="corrupt or truncated"):
        plan = calibrated_plan(toy, base, cache_dir=tmp_path, **FAST)
    assert load_gamma_schedule(f).gammas == plan.gammas


def test_unwritable_cache_falls_back_to_the_plain_solver(toy, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    base = make_plan(toy.process, "euler", 3, "karras")
    with pytest.warns(UserWarning, match="not writable.*plain solver"):
        plan = calibrated_plan(toy, base, cache_dir=blocker / "cache", **FAST)
    assert plan is base


def test_interrupted_calibration_leaves_no_file(toy, tmp_path, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cal, "fit_trajectory", interrupted)
    with pytest.raises(KeyboardInterrupt):
        calibrated_plan(toy, make_plan(toy.process, "euler", 3, "karras"), cache_dir=tmp_path, **FAST)
    assert list(tmp_path.iterdir()) == []


def test_calibrate_refuses_unknown_objective(toy):
    with pytest.raises(ValueError, match="unknown objective"):
        calibrate(toy, objective="magic")
    with pytest.raises(ValueError, match="fit must be one of"):
        calibrate(toy, fit="all", **FAST)


def test_the_digits_model_ships_its_calibrations(tmp_path):
    """The shipped digits model carries the bench grid's calibrations: found with no cache and no fit."""
    spec = load_model("digits")
    for solver, nfe, schedule in (("dpmpp_2m", 5, "karras"), ("euler", 4, "karras"), ("unipc", 6, "logsnr")):
        base = make_plan(spec.process, solver, nfe, schedule)
        plan = calibrated_plan(spec, base, cache_dir=tmp_path, calibrate_missing=False)
        assert plan is not base and plan.meta["fingerprint"] == model_fingerprint(spec)
        assert plan.meta["solver"] == solver and plan.meta["nfe"] == nfe and len(plan.gammas) == base.steps
    assert list(tmp_path.iterdir()) == []  # nothing written to the user's cache


def test_first_generation_files_load_as_the_plans_they_were():
    """Every shipped calibration is a ``/1`` file: gammas and noise levels only, applied as before (the
    rescaled update alone: no model noise levels, no history corrections)."""
    from steindiff.models.trained import SHIPPED

    files = [(name, f) for name, folder in SHIPPED.items() for f in sorted((folder / "calibrations").glob("*.json"))
             if f.name != "defaults.json"]
    assert len(files) >= 60
    for name, f in files:
        assert json.loads(f.read_text())["schema"] == "steindiff.gamma-schedule/1"
        sched = load_gamma_schedule(f)
        assert sched.requires == [] and sched.model_sigmas is None and sched.history is None
        m = sched.meta
        plan = plan_from_schedule(sched, make_plan(load_model(name).process, m["solver"], m["nfe"], m["schedule"]))
        assert plan.model_sigmas is None and plan.history is None and plan.gammas == sched.gammas


def test_trajectory_calibration_uses_the_requested_coordinates(toy):
    sched = calibrate(toy, solver="euler", nfe=3, coords="vp", dtype=torch.float64, **FAST)
    assert sched.coords == "vp"


def test_default_guards_are_the_same_for_every_model(toy):
    """No gmm:* special case: a mixture, the digits U-Net and an opaque callable get the same guards."""
    from steindiff.models.registry import ModelSpec
    from steindiff.trajectory import choose_candidate

    digits = load_model("digits")
    opaque = ModelSpec("mine", lambda x, s: toy.denoiser(x, s), toy.process, toy.sample_shape)
    assert cal.default_guards(toy) == cal.default_guards(digits) == cal.default_guards(opaque) == (
        "residual", "distribution", "significance")
    rec = calibrate(toy, solver="euler", nfe=4, dtype=torch.float64, **FAST).meta["calibration"]
    assert rec["guards"] == ["residual", "distribution", "significance"]
    assert rec["chosen"] == choose_candidate(rec["candidates"], rec["guards"])
    sched = calibrate(toy, solver="euler", nfe=4, dtype=torch.float64, guards=["significance"], **FAST)
    assert sched.meta["calibration"]["guards"] == ["significance"]


def test_the_gradient_fit_has_its_own_default_guards_for_every_model(toy):
    """The gradient fit's default (GRADIENT_GUARDS) is stricter than the derivative-free fit's, the same for a
    mixture and an opaque callable, in its calibration record and in its cache key."""
    from steindiff.calibration import calibration_key
    from steindiff.models.registry import ModelSpec
    from steindiff.trajectory import choose_candidate

    opaque = ModelSpec("mine", lambda x, s: toy.denoiser(x, s), toy.process, toy.sample_shape)
    assert cal.default_guards(toy, "gradient") == cal.default_guards(opaque, "gradient") == cal.GRADIENT_GUARDS == (
        "residual:margin=0:dominance=4", "modes:tolerance=0.02", "distribution", "significance")
    base = make_plan(toy.process, "euler", 4, "karras")
    grad = calibration_key(toy, base, options={**FAST, "fit_method": "gradient"})["options"]
    assert grad["guards"] == list(cal.GRADIENT_GUARDS)
    assert calibration_key(toy, base, options=FAST)["options"]["guards"] == ["residual", "distribution", "significance"]
    rec = calibrate(toy, base, fit_method="gradient", dtype=torch.float64, n=64, ref_steps=40, max_seconds=5,
                    gradient_options={"max_iters": 5}).meta["calibration"]
    assert rec["guards"] == list(cal.GRADIENT_GUARDS)
    assert rec["chosen"] == choose_candidate(rec["candidates"], rec["guards"])


def test_a_models_pinned_guards_are_its_derivative_free_calibrations_not_the_gradient_fits():
    """digits pins the guards its shipped (derivative-free) calibrations were chosen under; the gradient fit on
    it takes its own default, and guards given by the caller win for both fits."""
    spec = load_model("digits")
    pinned = spec.info["calibration_defaults"]["guards"]
    assert cal.calibration_options(spec)["guards"] == pinned != list(cal.GRADIENT_GUARDS)
    assert cal.calibration_options(spec, fit_method="gradient")["guards"] == list(cal.GRADIENT_GUARDS)
    assert cal.calibration_options(spec, fit_method="gradient", guards=["significance"])["guards"] == ["significance"]
    resolved = cal.calibration_options(spec, fit_method="gradient")
    assert cal.calibration_options(spec, **resolved) == resolved  # idempotent


def test_shipped_digits_calibrations_are_chosen_under_the_models_default_guards():
    """Each shipped file's choice is the one its recorded candidates give under the default guards, and
    its candidates were scored with the current significance test."""
    from pathlib import Path

    from steindiff.trajectory import SIGNIFICANCE_TEST, choose_candidate

    spec = load_model("digits")
    files = sorted(Path(spec.info["calibrations"]).glob("digits-*.json"))
    assert len(files) == 68
    for f in files:
        obj = json.loads(f.read_text())
        c = obj["calibration"]
        assert c["guards"] == cal.calibration_options(spec)["guards"], f.name  # the model's own (defaults.json)
        assert c.get("significance_test") == SIGNIFICANCE_TEST, f.name
        assert c["chosen"] == choose_candidate(c["candidates"], c["guards"]), f.name
        assert obj["gammas"] == c["candidates"][c["chosen"]]["gammas"], f.name


def test_if_quick_fits_only_what_is_estimated_quick(toy, tmp_path, monkeypatch):
    """The rule of every entry point: a missing calibration is fitted when its estimated time is at most
    ``quick_fit_seconds`` (default QUICK_FIT_SECONDS); above it, the plain plan and one notice with the estimate
    and the way to fit it; ``always`` fits regardless, ``never`` never."""
    from steindiff.fit_estimate import FitEstimate

    base = make_plan(toy.process, "euler", 4, "karras")
    seconds = {"value": cal.QUICK_FIT_SECONDS + 1}
    monkeypatch.setattr(cal, "estimate_fit", lambda *a, **k: FitEstimate(seconds["value"], 0, 0, 0, 64, 64, True, 0))
    real = cal.calibrate
    fits = []
    monkeypatch.setattr(cal, "calibrate", lambda *a, **k: fits.append(1) or real(*a, **k))
    notices = []
    assert calibrated_plan(toy, base, cache_dir=tmp_path, notice=notices.append, fit_command="CMD", **FAST) is base
    assert not fits and not list(tmp_path.glob("*.json")) and len(notices) == 1
    assert f"about {cal.QUICK_FIT_SECONDS + 1:.0f} s" in notices[0] and "more than the 30 s" in notices[0]
    assert notices[0].endswith(": CMD") and "plain solver" in notices[0]
    with pytest.warns(UserWarning, match="calibrate_missing='always'"):  # Python: a warning, with the Python way
        assert calibrated_plan(toy, base, cache_dir=tmp_path, **FAST) is base
    assert calibrated_plan(toy, base, cache_dir=tmp_path, quick_fit_seconds=60, notice=notices.append,
                           **FAST) is not base and fits == [1]
    other = make_plan(toy.process, "euler", 5, "karras")
    seconds["value"] = cal.QUICK_FIT_SECONDS - 1
    assert calibrated_plan(toy, other, cache_dir=tmp_path, notice=notices.append, **FAST) is not other
    assert fits == [1, 1] and "calibrating euler / karras / NFE 5" in notices[-1]
    (f,) = [p for p in tmp_path.glob("*nfe5*.json")]
    rec = json.loads(f.read_text())["calibration"]
    assert rec["estimated_s"] == cal.QUICK_FIT_SECONDS - 1 and rec["fitted_at"].endswith("+00:00")
    with pytest.raises(ValueError, match="calibrate must be one of always, if-quick, never"):
        calibrated_plan(toy, other, cache_dir=tmp_path, calibrate_missing="sometimes")


def test_always_fits_and_never_reads_whatever_the_estimate(toy, tmp_path):
    base = make_plan(toy.process, "euler", 3, "karras")
    assert cal.calibrate_when(True) == "always" and cal.calibrate_when(False) == "never"
    assert calibrated_plan(toy, base, cache_dir=tmp_path, calibrate_missing="never", quick_fit_seconds=1e-9,
                           notice=pytest.fail, **FAST) is base
    notices = []
    plan = calibrated_plan(toy, base, cache_dir=tmp_path, calibrate_missing="always", quick_fit_seconds=1e-9,
                           notice=notices.append, **FAST)
    assert plan is not base and len(notices) == 1 and "measured on this machine" in notices[0]


def test_sample_auto_applies_the_same_rule(toy, tmp_path):
    """``steindiff.sample(stabilizer="auto")``: a fit longer than ``quick_fit_seconds`` is not started; the
    notice says how to ask for it from Python."""
    import steindiff as sd

    sig = sd.get_sigmas("karras", 4, toy.process)
    x = sd.prior_noise((8, 2), float(sig[0]), seed=0, dtype=torch.float64)
    notices = []
    res = sd.sample(toy.denoiser, x, sig, "euler", stabilizer="auto", process=toy.process, calibration_dir=tmp_path,
                    calibration_options=FAST, quick_fit_seconds=1e-9, notice=notices.append)
    assert torch.equal(res.x, sd.sample(toy.denoiser, x, sig, "euler").x) and not list(tmp_path.glob("*.json"))
    assert len(notices) == 1 and "pass calibrate='always' to steindiff.sample" in notices[0]
    sd.sample(toy.denoiser, x, sig, "euler", stabilizer="auto", process=toy.process, calibration_dir=tmp_path,
              calibration_options=FAST, quick_fit_seconds=1e-9, calibrate="always", notice=notices.append)
    assert len(list(tmp_path.glob("*.json"))) == 1


def test_progress_bars_say_what_the_calibration_is_doing(toy, capsys):
    calibrate(toy, solver="euler", nfe=4, progress=True, **FAST)
    err = capsys.readouterr().err
    assert "calibrating: reference solve" in err and "calibrating: fit 1/2" in err and "calibrating: fit 2/2" in err
    assert "dpmpp_2m:" not in err and "fit euler" not in err  # not the bare solvers' names


# ---------------------------------------------------------------- the cache key, the file name, the conditioning


def _key_variants(toy):
    """(name, key) pairs: the key of one request, then one key per field of it changed by a real request."""
    import dataclasses

    from steindiff.calibration import calibration_key, conditioning_digest

    base = make_plan(toy.process, "unipc", 4, "karras")
    w = torch.arange(1, len(toy.gmm.weights) + 1, dtype=toy.gmm.weights.dtype)
    other_weights = GaussianMixture(toy.gmm.means, w / w.sum(), basis=toy.gmm.basis, lam=toy.gmm.lam, s2=toy.gmm.s2)
    spec2 = ModelSpec(toy.name, other_weights, toy.process, toy.sample_shape, gmm=other_weights, info=toy.info)
    renamed = ModelSpec("gmm:renamed", toy.denoiser, toy.process, toy.sample_shape, gmm=toy.gmm, info=toy.info)
    key = calibration_key(toy, base, options=FAST)
    out = [("fingerprint", calibration_key(spec2, base, options=FAST)),
           ("model", calibration_key(renamed, base, options=FAST)),
           ("solver", calibration_key(toy, dataclasses.replace(base, solver="dpmpp_2m"), options=FAST)),
           ("solver_options", calibration_key(toy, dataclasses.replace(base, solver_options={"order": 3}),
                                              options=FAST)),
           ("schedule", calibration_key(toy, dataclasses.replace(base, schedule="custom"), options=FAST)),
           ("nfe", calibration_key(toy, make_plan(toy.process, "unipc", 5, "karras"), options=FAST)),
           ("base_sigmas", calibration_key(toy, make_plan(toy.process, "unipc", 4, "karras", rho=5.0),
                                           options=FAST)),
           ("coords", calibration_key(toy, dataclasses.replace(base, coords="vp"), options=FAST)),
           ("conditioning", calibration_key(toy, base, conditioning=conditioning_digest({"y": torch.tensor([1])}),
                                            options=FAST))]
    for opt, value in (("fit", "gamma"), ("n", 48), ("seed", 7), ("dtype", torch.float32), ("ref_solver", "heun"),
                       ("ref_steps", 41), ("max_solves", 31), ("max_seconds", 5.0), ("guards", ["significance"]),
                       ("objective", "variant"), ("fit_method", "gradient")):
        out.append((f"options.{'gradient' if opt == 'fit_method' else opt}",
                    calibration_key(toy, base, options={**FAST, opt: value})))
    return key, out


def test_every_field_of_the_cache_key_is_another_file(toy, tmp_path):
    """Each field of a request (the model's contents and name, the solver and its options, the schedule, NFE, noise
    levels, coordinates, conditioning and every calibration option) changes the key and the file it names."""
    from steindiff.calibration import cache_file

    key, variants = _key_variants(toy)
    assert key == json.loads(json.dumps(key))  # a file records it as it is
    path = cache_file(tmp_path, key)
    assert path.parent == tmp_path and path.name.startswith("gmm_toy2d-unipc-karras-nfe4-")
    names = {path.name}
    for field, other in variants:
        head, _, sub = field.partition(".")
        assert other[head] != key[head], field
        if sub:
            assert other["options"].get(sub) != key["options"].get(sub), field
        changed = {k for k in key if other[k] != key[k]}
        assert changed == ({head, "base_sigmas"} if head == "nfe" else {head}), field  # only that field changed
        names.add(cache_file(tmp_path, other).name)
    assert len(names) == len(variants) + 1
    assert cache_file(tmp_path, key) == path  # the same request, the same file


def test_the_key_records_the_options_resolved_as_calibrate_runs_them(toy):
    from steindiff.calibration import calibration_key

    base = make_plan(toy.process, "euler", 4, "karras")
    key = calibration_key(toy, base, options={**FAST, "fit": "steps", "dtype": torch.float64, "seed": 11})
    o = key["options"]
    assert (o["fit"], o["dtype"], o["seed"], o["n"], o["ref_steps"], o["max_solves"]) == (
        "steps", "float64", 11, 64, 40, 30)
    assert o["guards"] == list(cal.default_guards(toy)) == ["residual", "distribution", "significance"]
    assert o["objective"] == "trajectory"
    default = calibration_key(toy, base)["options"]
    assert (default["fit"], default["seed"], default["n"], default["dtype"]) == (
        "both", cal.CALIBRATION_SEED, 512, "float64")  # gmm:toy2d's own dtype (its calibration_defaults)
    plain = ModelSpec("mine", toy.denoiser, toy.process, toy.sample_shape)
    assert calibration_key(plain, base)["options"]["dtype"] == "float32"
    assert key["coords"] == "ve" and key["solver_options"] == {} and key["fingerprint"] == model_fingerprint(toy)
    assert key["base_sigmas"] == [round(float(s), 12) for s in base.sigmas] and key["nfe"] == 4


def test_guard_thresholds_are_spelt_one_way_in_the_key_and_refused_before_any_work(toy):
    """``residual:margin=0.0`` and ``residual:margin=0`` are one guard and one cache file; other thresholds are
    another key; a malformed guard is refused by the options, before a fit starts."""
    from steindiff.calibration import calibration_key

    base = make_plan(toy.process, "euler", 4, "karras")
    a = calibration_key(toy, base, options={**FAST, "guards": "residual:margin=0.0,distribution"})
    b = calibration_key(toy, base, options={**FAST, "guards": ["residual:margin=0", "distribution"]})
    c = calibration_key(toy, base, options={**FAST, "guards": "residual,distribution"})
    assert a == b and a["options"]["guards"] == ["residual:margin=0", "distribution"]
    assert c["options"]["guards"] == ["residual", "distribution"] and c != a
    with pytest.raises(ValueError, match="thresholds are written"):
        cal.calibrate(toy, base, **FAST, guards="residual:margin")


def test_conditioning_digest_hashes_values_not_just_types_or_shapes():
    from steindiff.calibration import conditioning_digest as dig

    y = torch.tensor([1, 2, 3])
    assert dig(None) is None and dig({}) is None
    assert dig({"y": y}) == dig({"y": torch.tensor([1, 2, 3])})  # the same values: the same calibration
    assert dig({"y": y}) != dig({"y": torch.tensor([1, 2, 4])})  # other labels, same dtype and shape
    assert dig({"y": y}) != dig({"y": y.to(torch.int32)})  # same values, other dtype
    assert dig({"y": torch.zeros(2, 3)}) != dig({"y": torch.zeros(3, 2)})  # same bytes, other shape
    assert dig({"y": y}) != dig({"z": y})  # the name matters
    assert dig({"g": 3.0}) != dig({"g": 7.5}) and dig({"g": 3}) != dig({"g": 3.0})  # non-tensors by value
    assert dig({"p": "a cat"}) != dig({"p": "a dog"})
    assert dig({"a": 1, "b": 2}) == dig({"b": 2, "a": 1})  # not the order of the dict
    assert dig({"a": 1, "b": 2}) != dig({"a": 2, "b": 1})
    assert dig({"e": torch.ones(2, 2)}) != dig({"e": torch.ones(2, 2) + 1e-6})


def test_calibrate_draws_its_noise_from_the_seed_it_records(toy, monkeypatch):
    """The calibration noise is the prior draw of ``seed`` (as generate draws it), and the record names that
    seed; another seed is other noise."""
    from steindiff.sampling import prior_noise
    from steindiff.trajectory import TrajectoryFit

    seen, kws = [], []

    def fake_fit(model, base, noise, **kw):
        seen.append(noise)
        kws.append(kw)
        return TrajectoryFit(make_plan(toy.process, "euler", 3, "karras"), {"chosen": "plain"})

    monkeypatch.setattr(cal, "fit_trajectory", fake_fit)
    calibrate(toy, solver="euler", nfe=3, n=8, fit="steps", ref_solver="heun", ref_steps=31, max_solves=17,
              max_seconds=4.0, guards="significance")
    kw = kws[-1]
    assert kw["sigma_min"] == toy.process.sigma_min and kw["fit"] == "steps" and list(kw["guards"]) == ["significance"]
    assert (kw["ref_solver"], kw["ref_steps"], kw["max_solves"], kw["max_seconds"]) == ("heun", 31, 17, 4.0)
    assert seen[-1].dtype == torch.float64  # gmm:toy2d's own calibration dtype
    for seed in (5, 6, cal.CALIBRATION_SEED):
        sched = calibrate(toy, solver="euler", nfe=3, seed=seed, n=8, dtype=torch.float64)
        assert sched.meta["calibration"]["seed"] == seed
        expected = prior_noise((8, *toy.sample_shape), float(make_plan(toy.process, "euler", 3).sigmas[0]),
                               toy.process, seed=seed, dtype=torch.float64)
        assert torch.equal(seen[-1], expected)
    assert not torch.equal(seen[-3], seen[-2])  # seeds 5 and 6


def test_a_cached_calibration_runs_its_own_noise_levels(toy, tmp_path):
    """A file's fitted noise levels, gammas and coordinates are the plan it gives (not the base schedule's)."""
    from steindiff.stabilizers.schedule import GammaSchedule

    base = make_plan(toy.process, "euler", 3, "karras")
    fitted = [float(base.sigmas[0]), 3.0, 0.2, 0.0]
    meta = {"model": toy.name, "solver": "euler", "nfe": 3, "schedule": "karras"}
    sched = GammaSchedule([0.9, 1.1, 1.0], "vp", {**meta, "sigmas": fitted})
    sched.save(tmp_path / "c.json")
    plan = plan_from_schedule(load_gamma_schedule(tmp_path / "c.json"), base)
    assert plan.sigmas.tolist() == fitted and plan.schedule == "fitted"
    assert plan.gammas == [0.9, 1.1, 1.0] and plan.coords == "vp" and plan.solver == "euler"
    extra = GammaSchedule([0.9, 1.1, 1.0], "ve", {**meta, "sigmas": fitted}, model_sigmas=[70.0, 2.5, 0.25],
                          history=[[], [0.1], [0.0, 0.2]])
    extra.save(tmp_path / "e.json")
    plan = plan_from_schedule(load_gamma_schedule(tmp_path / "e.json"), base)
    assert plan.model_sigmas == [70.0, 2.5, 0.25] and plan.history == [[], [0.1], [0.0, 0.2]]
    same = plan_from_schedule(GammaSchedule([1.0] * 3, "ve", {"sigmas": base.sigmas.tolist()}), base)
    assert torch.equal(same.sigmas, base.sigmas) and same.schedule == "karras"


def test_calibration_options_resolve_given_then_the_models_then_the_librarys_defaults(toy):
    mine = ModelSpec("mine", toy.denoiser, toy.process, toy.sample_shape,
                     info={"calibration_defaults": {"n": 40, "ref_steps": 50}})
    o = cal.calibration_options(mine)
    assert (o["n"], o["ref_steps"]) == (40, 50)  # the model's own
    assert (o["max_solves"], o["max_seconds"], o["ref_solver"], o["dtype"]) == (200, 60.0, "dpmpp_2m", "float32")
    assert (o["seed"], o["fit"], o["objective"]) == (cal.CALIBRATION_SEED, "both", "trajectory")
    o = cal.calibration_options(mine, n=24, ref_steps=None, max_solves=9, dtype=torch.float64, guards="residual,modes")
    assert (o["n"], o["ref_steps"], o["max_solves"], o["dtype"]) == (24, 50, 9, "float64")  # None: not given
    assert o["guards"] == ["residual", "modes"]
    plain = ModelSpec("plain", toy.denoiser, toy.process, toy.sample_shape)
    assert cal.calibration_options(plain)["n"] == 512 and cal.calibration_options(plain, variant="stein")["n"] == 1000
    assert cal.calibration_options(plain, variant="reference")["objective"] == "reference"
    with pytest.raises(ValueError, match="float32 or float64"):
        cal.calibration_options(plain, dtype=torch.float16)
    assert cal.calibration_options(plain) == cal.calibration_options(plain, **cal.calibration_options(plain))


def test_per_sample_conditioning_is_tiled_to_the_calibration_batch(toy, monkeypatch):
    """Labels for fewer samples than the calibration batch are cycled in order (the user's proportions); scalars,
    non-tensors and tensors of the batch's size pass as they are."""
    from steindiff.trajectory import TrajectoryFit

    seen = []

    def fake_fit(model, base, noise, **kw):
        seen.append(kw["extra_args"])
        return TrajectoryFit(make_plan(toy.process, "euler", 3, "karras"), {"chosen": "plain"})

    monkeypatch.setattr(cal, "fit_trajectory", fake_fit)
    y, full, scale = torch.tensor([3, 1, 4]), torch.arange(8), torch.tensor(2.0)
    calibrate(toy, solver="euler", nfe=3, n=8, dtype=torch.float64,
              extra_args={"y": y, "full": full, "scale": scale, "w": 7.5})
    got = seen[-1]
    assert got["y"].tolist() == [3, 1, 4, 3, 1, 4, 3, 1] and torch.equal(got["full"], full)
    assert got["scale"] is scale and got["w"] == 7.5


def test_the_gradient_fits_options_are_part_of_the_key(toy):
    """Absent for the derivative-free fit (the keys of files made before the gradient fit stay valid); for the
    gradient fit its parameters, distance and optimiser options each name another calibration."""
    from steindiff.calibration import calibration_key

    base = make_plan(toy.process, "euler", 4, "karras")

    def key(**kw):
        return calibration_key(toy, base, options={**FAST, "fit_method": "gradient", **kw})

    assert "gradient" not in calibration_key(toy, base, options=FAST)["options"]
    g = key()["options"]["gradient"]
    assert g["params"] == ["steps", "model_sigmas"] and g["gradient_options"] == {}
    variants = [key(params=("steps", "gamma", "history")), key(params=("gamma",)), key(teacher_ball=0.1),
                key(residual_weight=0.5), key(gradient_options={"lr": 0.01})]
    assert len({json.dumps(k, sort_keys=True) for k in [key(), *variants]}) == len(variants) + 1
    assert key(params=("model_sigmas", "steps")) == key()  # the same parameters in another order


def test_a_file_made_for_another_key_is_never_used(toy, tmp_path):
    """A file at a request's path whose recorded key differs from the request (in any field, or no key at all) is
    refused with a notice naming the difference; only the exact key is read."""
    from steindiff.calibration import cache_file, calibration_key
    from steindiff.stabilizers.schedule import GammaSchedule

    base = make_plan(toy.process, "euler", 3, "karras")
    key = calibration_key(toy, base, options=FAST)
    path = cache_file(tmp_path, key)
    meta = {"model": toy.name, "solver": "euler", "nfe": 3, "schedule": "karras", "sigmas": base.sigmas.tolist()}

    def read(recorded):
        GammaSchedule([0.8, 1.0, 1.0], "ve", {**meta, **({"key": recorded} if recorded is not None else {})}).save(path)
        notices = []
        plan = calibrated_plan(toy, base, cache_dir=tmp_path, calibrate_missing="never", notice=notices.append, **FAST)
        return plan, notices

    plan, notices = read(key)
    assert plan.gammas == [0.8, 1.0, 1.0] and notices == []
    for recorded, says in (({**key, "fingerprint": "0" * 16}, "fingerprint"), ({**key, "nfe": 4}, "nfe"),
                           ({**key, "options": {**key["options"], "seed": 1}}, "seed"), (None, "no key")):
        plan, notices = read(recorded)
        assert plan is base and notices, recorded
        assert "another configuration" in notices[0] and says in notices[0] and "plain solver" in notices[0]


def test_a_feature_function_keys_the_cache_by_its_contents_or_is_refused_by_name():
    """The gradient fit's feature function is part of the key by what it computes; one that cannot be read is
    refused naming the features function (not the model)."""
    import io

    spec = load_model("gmm:toy2d")

    def key(features):
        return cal.calibration_options(spec, fit_method="gradient", loss="features", features=features)["gradient"]

    first, second = key(lambda x: x[..., :1]), key(lambda x: x[..., 1:])
    assert first["features"].split(":")[0].endswith("<lambda>") and first != second
    assert key(lambda x: x[..., :1]) == first

    class Opaque:
        def __init__(self):
            self.stream = io.BytesIO()

        def __call__(self, x):
            return x

    with pytest.raises(ValueError, match=r"features function '\S*Opaque' cannot be identified"):
        key(Opaque())


def test_a_misspelt_fit_method_is_refused_before_any_cache_lookup(tmp_path):
    """A fit method that does not exist never falls back to the derivative-free key (and its shipped files)."""
    spec = load_model("digits")
    base = make_plan(spec.process, "dpmpp_2m", 10, "karras")
    with pytest.raises(ValueError, match="fit_method must be one of .*'gradeint'"):
        calibrated_plan(spec, base, cache_dir=tmp_path, calibrate_missing="never", fit_method="gradeint")
    assert list(tmp_path.iterdir()) == []
