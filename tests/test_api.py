"""steindiff.sample: stabilizers by name, and ``auto`` as the calibrated sampler on any nn.Module."""

import pytest
import torch

import steindiff as sd
import steindiff.stabilizers.registry as reg
from steindiff.models.gmm import get_gmm
from steindiff.stabilizers.schedule import load_gamma_schedule


class MixtureModule(torch.nn.Module):
    """An nn.Module denoiser (so it has weights to fingerprint) computing an exact mixture's D(x, sigma)."""

    def __init__(self):
        super().__init__()
        self.gmm = get_gmm("gmm:toy2d")
        self.register_buffer("means", self.gmm.means.clone())

    def forward(self, x, sigma):
        return self.gmm(x, sigma)


def test_named_stabilizer_equals_the_object():
    gmm = get_gmm("gmm:toy2d")
    sig = sd.get_sigmas("karras", 4, sd.VEProcess())
    x = sd.prior_noise((64, 2), float(sig[0]), seed=0, dtype=torch.float64)
    a = sd.sample(gmm, x, sig, "euler", stabilizer="stein-energy")
    b = sd.sample(gmm, x, sig, "euler", stabilizer=sd.stabilizers.make_stabilizer("stein-energy"))
    assert torch.equal(a.x, b.x) and a.extra_passes == b.extra_passes > 0


def test_auto_is_the_calibrated_sampler_and_is_cached(tmp_path, monkeypatch):
    monkeypatch.setattr(reg, "AUTO", reg.CALIBRATED)
    model = MixtureModule()
    sig = sd.get_sigmas("karras", 4, sd.VEProcess())
    x = sd.prior_noise((100, 2), float(sig[0]), seed=0, dtype=torch.float64)
    opts = {"n": 64, "ref_steps": 40, "max_solves": 30}
    kw = dict(stabilizer="auto", calibration_dir=tmp_path, calibration_options=opts, process=sd.VEProcess())
    res = sd.sample(model, x, sig, "dpmpp_2m", **kw)
    (f,) = tmp_path.glob("*.json")
    assert f.name.startswith("MixtureModule-dpmpp_2m")
    assert res.nfe == 4 and res.extra_passes == 0
    again = sd.sample(model, x, sig, "dpmpp_2m", calibrate=False, **kw)
    assert torch.equal(again.x, res.x)
    plain = sd.sample(model, x, sig, "dpmpp_2m")
    cached = load_gamma_schedule(f)
    if cached.meta["calibration"]["chosen"] == "plain":
        assert torch.equal(res.x, plain.x)
    else:
        assert not torch.equal(res.x, plain.x)
    # nothing cached for another solver and calibration off: the plain solver
    other = sd.sample(model, x, sig, "euler", calibrate=False, **kw)
    assert torch.equal(other.x, sd.sample(model, x, sig, "euler").x)


def test_auto_refuses_a_model_it_cannot_identify_before_any_work(tmp_path, monkeypatch):
    import steindiff.calibration as cal

    monkeypatch.setattr(reg, "AUTO", reg.CALIBRATED)
    monkeypatch.setattr(cal, "fit_trajectory", lambda *a, **k: pytest.fail("fitted an unidentifiable model"))
    sig = sd.get_sigmas("karras", 3, sd.VEProcess())
    x = sd.prior_noise((8, 2), float(sig[0]), seed=0, dtype=torch.float64)
    with pytest.raises(ValueError, match="cannot fingerprint.*fingerprint="):
        sd.sample(torch.mul, x, sig, "euler", stabilizer="auto", calibration_dir=tmp_path, process=sd.VEProcess())
    assert list(tmp_path.iterdir()) == []


def test_auto_on_a_flow_model_calibrates_on_its_own_process(tmp_path, monkeypatch):
    """A FlowDenoiser's process (prior x_t ~ N(0, I) at t_max) is the calibration's, not a VE one."""
    import steindiff.api as api
    from steindiff.models import FlowDenoiser

    monkeypatch.setattr(reg, "AUTO", reg.CALIBRATED)
    seen = []

    def fake_plan(spec, base, **kw):
        seen.append(spec.process)
        return base

    monkeypatch.setattr(api, "calibrated_plan", fake_plan)
    process = sd.FlowProcess(1e-3, 1 - 1e-3)
    den = FlowDenoiser(get_gmm("gmm:toy2d").velocity_net(), process)
    sig = sd.get_sigmas("flow", 3, process)
    x = sd.prior_noise((8, 2), float(sig[0]), process, seed=0, dtype=torch.float64)
    sd.sample(den, x, sig, "euler", stabilizer="auto", calibration_dir=tmp_path)
    assert seen == [process]
