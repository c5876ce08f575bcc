"""SteinDiffScheduler inside unmodified diffusers pipelines (Stable Diffusion, SD3, FLUX; text-to-image and
image-to-image), plain and calibrated: the pipelines' latents equal steindiff's own solve of the same model,
``sample_pipeline``; sample_pipeline on the flow pipelines (its arguments, latents, decoding); refusals name the
mismatch.  Tiny random pipelines built offline (tiny_pipelines.py), float64."""

from __future__ import annotations

import re

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import tiny_pipelines as tp  # noqa: E402

import steindiff as sd  # noqa: E402
from steindiff.integrations.diffusers_flow import (  # noqa: E402
    encode_prompts,
    flow_scheduler_config,
    pipeline_schedule_kwargs,
)
from steindiff.integrations.diffusers_pipeline import sample_pipeline  # noqa: E402
from steindiff.integrations.diffusers_scheduler import (  # noqa: E402
    SteinDiffScheduler,
    _evaluation_layout,
    calibrate_scheduler,
)
from steindiff.noise import FLOW_T_DELTA  # noqa: E402
from steindiff.plan import SamplingPlan  # noqa: E402

G = 3.0
SMALL = {"n": 8, "ref_steps": 8, "max_solves": 2, "max_seconds": 10.0}


def embeds(pipe, k=2):
    return encode_prompts(pipe, ["a cat", "dogs"][:k], guidance_scale=G, max_sequence_length=8) \
        if getattr(pipe, "transformer", None) is not None else encode_prompts(pipe, ["a cat", "dogs"][:k],
                                                                            guidance_scale=G)


def call_kwargs(pipe, emb):
    kw = {k: v for k, v in emb.items() if k != "text_ids"}
    if getattr(pipe, "transformer", None) is not None:
        kw.update(height=8, width=8, max_sequence_length=8)
    return kw


def noise(pipe, n=2):
    shape = (n, 16, 4) if "Flux" in type(pipe).__name__ else (n, 4, 8, 8)
    return torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


def reference(pipe, emb, lat, **kw):
    """sample_pipeline of the same call: float64, from the pipeline's latents, 8x8 pixels for the flow pipelines."""
    size = dict(height=8, width=8) if getattr(pipe, "transformer", None) is not None else {}
    return sample_pipeline(pipe, **emb, guidance_scale=G, latents=lat, dtype=torch.float64, output_type="latent",
                           **size, **kw)


def hand_calibration(sched, n, **kw) -> SamplingPlan:
    """A calibration as calibrate_scheduler makes one: moved interior levels, gammas away from 1, its base levels."""
    base = sched.plan_for(n, **kw)
    sig = base.sigmas.clone()
    sig[1:-1] *= 0.8
    gammas = [0.9, 1.15, 0.95, 1.0, 1.05][: base.steps]
    return SamplingPlan(base.solver, sig, "fitted", gammas, "ve", {},
                        {"schedule": base.schedule, "base_sigmas": base.sigmas.tolist(), "name": "hand"})


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


# ------------------------------------------------------------------------------------------------------------
# plain solvers in the pipelines
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("solver", ["dpmpp_2m", "heun", "unipc", "dpmpp_3m"])
def test_stable_diffusion_pipeline_equals_sample_pipeline(sd_pipe, solver):
    emb = embeds(sd_pipe)
    sd_pipe.scheduler = SteinDiffScheduler.from_config(tp.stable_diffusion_scheduler().config, solver=solver)
    lat = noise(sd_pipe)
    out = sd_pipe(**call_kwargs(sd_pipe, emb), guidance_scale=G, num_inference_steps=5, latents=lat,
                  output_type="latent").images
    sch = sd_pipe.scheduler
    ref = sample_pipeline(sd_pipe, **emb, guidance_scale=G, solver=solver, nfe=sch.nfe, schedule="karras",
                          latents=lat, dtype=torch.float64, output_type="latent")
    assert ref.nfe == len(sch.timesteps) == (9 if solver == "heun" else 5)
    assert rel(out, ref.latents) < 1e-12
    torch.testing.assert_close(sch.plan.sigmas, ref.sigmas)
    # the model saw the fractional timesteps of those levels (interpolated table times), Heun's twice
    torch.testing.assert_close(sch.timesteps.double(), sch.process.sigma_to_t(sch.sigmas[:-1].double()),
                               rtol=1e-6, atol=1e-3)


@pytest.mark.parametrize("which,solver", [("sd3", "dpmpp_2m"), ("sd3", "heun"), ("flux", "dpmpp_2m"),
                                          ("flux", "unipc"), ("flux", "euler")])
def test_flow_pipelines_equal_sample_pipeline(which, solver, sd3_pipe, flux_pipe):
    pipe = sd3_pipe if which == "sd3" else flux_pipe
    pipe.scheduler = SteinDiffScheduler.from_config(tp.flow_scheduler(which).config, solver=solver)
    emb = embeds(pipe)
    lat = noise(pipe)
    out = pipe(**call_kwargs(pipe, emb), guidance_scale=G, num_inference_steps=4, latents=lat,
               output_type="latent").images
    sch = pipe.scheduler
    ref = reference(pipe, emb, lat, solver=solver, nfe=sch.nfe)  # its default plan: the scheduler's for this call
    assert ref.nfe == len(sch.timesteps) == (7 if solver == "heun" else 4)
    assert rel(out, ref.latents) < 1e-9
    torch.testing.assert_close(ref.sigmas, sch.plan.sigmas)
    # diffusers' flow levels (its first, t = 1, taken at 1 - FLOW_T_DELTA), shifted as the pipeline asked
    kw = pipeline_schedule_kwargs(pipe, 4, 8, 8)
    schedule = flow_scheduler_config(tp.flow_scheduler(which)).schedule(kw.get("mu"))
    want = schedule.shifted(kw["sigmas"]) if "sigmas" in kw else schedule.times(4)
    want = want.clamp(max=1 - FLOW_T_DELTA)
    torch.testing.assert_close(sd.noise.FlowProcess.sigma_to_t(sch.plan.sigmas[:-1]), want)
    assert sch.timesteps[0] == pytest.approx((1 - FLOW_T_DELTA) * 1000, rel=1e-6)


@pytest.mark.parametrize("which,theirs,solver", [("sd3", "FlowMatchEulerDiscreteScheduler", "euler"),
                                                 ("sd3", "FlowMatchHeunDiscreteScheduler", "heun_flow"),
                                                 ("flux", "FlowMatchEulerDiscreteScheduler", "euler")])
def test_flow_pipelines_equal_diffusers_own_flow_scheduler(which, theirs, solver, sd3_pipe, flux_pipe):
    """The same method as diffusers' own flow scheduler, in the same pipeline from the same latents, gives its
    latents to the error of starting at 1 - FLOW_T_DELTA instead of t = 1: measured 1e-6 and below (4 steps; a
    stand-in of 1 - 1e-4 is off by 6e-5 to 1e-4)."""
    pipe = sd3_pipe if which == "sd3" else flux_pipe
    emb = embeds(pipe)
    call = dict(**call_kwargs(pipe, emb), guidance_scale=G, num_inference_steps=4, latents=noise(pipe),
                output_type="latent")
    pipe.scheduler = getattr(diffusers, theirs).from_config(tp.flow_scheduler(which).config)
    ref = pipe(**call).images
    pipe.scheduler = SteinDiffScheduler.from_config(tp.flow_scheduler(which).config, solver=solver)
    assert rel(pipe(**call).images, ref) < 3e-6
    pipe.scheduler = SteinDiffScheduler.from_config(tp.flow_scheduler(which).config, solver=solver, flow_t_max=1 - 1e-4)
    assert rel(pipe(**call).images, ref) > 3e-5  # the comparison sees where t = 1 is taken


def test_flow_karras_spans_the_shifted_range(flux_pipe):
    """karras on a flow config: Karras steps between the shifted flow levels' ends (mu moves them)."""
    sch = SteinDiffScheduler.from_config(tp.flow_scheduler("flux").config, schedule="karras")
    a = sch.plan_for(**pipeline_schedule_kwargs(flux_pipe, 5, 8, 8))
    b = sch.plan_for(**pipeline_schedule_kwargs(flux_pipe, 5, 64, 64))
    flow = sch.plan_for(None, **{**pipeline_schedule_kwargs(flux_pipe, 5, 8, 8)})
    assert a.schedule == "karras" and a.steps == 5 and not torch.allclose(a.sigmas, b.sigmas)
    torch.testing.assert_close(a.sigmas, sd.karras_sigmas(5, float(flow.sigmas[-2]), float(flow.sigmas[0])))


# ------------------------------------------------------------------------------------------------------------
# calibrated
# ------------------------------------------------------------------------------------------------------------
def test_calibrated_stable_diffusion_equals_sample_pipeline(sd_pipe):
    base = SteinDiffScheduler.from_config(tp.stable_diffusion_scheduler().config, solver="dpmpp_2m")
    plan = hand_calibration(base, 4)
    sd_pipe.scheduler = SteinDiffScheduler.from_config(tp.stable_diffusion_scheduler().config, calibration=plan)
    emb, lat = embeds(sd_pipe), noise(sd_pipe)
    out = sd_pipe(**call_kwargs(sd_pipe, emb), guidance_scale=G, num_inference_steps=4, latents=lat,
                  output_type="latent").images
    ref = sample_pipeline(sd_pipe, **emb, guidance_scale=G, calibration=plan, latents=lat, dtype=torch.float64,
                          output_type="latent")
    assert rel(out, ref.latents) < 1e-12 and ref.nfe == 4 == len(sd_pipe.scheduler.timesteps)
    plain = sample_pipeline(sd_pipe, **emb, guidance_scale=G, solver="dpmpp_2m", nfe=4, latents=lat,
                            dtype=torch.float64, output_type="latent")
    assert rel(out, plain.latents) > 1e-3  # the calibration changed the solve
    # the model is fed the calibration's moved levels as fractional timesteps
    t = sd_pipe.scheduler.timesteps
    assert not torch.equal(t, t.round()) and torch.equal(sd_pipe.scheduler.sigmas, plan.sigmas.float())


@pytest.mark.parametrize("which", ["sd3", "flux"])
def test_calibrated_flow_pipelines_equal_sample_pipeline(which, sd3_pipe, flux_pipe):
    pipe = sd3_pipe if which == "sd3" else flux_pipe
    config = tp.flow_scheduler(which).config
    plan = hand_calibration(SteinDiffScheduler.from_config(config, solver="dpmpp_2m"), None,
                            **pipeline_schedule_kwargs(pipe, 4, 8, 8)) if which == "flux" else \
        hand_calibration(SteinDiffScheduler.from_config(config), 4)
    pipe.scheduler = SteinDiffScheduler.from_config(config, calibration=plan)
    emb, lat = embeds(pipe), noise(pipe)
    out = pipe(**call_kwargs(pipe, emb), guidance_scale=G, num_inference_steps=4, latents=lat,
               output_type="latent").images
    ref = reference(pipe, emb, lat, calibration=plan)
    assert ref.nfe == 4 and rel(out, ref.latents) < 1e-9
    plain = reference(pipe, emb, lat, solver="dpmpp_2m", nfe=4)
    torch.testing.assert_close(plain.sigmas, torch.as_tensor(plan.meta["base_sigmas"], dtype=torch.float64))
    assert rel(out, plain.latents) > 1e-3  # the calibration changed the solve
    # FLUX: another image size is another mu, and the calibration is refused naming it
    if which == "flux":
        mu8, mu16 = (pipeline_schedule_kwargs(pipe, 4, s, s)["mu"] for s in (8, 16))
        pipe.scheduler = SteinDiffScheduler.from_config(config, calibration={
            **pipe.scheduler.calibration, "pipeline": {"mu": mu8, "height": 8, "width": 8}})
        with pytest.raises(ValueError, match=re.escape(f"made for the resolution shift mu={mu8:.6g} (8x8 pixels), this "
                                                       f"call's is mu={mu16:.6g} (another image size)")):
            pipe(**{**call_kwargs(pipe, emb), "height": 16, "width": 16}, guidance_scale=G, num_inference_steps=4,
                 output_type="latent")


# ------------------------------------------------------------------------------------------------------------
# image to image
# ------------------------------------------------------------------------------------------------------------
def spy_noising(sched, name):
    seen = {}
    orig = getattr(sched, name)

    def spy(*a):
        seen["x"] = orig(*a)
        return seen["x"]

    setattr(sched, name, spy)
    return seen


@pytest.mark.parametrize("which,solver,calibrated", [("sd", "dpmpp_2m", False), ("sd", "heun", False),
                                                     ("sd", "dpmpp_2m", True), ("sd3", "dpmpp_2m", False),
                                                     ("sd3", "heun", True)])
def test_img2img_pipelines_start_the_solve_at_their_strength(which, solver, calibrated):
    pipe = tp.stable_diffusion(img2img=True) if which == "sd" else tp.stable_diffusion_3(img2img=True)
    config = (tp.stable_diffusion_scheduler() if which == "sd" else tp.flow_scheduler("sd3")).config
    plan = hand_calibration(SteinDiffScheduler.from_config(config, solver=solver), 5) if calibrated else None
    sch = SteinDiffScheduler.from_config(config, solver=solver, calibration=plan)
    pipe.scheduler = sch
    seen = spy_noising(sch, "add_noise" if which == "sd" else "scale_noise")
    emb = embeds(pipe, 1)
    img = torch.rand(1, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    out = pipe(**call_kwargs(pipe, emb), image=img, strength=0.6, guidance_scale=G, num_inference_steps=5,
               output_type="latent", generator=torch.Generator().manual_seed(0)).images
    i0 = sch._layout[sch.begin_index][0]
    assert i0 == 2 and sch.begin_index == i0 * sch.order  # strength 0.6 of 5 steps: the last 3
    sig = sch.plan.sigmas[i0:]
    gam = None if plan is None else plan.gammas[i0:]
    if calibrated:  # the calibration's tail: its own levels and gammas from that step on
        ref = sample_pipeline(pipe, **emb, guidance_scale=G, calibration=SamplingPlan(solver, sig, "fitted", gam),
                              latents=seen["x"], dtype=torch.float64, output_type="latent")
    else:
        ref = sample_pipeline(pipe, **emb, guidance_scale=G, solver=solver, schedule=sig, latents=seen["x"],
                              dtype=torch.float64, output_type="latent")
    assert rel(out, ref.latents) < 1e-9


def test_noising_matches_diffusers_own(sd3_pipe):
    """add_noise is x_vp = alpha x0 + sigma_vp eps at the first level of the run (DDPM's formula); scale_noise is
    FlowMatchEuler's (1 - t) x0 + t eps."""
    x0 = torch.randn(2, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    eps = torch.randn(2, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    vp = SteinDiffScheduler.from_config(tp.stable_diffusion_scheduler().config)
    vp.set_timesteps(5)
    vp.set_begin_index(2)
    s = vp.plan.sigmas[2]
    a = 1 / (1 + s**2).sqrt()
    torch.testing.assert_close(vp.add_noise(x0, eps, vp.timesteps[2:3]), a * x0 + a * s * eps)
    fl = SteinDiffScheduler.from_config(tp.flow_scheduler("sd3").config)
    fl.set_timesteps(5)
    t = float(fl.sigmas[3])
    torch.testing.assert_close(fl.scale_noise(x0, fl.timesteps[3:4], eps), (1 - t) * x0 + t * eps, rtol=1e-6,
                               atol=1e-6)


# ------------------------------------------------------------------------------------------------------------
# the scheduler's own contract
# ------------------------------------------------------------------------------------------------------------
def test_layout_order_and_attributes():
    sch = SteinDiffScheduler.from_config(tp.stable_diffusion_scheduler().config, solver="heun")
    assert sch.order == 2 and sch.init_noise_sigma == 1.0
    sch.set_timesteps(4)
    s = sch.plan.sigmas
    assert [round(v, 9) for _, v in _evaluation_layout(sch.solver, s)] == \
        [round(float(v), 9) for v in (s[0], s[1], s[1], s[2], s[2], s[3], s[3])]
    assert len(sch.timesteps) == 7 == sch.nfe and sch.num_inference_steps == 4 and len(sch.sigmas) == 8
    x = torch.ones(1, 4, 8, 8)
    assert sch.scale_model_input(x, sch.timesteps[0]) is x
    assert SteinDiffScheduler.from_config(tp.stable_diffusion_scheduler().config, solver="unipc").order == 1
    # img2img may only start at a step's first model call
    sch.set_begin_index(3)
    with pytest.raises(ValueError, match="second call of step 1"):
        sch.step(torch.zeros(1, 4, 8, 8), sch.timesteps[3], x)


def test_from_config_reads_and_refuses_scheduler_fields():
    # the pipeline's scheduler config: VP betas and prediction type; flow shift; a multistep flow config
    vp = SteinDiffScheduler.from_config(diffusers.DPMSolverMultistepScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction").config)
    assert vp.flow is None and vp.config.prediction_type == "v_prediction" and vp.schedule == "karras"
    assert vp._adapter.prediction == "v"
    fl = SteinDiffScheduler.from_config(diffusers.DPMSolverMultistepScheduler(
        use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0).config)
    assert fl.flow is not None and fl.flow.shift == 3.0 and fl.schedule == "flow"
    # our own saved config round-trips, a calibration with it
    plan = hand_calibration(fl, 3)
    again = SteinDiffScheduler.from_config(SteinDiffScheduler.from_config(fl.config, calibration=plan).config)
    assert again.calibration["gammas"] == plan.gammas and again.flow == fl.flow
    for bad, match in [(dict(shift_terminal=0.1), "shift_terminal=0.1"), (dict(use_karras_sigmas=True),
                                                                        "use_karras_sigmas=True"),
                       (dict(stochastic_sampling=True), "stochastic_sampling=True")]:
        with pytest.raises(ValueError, match=match):
            SteinDiffScheduler.from_config(diffusers.FlowMatchEulerDiscreteScheduler(**bad).config)
    with pytest.raises(ValueError, match="time_shift_type='cubic'"):
        SteinDiffScheduler.from_config({**diffusers.FlowMatchEulerDiscreteScheduler().config,
                                        "time_shift_type": "cubic"})
    # the reader is process_from_scheduler's: what it refuses is refused here too, naming the field
    multistep = dict(diffusers.DPMSolverMultistepScheduler(use_flow_sigmas=True,
                                                           prediction_type="flow_prediction").config)
    for bad, match in [({"_class_name": "FlowMatchLCMScheduler", "shift": 1.0}, "FlowMatchLCMScheduler is not"),
                       ({**multistep, "algorithm_type": "sde-dpmsolver++"}, "algorithm_type='sde-dpmsolver\\+\\+'"),
                       ({**multistep, "flow_shift": 0.0}, "flow_shift=0.0"), ({"shift": -1.0}, "shift=-1.0")]:
        with pytest.raises(ValueError, match=match):
            SteinDiffScheduler.from_config(bad)
        with pytest.raises(ValueError, match=match):
            sd.integrations.diffusers.process_from_scheduler(bad)
    with pytest.raises(ValueError, match="thresholding=True"):
        SteinDiffScheduler.from_config(diffusers.DDPMScheduler(thresholding=True).config)
    with pytest.raises(ValueError, match="VE scheduler"):
        SteinDiffScheduler.from_config(diffusers.ScoreSdeVeScheduler().config)
    with pytest.raises(ValueError, match="schedule 'flow' is not one of karras, logsnr, time"):
        SteinDiffScheduler.from_config(diffusers.DDPMScheduler().config, schedule="flow")
    with pytest.raises(ValueError, match="unknown solver 'rk4'"):
        SteinDiffScheduler.from_config(diffusers.DDPMScheduler().config, solver="rk4")
    # dynamic shifting without mu: diffusers' error, in our words
    dyn = SteinDiffScheduler.from_config(tp.flow_scheduler("flux").config)
    with pytest.raises(ValueError, match="mu must be given when the scheduler config sets use_dynamic_shifting"):
        dyn.set_timesteps(4)
    vp.set_timesteps(4)
    with pytest.raises(ValueError, match="eta=0.5 is not supported"):
        vp.step(torch.zeros(1, 4, 8, 8), vp.timesteps[0], torch.zeros(1, 4, 8, 8), eta=0.5)


def test_flow_config_schedule_equals_diffusers():
    """The flow levels the scheduler computes are FlowMatchEulerDiscreteScheduler's (static shift, dynamic mu,
    exponential and linear, custom sigmas); unshifted inverts shifted."""
    cases = [(dict(shift=3.0), {}), (dict(use_dynamic_shifting=True), dict(mu=0.8)),
             (dict(use_dynamic_shifting=True, time_shift_type="linear"), dict(mu=2.0)),
             (dict(shift=3.0), dict(sigmas=[1.0, 0.7, 0.4, 0.1]))]
    for cfg_kw, call in cases:
        ref = diffusers.FlowMatchEulerDiscreteScheduler(**cfg_kw)
        ref.set_timesteps(4, **call) if "sigmas" not in call else ref.set_timesteps(**call)
        schedule = flow_scheduler_config(ref).schedule(call.get("mu"))
        t = schedule.shifted(call["sigmas"]) if "sigmas" in call else schedule.times(4)
        torch.testing.assert_close(t.float(), ref.sigmas[:-1], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(schedule.shifted(schedule.unshifted(t)), t)


@pytest.mark.parametrize("theirs", ["DPMSolverMultistepScheduler", "UniPCMultistepScheduler"])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_a_multistep_flow_config_keeps_its_own_levels(theirs, shift):
    """Swapped in for DPM-Solver or UniPC with use_flow_sigmas (as Wan and Sana ship), the scheduler steps that
    scheduler's levels, not FlowMatchEuler's (which end near t = 0 where these end near t = 0.4 at 5 steps), and
    its saved config keeps them."""
    ref = getattr(diffusers, theirs)(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=shift)
    ref.set_timesteps(5)
    ours = SteinDiffScheduler.from_config(ref.config, solver="dpmpp_2m")
    assert ours.config.flow_grid == ("dpm" if "DPM" in theirs else "unipc")
    ours.set_timesteps(5)
    t = sd.noise.FlowProcess.sigma_to_t(ours.plan.sigmas)
    torch.testing.assert_close(t[1:], ref.sigmas[1:].double(), rtol=1e-6, atol=1e-7)
    assert float(t[0]) == pytest.approx(min(float(ref.sigmas[0]), 1 - FLOW_T_DELTA), rel=1e-6)
    euler = SteinDiffScheduler.from_config(diffusers.FlowMatchEulerDiscreteScheduler(shift=shift).config)
    euler.set_timesteps(5)
    assert float(euler.plan.sigmas[-2]) < 0.5 * float(ours.plan.sigmas[-2])  # the grids differ where it matters
    again = SteinDiffScheduler.from_config(ours.config)
    again.set_timesteps(5)
    torch.testing.assert_close(again.plan.sigmas, ours.plan.sigmas)
    # a calibration made on one grid is refused on the other, naming the grid
    with pytest.raises(ValueError, match="another schedule, shift, flow grid or step count"):
        SteinDiffScheduler.from_config(euler.config, calibration=hand_calibration(ours, 5)).set_timesteps(5)
    with pytest.raises(ValueError, match="flow_grid='midpoint' is not supported"):
        SteinDiffScheduler.from_config(ours.config, flow_grid="midpoint")


def test_refusals_name_the_mismatch(sd3_pipe):
    config = tp.flow_scheduler("sd3").config
    plan = hand_calibration(SteinDiffScheduler.from_config(config), 4)
    plan.meta["diffusers"] = {"integration": "diffusers", "guidance_scale": 5.0}
    with pytest.raises(ValueError, match="made for guidance scale 5: pass guidance_scale=5 to the scheduler"):
        SteinDiffScheduler.from_config(config, calibration=plan)
    with pytest.raises(ValueError, match="made for guidance scale 5, the scheduler is told 3"):
        SteinDiffScheduler.from_config(config, calibration=plan, guidance_scale=3)
    with pytest.raises(ValueError, match="made for solver 'dpmpp_2m', this scheduler is configured with 'euler'"):
        SteinDiffScheduler.from_config(config, calibration=plan, guidance_scale=5, solver="euler")
    with pytest.raises(ValueError, match="made for the 'flow' schedule, this scheduler is configured with 'logsnr'"):
        SteinDiffScheduler.from_config(config, calibration=plan, guidance_scale=5, schedule="logsnr")
    sch = SteinDiffScheduler.from_config(config, calibration=plan, guidance_scale=5)
    with pytest.raises(ValueError, match=r"it has 4 steps, this call asks for 6 \(num_inference_steps\)"):
        sch.set_timesteps(6)
    with pytest.raises(ValueError,
                       match=r"made from the noise levels .* \(another schedule, shift, flow grid or step count\)"):
        sch.set_timesteps(sigmas=[1.0, 0.5, 0.3, 0.2])
    # another shift in the scheduler config than the calibration recorded
    rec = {**sch.calibration, "pipeline": {"scheduler": {"shift": 3.0}, "sample_shape": [4, 8, 8], "height": 8,
                                           "width": 8}}
    with pytest.raises(ValueError, match="made for a scheduler config with shift=3.0, this one has shift=1.0"):
        SteinDiffScheduler.from_config(diffusers.FlowMatchEulerDiscreteScheduler().config, calibration=rec)
    # another latent size (SD3's shift is static: the size shows in the latents)
    sd3_pipe.scheduler = SteinDiffScheduler.from_config(config, calibration=rec, guidance_scale=5.0)
    emb = embeds(sd3_pipe, 1)
    with pytest.raises(ValueError, match=r"made for latents of shape \(4, 8, 8\) \(8x8 pixels\), this call's are "
                                         r"\(4, 16, 16\)"):
        sd3_pipe(**{**call_kwargs(sd3_pipe, emb), "height": 16, "width": 16}, guidance_scale=5.0,
                 num_inference_steps=4, output_type="latent")
    # a VP calibration made with fractional timesteps, in a scheduler that rounds them
    vp_plan = hand_calibration(SteinDiffScheduler.from_config(tp.stable_diffusion_scheduler().config), 3)
    vp_plan.meta["diffusers"] = {"integration": "diffusers", "guidance_scale": 1.0, "timestep": "interp"}
    with pytest.raises(ValueError, match="made with 'interp' timesteps, this scheduler uses timestep_type='round'"):
        SteinDiffScheduler.from_config(tp.stable_diffusion_scheduler().config, calibration=vp_plan,
                                       timestep_type="round")
    # a calibration for a VP process in a flow pipeline's scheduler
    vp_rec = {**rec, "pipeline": {"process": "DiscreteVPProcess(sigma_min=0.02917, sigma_max=14.61)"}}
    with pytest.raises(ValueError, match="made for the noise process DiscreteVPProcess"):
        SteinDiffScheduler.from_config(config, calibration=vp_rec)


def test_calibrate_scheduler_fits_caches_and_checks_the_model(sd3_pipe, tmp_path):
    """calibrate_scheduler on SD3: the calibration's record (guidance, latent shape, process, fingerprint), the
    cache read back on the second call, from_pipeline refusing another model's weights."""
    notices = []
    kw = dict(num_inference_steps=3, guidance_scale=G, height=8, width=8, cache_dir=tmp_path, dtype=torch.float64,
              embeddings=embeds(sd3_pipe, 2), notice=notices.append, **SMALL)
    sd3_pipe.scheduler = tp.flow_scheduler("sd3")
    sch = calibrate_scheduler(sd3_pipe, **kw)
    rec = sch.calibration
    assert len(notices) == 1 and rec["guidance_scale"] == G and rec["pipeline"]["sample_shape"] == [4, 8, 8]
    assert rec["pipeline"]["process"] == repr(sch.process) and rec["fingerprint"] and len(rec["gammas"]) == 3
    assert rec["base_sigmas"] == sch.plan_for(3).sigmas.tolist()
    again = calibrate_scheduler(sd3_pipe, **kw)
    assert len(notices) == 1 and again.calibration["sigmas"] == rec["sigmas"]  # read from the cache
    SteinDiffScheduler.from_pipeline(sd3_pipe, calibration=rec, guidance_scale=G)  # the same weights: accepted
    other = tp.stable_diffusion_3()
    with torch.no_grad():
        next(other.transformer.parameters()).add_(0.1)
    with pytest.raises(ValueError, match="calibration was made for another model: its fingerprint is"):
        SteinDiffScheduler.from_pipeline(other, calibration=rec, guidance_scale=G)
    # the file it saves is a calibration file that comes back as the same record
    path = tmp_path / "cal.json"
    sch.save_calibration(path)
    back = SteinDiffScheduler.from_config(tp.flow_scheduler("sd3").config, calibration=path, guidance_scale=G)
    assert back.calibration["sigmas"] == rec["sigmas"] and back.calibration["pipeline"] == rec["pipeline"]


def test_pipeline_saved_with_the_scheduler_loads_back(sd3_pipe, tmp_path):
    """save_pretrained keeps the scheduler and its calibration; from_pretrained finds the class once steindiff's
    module is imported (diffusers loads no module by name)."""
    plan = hand_calibration(SteinDiffScheduler.from_config(tp.flow_scheduler("sd3").config), 3)
    sd3_pipe.scheduler = SteinDiffScheduler.from_config(tp.flow_scheduler("sd3").config, calibration=plan)
    sd3_pipe.save_pretrained(tmp_path / "p")
    loaded = diffusers.DiffusionPipeline.from_pretrained(tmp_path / "p", local_files_only=True)
    assert isinstance(loaded.scheduler, SteinDiffScheduler)
    assert loaded.scheduler.calibration["gammas"] == plan.gammas


@pytest.mark.parametrize("solver", ["heun", "dpmpp_2m"])
def test_a_float32_state_runs_every_solver_and_stays_near_the_float64_one(solver):
    """``state_dtype="float32"``: a corrector's model call comes back at a float32-rounded level, which the
    scheduler's own bookkeeping must accept; the latents stay within float32 rounding of the float64 run."""
    out = {}
    for dtype in ("float64", "float32"):
        s = SteinDiffScheduler.from_config(diffusers.DDPMScheduler().config, solver=solver, state_dtype=dtype)
        s.set_timesteps(5)
        x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * s.init_noise_sigma
        for t in s.timesteps:  # an epsilon model of a Gaussian: eps = x_t-ish, enough to exercise every call
            x = s.step(0.5 * s.scale_model_input(x, t), t, x).prev_sample
        out[dtype] = x.double()
    assert torch.allclose(out["float32"], out["float64"], rtol=1e-4, atol=1e-5)
