"""One model, one calibration: model identity, the options in the cache key, one set of defaults for every
entry point, and ``steindiff.calibrate`` as a function.  Each test is a case users met: a plain callable
refused, two models sharing one calibration, a calibration made with other options returned silently."""

import json

import numpy as np
import pytest
import torch

import steindiff as sd
import steindiff.calibration as cal
import steindiff.stabilizers.registry as reg
from steindiff.fingerprint import AmbiguousIdentity, fingerprint
from steindiff.models import VPDenoiser
from steindiff.models.gmm import GaussianMixture
from steindiff.models.registry import ModelSpec
from steindiff.noise import DiscreteVPProcess, VEProcess

FAST = {"n": 32, "ref_steps": 20, "max_solves": 8}


class Wrapper(torch.nn.Module):
    """A denoiser module without parameters: what a user writes around a model of their own."""

    def __init__(self, gmm):
        super().__init__()
        self.gmm = gmm

    def forward(self, x, sigma):
        return self.gmm(x, sigma)


def _mixture(shift: float) -> GaussianMixture:
    return GaussianMixture(torch.tensor([[-2.0, 0.0], [2.0, shift]]), s2=0.05)


@pytest.fixture(autouse=True)
def _auto_is_calibrated(monkeypatch):
    monkeypatch.setattr(reg, "AUTO", reg.CALIBRATED)


def test_a_plain_callable_is_calibrated_and_cached(tmp_path):
    gmm = _mixture(0.0)

    def fn(x, sigma):
        return gmm(x, sigma)

    spec = ModelSpec("my-model", fn, VEProcess(), (2,))
    base = sd.make_plan(spec.process, "unipc", 4)
    notices = []
    plan = sd.calibrated_plan(spec, base, cache_dir=tmp_path, notice=notices.append, **FAST)
    assert len(notices) == 1 and len(list(tmp_path.glob("my-model-*.json"))) == 1
    assert sd.calibrated_plan(spec, base, cache_dir=tmp_path, notice=notices.append, **FAST).gammas == plan.gammas
    assert len(notices) == 1  # the second call read the cache
    x = sd.prior_noise((16, 2), 80.0, seed=0, dtype=torch.float64)
    res = sd.sample(fn, x, base.sigmas, "unipc", stabilizer="auto", process=VEProcess(), calibration_dir=tmp_path,
                    calibration_options=FAST, notice=notices.append)
    assert res.nfe == 4 and len(list(tmp_path.glob("function-*.json"))) == 1


def test_an_unidentifiable_model_is_refused_before_any_work(monkeypatch):
    monkeypatch.setattr(cal, "reference_solve", lambda *a, **k: pytest.fail("worked before refusing"), raising=False)
    monkeypatch.setattr(cal, "fit_trajectory", lambda *a, **k: pytest.fail("worked before refusing"))
    spec = ModelSpec("opaque", torch.mul, VEProcess(), (2,))
    with pytest.raises(AmbiguousIdentity, match="cannot fingerprint model 'opaque'.*fingerprint=.*--model-name"):
        sd.calibrate(spec, solver="euler", nfe=3, **FAST)
    with pytest.raises(AmbiguousIdentity):
        sd.calibrated_plan(spec, sd.make_plan(spec.process, "euler", 3))
    # an explicit identity makes it usable
    assert cal.model_fingerprint(ModelSpec("opaque", torch.mul, VEProcess(), (2,), fingerprint="mul-v1"))


def test_two_wrappers_without_parameters_do_not_share_a_calibration(tmp_path):
    a, b = Wrapper(_mixture(0.0)), Wrapper(_mixture(1.0))
    assert fingerprint(a) != fingerprint(b) and fingerprint(a) == fingerprint(Wrapper(_mixture(0.0)))
    sig = sd.get_sigmas("karras", 4, VEProcess())
    x = sd.prior_noise((16, 2), float(sig[0]), seed=0, dtype=torch.float64)
    notices = []
    kw = dict(stabilizer="auto", process=VEProcess(), calibration_dir=tmp_path, calibration_options=FAST,
              notice=notices.append)
    sd.sample(a, x, sig, "dpmpp_2m", **kw)
    sd.sample(b, x, sig, "dpmpp_2m", **kw)
    assert len(notices) == 2 and len(list(tmp_path.glob("*.json"))) == 2  # the second model was fitted too


def test_fingerprint_reads_attributes_closures_and_globals():
    gmm = _mixture(0.0)
    scale = torch.tensor(2.0)

    def f(x, s):
        return gmm(x, s) * scale

    before = fingerprint(f)
    scale.add_(1.0)  # the closure's tensor changed in place
    assert fingerprint(f) != before
    den = VPDenoiser(lambda x, t: x, DiscreteVPProcess(), prediction="epsilon")
    assert fingerprint(den) != fingerprint(VPDenoiser(lambda x, t: x, DiscreteVPProcess(), prediction="v"))
    assert fingerprint(den) != fingerprint(VPDenoiser(lambda x, t: x, DiscreteVPProcess(beta_end=0.03)))


def test_other_options_are_another_calibration_never_returned_silently(tmp_path):
    spec = ModelSpec("m", Wrapper(_mixture(0.0)), VEProcess(), (2,))
    base = sd.make_plan(spec.process, "euler", 4)
    sd.calibrated_plan(spec, base, cache_dir=tmp_path, **FAST)
    (first,) = tmp_path.glob("*.json")
    notices = []
    other = {**FAST, "n": 48, "guards": ["significance"], "dtype": torch.float64}
    assert sd.calibrated_plan(spec, base, cache_dir=tmp_path, calibrate_missing=False, notice=notices.append,
                              **other) is base
    assert len(notices) == 1 and "other options" in notices[0] and "n: 32 in the file, 48 requested" in notices[0]
    assert "guards" in notices[0] and "dtype" in notices[0] and "using the plain solver" in notices[0]
    sd.calibrated_plan(spec, base, cache_dir=tmp_path, notice=notices.append, **other)
    assert len(list(tmp_path.glob("*.json"))) == 2 and first.exists()
    for f in tmp_path.glob("*.json"):  # each file records the options it was fitted with
        obj = json.loads(f.read_text())
        assert obj["key"]["options"]["n"] == obj["calibration"]["n"]
        assert obj["key"]["options"]["seed"] == obj["calibration"]["seed"]


def test_a_file_whose_key_differs_is_refused_and_refitted_saying_why(tmp_path):
    spec = ModelSpec("m", Wrapper(_mixture(0.0)), VEProcess(), (2,))
    base = sd.make_plan(spec.process, "euler", 4)
    sd.calibrated_plan(spec, base, cache_dir=tmp_path, **FAST)
    (f,) = tmp_path.glob("*.json")
    obj = json.loads(f.read_text())
    obj["key"]["options"]["seed"] = 7  # a file whose recorded options are not the request's
    f.write_text(json.dumps(obj))
    notices = []
    sd.calibrated_plan(spec, base, cache_dir=tmp_path, notice=notices.append, **FAST)
    assert "seed: 7 in the file" in notices[0] and "fitting it again" in notices[0]
    assert json.loads(f.read_text())["key"]["options"]["seed"] == cal.CALIBRATION_SEED


def test_every_entry_point_resolves_the_same_defaults(tmp_path, monkeypatch):
    model = Wrapper(_mixture(0.0))
    proc = VEProcess()
    sig = sd.get_sigmas("karras", 4, proc)
    x = sd.prior_noise((16, 2), float(sig[0]), seed=0, dtype=torch.float64)  # the sample's dtype does not matter
    sd.sample(model, x, sig, "dpmpp_2m", stabilizer="auto", process=proc, calibration_dir=tmp_path,
              calibration_options=FAST, notice=lambda m: None)
    (f,) = tmp_path.glob("*.json")
    key = json.loads(f.read_text())["key"]
    spec = ModelSpec("Wrapper", model, proc, (2,))
    base = sd.SamplingPlan("dpmpp_2m", sig, "custom")
    assert key == cal.calibration_key(spec, base, options=FAST)
    assert key["options"]["dtype"] == cal.CALIBRATION_DEFAULTS["dtype"] == "float32"
    assert key["options"]["ref_steps"] == FAST["ref_steps"] and key["options"]["max_seconds"] == 60.0
    assert sd.calibrated_plan(spec, base, cache_dir=tmp_path, calibrate_missing=False, **FAST).gammas is not None
    # a model's declared defaults are its own: the same rule for calibrate(), calibrated_plan and auto
    spec64 = ModelSpec("Wrapper", model, proc, (2,), info={"calibration_defaults": {"dtype": "float64", "n": 40}})
    opts = cal.calibration_options(spec64)
    assert opts["dtype"] == "float64" and opts["n"] == 40 and opts["ref_steps"] == 200
    assert cal.calibration_options(spec64, n=24)["n"] == 24
    with pytest.raises(ValueError, match="unknown calibration option"):
        cal.calibration_options(spec64, budget=3)


def test_auto_takes_the_models_process_and_never_assumes_one(tmp_path, monkeypatch):
    seen = []

    def fake_plan(spec, base, **kw):
        seen.append(spec.process)
        return base

    monkeypatch.setattr("steindiff.api.calibrated_plan", fake_plan)
    proc = DiscreteVPProcess()
    den = VPDenoiser(lambda x, t: torch.zeros_like(x), proc, prediction="x0")
    sig = sd.get_sigmas("karras", 3, proc)
    x = sd.prior_noise((4, 2), float(sig[0]), proc, seed=0)
    sd.sample(den, x, sig, "euler", stabilizer="auto", calibration_dir=tmp_path)
    assert seen == [proc]  # a VP model's prior is drawn at its own scale, not a VE one
    with pytest.raises(ValueError, match="process="):
        sd.sample(lambda x, s: x, x, sig, "euler", stabilizer="auto", calibration_dir=tmp_path)


def test_calibrate_is_the_function():
    assert callable(sd.calibrate) and sd.calibrate is cal.calibrate and "calibrate" in sd.__all__
    import importlib

    assert importlib.import_module("steindiff.calibration") is cal


def test_the_model_fingerprint_changes_with_every_part_of_the_model():
    """Weights, mixture weights and covariances, buffers, the noise process and the sample shape each change the
    model's fingerprint; the same contents in new objects keep it."""
    means = torch.tensor([[-2.0, 0.0], [2.0, 1.0]])

    def spec(gmm=None, process=None, shape=(2,), **kw):
        gmm = gmm if gmm is not None else GaussianMixture(means.clone(), s2=0.05)
        return ModelSpec("m", gmm, process or VEProcess(0.002, 80.0), shape, **kw)

    ref = cal.model_fingerprint(spec())
    assert cal.model_fingerprint(spec()) == ref
    others = {
        "weights": spec(GaussianMixture(means.clone(), torch.tensor([0.3, 0.7]), s2=0.05)),
        "means": spec(GaussianMixture(means + 1e-6, s2=0.05)),
        "s2": spec(GaussianMixture(means.clone(), s2=0.06)),
        "sigma_max": spec(process=VEProcess(0.002, 40.0)),
        "sigma_min": spec(process=VEProcess(0.01, 80.0)),
        "process": spec(process=DiscreteVPProcess()),
        "shape": spec(shape=(1, 2)),
        "user": spec(fingerprint="v1"),
    }
    prints = {k: cal.model_fingerprint(v) for k, v in others.items()}
    assert ref not in prints.values() and len(set(prints.values())) == len(prints), prints
    assert cal.model_fingerprint(spec(fingerprint="v2")) != prints["user"]

    net = torch.nn.BatchNorm1d(2)
    a = fingerprint(net)
    net.running_mean += 1e-3  # a buffer, not a parameter
    b = fingerprint(net)
    with torch.no_grad():
        net.weight[1] = 2.0
    assert len({a, b, fingerprint(net)}) == 3
    lin = torch.nn.Linear(2, 2).double()
    before = fingerprint(lin)
    lin.float()  # in place, by assigning each parameter's .data
    assert fingerprint(lin) != before  # the same weights, rounded: another model
    same = torch.nn.Linear(2, 2)
    same.load_state_dict(lin.state_dict())
    assert fingerprint(same) == fingerprint(lin)
    lin.weight.data = torch.ones(2, 2)  # new weights without an in-place change: not the memoised digest
    same.load_state_dict(lin.state_dict())
    assert fingerprint(lin) == fingerprint(same) != before
    zeros, ones = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    torch.nn.init.zeros_(zeros.weight), torch.nn.init.ones_(ones.weight)
    zeros.bias.data.zero_(), ones.bias.data.zero_()
    assert fingerprint(zeros) != fingerprint(ones)  # one architecture, other values


SCALE = 2.0


def test_fingerprint_of_a_function_follows_what_determines_its_output():
    """A function's code, default arguments, closure values and the globals it reads; a partial's arguments; a
    bound method's object; the values and keys of the containers it holds.  Equal contents, equal fingerprints."""
    import functools

    global SCALE

    def make(k, offset=0.0):
        def f(x, s, shift=offset):
            return k * x + shift
        return f

    base = fingerprint(make(2.0))
    assert fingerprint(make(2.0)) == base
    assert fingerprint(make(3.0)) != base  # a closure value
    assert fingerprint(make(2.0, 1.0)) != base  # a default argument

    def g(x, s):
        return SCALE * x

    def h(x, s):
        return SCALE * x + 0

    before = fingerprint(g)
    assert fingerprint(h) != before  # the code
    SCALE = 3.0
    try:
        assert fingerprint(g) != before  # a global it reads
    finally:
        SCALE = 2.0
    assert fingerprint(g) == before

    def fn(x, s, a=1.0, table=None):
        return x

    p = fingerprint(functools.partial(fn, a=2.0))
    assert p != fingerprint(functools.partial(fn, a=3.0)) and p == fingerprint(functools.partial(fn, a=2.0))
    assert fingerprint(functools.partial(fn, table={"a": 1, "b": 2})) != \
        fingerprint(functools.partial(fn, table={"a": 2, "b": 1}))
    assert fingerprint(functools.partial(fn, table={"a": 1})) != fingerprint(functools.partial(fn, table={"b": 1}))
    assert fingerprint(functools.partial(fn, table=[1, 2])) != fingerprint(functools.partial(fn, table=[2, 1]))
    assert fingerprint(functools.partial(fn, table={"a": 1, "b": 2})) == \
        fingerprint(functools.partial(fn, table={"b": 2, "a": 1}))

    class Model:
        def __init__(self, w):
            self.w = w

        def __call__(self, x, s):
            return self.w * x

    assert fingerprint(Model(1.0).__call__) != fingerprint(Model(2.0).__call__)
    assert fingerprint(Model(torch.ones(3))) != fingerprint(Model(torch.ones(3) * 2))
    assert fingerprint(Model(np.ones(3))) != fingerprint(Model(np.zeros(3)))
