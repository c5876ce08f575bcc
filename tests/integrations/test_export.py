"""export_calibration: the exported levels fed to the pipeline's own diffusers scheduler reproduce the plan's noise
levels (VP: EulerDiscreteScheduler; flow: FlowMatchEulerDiscreteScheduler, static shift and dynamic mu); the
k-diffusion and ComfyUI lists; the usage lines say when gammas cannot be applied."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from steindiff.integrations.diffusers_flow import flow_scheduler_config  # noqa: E402
from steindiff.integrations.diffusers_scheduler import SteinDiffScheduler  # noqa: E402
from steindiff.integrations.export import export_calibration  # noqa: E402
from steindiff.noise import FlowProcess  # noqa: E402
from steindiff.plan import SamplingPlan  # noqa: E402

SD = diffusers.PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SD3 = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
FLUX = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)


def calibrated(config, steps=4, gammas=(0.9, 1.1, 1.0, 1.0), **kw) -> SteinDiffScheduler:
    """A scheduler with a calibration of moved levels, recording the pipeline it was made for, as
    calibrate_scheduler makes it."""
    base = SteinDiffScheduler.from_config(config).plan_for(steps, **kw)
    sig = base.sigmas.clone()
    sig[1:-1] *= 0.7
    sched = SteinDiffScheduler.from_config(config)
    record = ({"scheduler": sched.flow.as_dict()} if sched.flow is not None else
              {"scheduler": {k: sched.config[k] for k in ("num_train_timesteps", "beta_start", "beta_end",
                                                           "beta_schedule", "trained_betas",
                                                           "rescale_betas_zero_snr")}})
    record.update(process=repr(sched.process), mu=kw.get("mu"), height=64, width=64)
    plan = SamplingPlan("dpmpp_2m", sig, "fitted", list(gammas)[:steps], "ve", {},
                        {"schedule": base.schedule, "base_sigmas": base.sigmas.tolist(), "pipeline": record,
                         "solver": "dpmpp_2m", "model": "diffusers", "nfe": steps, "sigmas": sig.tolist()})
    return SteinDiffScheduler.from_config(config, calibration=plan)


@pytest.mark.parametrize("config,kw", [(SD, {}), (SD3, {}), (FLUX, {"mu": 0.83})])
def test_diffusers_export_reproduces_the_levels_in_the_pipelines_own_scheduler(config, kw, tmp_path):
    ours = calibrated(config, **kw)
    path = tmp_path / "cal.json"
    ours.save_calibration(path)
    ex = export_calibration(path, "diffusers")
    ours.set_timesteps(4, **kw)
    if ours.flow is None:  # VP: Euler from the same config takes VE sigmas
        own = diffusers.EulerDiscreteScheduler.from_config(config.config)
        own.set_timesteps(sigmas=ex.sigmas)
        assert "EulerDiscreteScheduler" in ex.usage and ex.mu is None
    else:  # flow: the pipeline's own FlowMatchEuler shifts the exported times back to the calibration's
        own = diffusers.FlowMatchEulerDiscreteScheduler.from_config(config.config)
        own.set_timesteps(sigmas=ex.sigmas, mu=ex.mu)
        assert ex.mu == kw.get("mu")
    torch.testing.assert_close(own.sigmas, ours.sigmas, rtol=2e-6, atol=1e-6)  # the same levels...
    torch.testing.assert_close(own.timesteps.float(), ours.timesteps, rtol=2e-6, atol=1e-3)  # ...and model times
    torch.testing.assert_close(torch.tensor(ex.timesteps, dtype=torch.float32), ours.timesteps, rtol=2e-6, atol=1e-3)
    # the usage line says the gammas are not applied, and what applies them
    assert "gammas are not 1 (0.9 to 1.1)" in ex.usage and "SteinDiffScheduler" in ex.usage
    assert not ex.gammas_applied and ex.gammas == [0.9, 1.1, 1.0, 1.0]


def test_kdiffusion_and_comfyui_lists(tmp_path):
    flow = calibrated(SD3, gammas=(1.0, 1.0, 1.0, 1.0))
    flow.save_calibration(tmp_path / "f.json")
    k = export_calibration(tmp_path / "f.json", "kdiffusion")
    c = export_calibration(tmp_path / "f.json", "comfyui")
    sig = torch.tensor(flow.calibration["sigmas"], dtype=torch.float64)
    assert k.sigmas == sig.tolist() and k.sigmas[-1] == 0.0  # VE levels ending in 0
    torch.testing.assert_close(torch.tensor(c.sigmas, dtype=torch.float64), FlowProcess.sigma_to_t(sig))  # flow t
    assert [float(v) for v in c.text.split(", ")] == pytest.approx(c.sigmas, rel=1e-8)
    assert "ManualSigmas" in c.usage and "flow times t" in c.usage
    # gammas of 1: nothing to warn about
    assert "gammas" not in k.usage and "gammas" not in c.usage
    vp = calibrated(SD)
    vp.save_calibration(tmp_path / "v.json")
    c = export_calibration(tmp_path / "v.json", "comfyui")
    assert c.sigmas == vp.calibration["sigmas"] and "VE sigmas" in c.usage and "gammas are not 1" in c.usage
    k = export_calibration(tmp_path / "v.json", "kdiffusion")
    assert "steindiff.integrations.kdiffusion.sample_dpmpp_2m" in k.usage


def test_export_needs_what_the_calibration_does_not_record(tmp_path):
    # a plain calibration file of `steindiff calibrate` records no pipeline: diffusers needs the config
    plan = SamplingPlan("euler", torch.tensor([14.6, 2.0, 0.5, 0.0], dtype=torch.float64), "fitted", [1.0, 0.9, 1.0],
                        meta={"model": "x", "solver": "euler", "nfe": 3, "schedule": "karras",
                              "sigmas": [14.6, 2.0, 0.5, 0.0]})
    with pytest.raises(ValueError, match="needs the pipeline's scheduler config"):
        export_calibration(plan, "diffusers")
    ex = export_calibration(plan, "diffusers", scheduler_config=dict(SD.config))
    assert ex.sigmas == plan.sigmas.tolist() and len(ex.timesteps) == 3
    with pytest.raises(ValueError, match="needs mu"):
        export_calibration(plan, "diffusers", scheduler_config=dict(FLUX.config))
    ex = export_calibration(plan, "diffusers", scheduler_config=dict(FLUX.config), mu=0.5)
    torch.testing.assert_close(flow_scheduler_config(FLUX).schedule(0.5).shifted(ex.sigmas),
                               FlowProcess.sigma_to_t(plan.sigmas[:-1]))
    # the config of a pipeline saved with SteinDiffScheduler in it reads as the flow config it was made from
    ours = dict(SteinDiffScheduler.from_config(FLUX.config).config)
    assert export_calibration(plan, "diffusers", scheduler_config=ours, mu=0.5) == ex
    with pytest.raises(ValueError, match="unknown export format 'onnx'"):
        export_calibration(plan, "onnx")
