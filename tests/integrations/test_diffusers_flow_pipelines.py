"""sample_pipeline on the flow pipelines (Stable Diffusion 3, FLUX): the noise drawn and the images decoded as the
pipelines do, the image size, calibrations (``stabilizer="auto"`` and applied ones, refused naming the mismatch),
arguments of the other kind of pipeline refused.  Tiny random pipelines built offline (tiny_pipelines.py), float64."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import tiny_pipelines as tp  # noqa: E402

import steindiff.stabilizers.registry as reg  # noqa: E402
from steindiff.integrations.diffusers_flow import encode_prompts, pipeline_mu  # noqa: E402
from steindiff.integrations.diffusers_pipeline import sample_pipeline  # noqa: E402
from steindiff.integrations.diffusers_scheduler import SteinDiffScheduler, pipeline_plan  # noqa: E402
from steindiff.plan import SamplingPlan  # noqa: E402

G = 3.0
SMALL = {"n": 8, "ref_steps": 8, "max_solves": 2, "max_seconds": 10.0}


def pipe_of(which, sd3_pipe, flux_pipe):
    return sd3_pipe if which == "sd3" else flux_pipe


def embeds(pipe, k=2):
    return encode_prompts(pipe, ["a cat", "dogs"][:k], guidance_scale=G, max_sequence_length=8)


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def hand_calibration(pipe, n=4, size=8):
    """A calibration of the plain plan the scheduler steps a call of ``n`` steps at ``size`` pixels with: moved
    interior levels, gammas away from 1, its base levels recorded."""
    _, base, _ = pipeline_plan(pipe, n, height=size, width=size)
    sig = base.sigmas.clone()
    sig[1:-1] *= 0.8
    return SamplingPlan(base.solver, sig, "fitted", [0.9, 1.15, 0.95, 1.05][:n], "ve", {},
                        {"schedule": base.schedule, "base_sigmas": base.sigmas.tolist(), "name": "hand"})


@pytest.mark.parametrize("which", ["sd3", "flux"])
def test_default_noise_size_and_decoding_are_the_pipelines(which, sd3_pipe, flux_pipe):
    """Without latents, height or width: the pipeline's default image size, its noise from the same generator (FLUX:
    drawn unpacked, then packed), and its decoded images (FLUX: unpacked before the VAE)."""
    pipe = pipe_of(which, sd3_pipe, flux_pipe)
    pipe.scheduler = SteinDiffScheduler.from_config(tp.flow_scheduler(which).config)
    emb = embeds(pipe)
    call = dict(**{k: v for k, v in emb.items() if k != "text_ids"}, max_sequence_length=8, guidance_scale=G,
                num_inference_steps=4)
    theirs = pipe(**call, generator=torch.Generator().manual_seed(5), output_type="pt").images
    theirs_latents = pipe(**call, generator=torch.Generator().manual_seed(5), output_type="latent").images
    ours = sample_pipeline(pipe, **emb, guidance_scale=G, nfe=4, seed=5, dtype=torch.float64, output_type="pt")
    assert ours.latents.shape == theirs_latents.shape == ((2, 16, 4) if which == "flux" else (2, 4, 8, 8))
    assert rel(ours.latents, theirs_latents) < 1e-9
    assert ours.images.shape == theirs.shape == (2, 3, 8, 8)
    assert float(ours.images.min()) >= 0 and float(ours.images.max()) <= 1 and float(ours.images.std()) > 0
    assert rel(ours.images, theirs.double()) < 1e-6
    # the same generator gives the same start: another seed another sample
    other = sample_pipeline(pipe, **emb, guidance_scale=G, nfe=4, seed=6, dtype=torch.float64, output_type="latent")
    assert rel(other.latents, ours.latents) > 1e-3
    arr = sample_pipeline(pipe, **emb, guidance_scale=G, nfe=4, seed=5, dtype=torch.float64, output_type="np").images
    assert arr.shape == (2, 8, 8, 3)
    pil = sample_pipeline(pipe, **emb, guidance_scale=G, nfe=4, seed=5, dtype=torch.float64, output_type="pil").images
    assert len(pil) == 2 and pil[0].size == (8, 8)


def test_image_size_and_latent_shapes(sd3_pipe, flux_pipe):
    """FLUX: height/width give the packed latents' length and mu (the pipeline default without them); latents of
    another size are refused, naming both shapes.  SD3: the size is read from the latents."""
    emb = embeds(flux_pipe, 1)
    lat16 = torch.randn(1, 64, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=re.escape("latents of shape (64, 4) per sample do not match the image size "
                                                   "(8x8 pixels), whose latents are (16, 4): pass height and width")):
        sample_pipeline(flux_pipe, **emb, guidance_scale=G, latents=lat16, output_type="latent")
    out = sample_pipeline(flux_pipe, **emb, guidance_scale=G, nfe=4, latents=lat16, height=16, width=16,
                          dtype=torch.float64, output_type="latent")
    _, plan16, mu16 = pipeline_plan(flux_pipe, 4, height=16, width=16)
    assert mu16 == pipeline_mu(flux_pipe, 16, 16) != pipeline_mu(flux_pipe, 8, 8)
    torch.testing.assert_close(out.sigmas, plan16.sigmas)
    assert not torch.allclose(out.sigmas, pipeline_plan(flux_pipe, 4, height=8, width=8)[1].sigmas)
    # SD3 (static shift): 16x16 latents are a 16x16-pixel image (VAE factor 1), the same levels
    emb3 = embeds(sd3_pipe, 1)
    lat = torch.randn(1, 4, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out3 = sample_pipeline(sd3_pipe, **emb3, guidance_scale=G, nfe=4, latents=lat, dtype=torch.float64,
                           output_type="latent")
    assert out3.latents.shape == (1, 4, 16, 16)
    torch.testing.assert_close(out3.sigmas, pipeline_plan(sd3_pipe, 4)[1].sigmas)


def test_named_and_explicit_schedules(flux_pipe):
    """karras over the shifted flow range as the scheduler makes it; explicit VE sigmas used as given."""
    emb = embeds(flux_pipe, 1)
    kw = dict(guidance_scale=G, height=8, width=8, dtype=torch.float64, output_type="latent")
    k = sample_pipeline(flux_pipe, **emb, nfe=5, schedule="karras", **kw)
    torch.testing.assert_close(k.sigmas, pipeline_plan(flux_pipe, 5, schedule="karras", height=8, width=8)[1].sigmas)
    sig = torch.tensor([20.0, 3.0, 0.5, 0.0], dtype=torch.float64)
    e = sample_pipeline(flux_pipe, **emb, schedule=sig, **kw)
    torch.testing.assert_close(e.sigmas, sig)
    assert e.nfe == 3


def test_auto_calibrates_the_call_and_the_scheduler_applies_it(sd3_pipe, tmp_path, monkeypatch):
    """stabilizer="auto" fits the calibrated sampler over the scheduler's plain plan of this call and records what
    SteinDiffScheduler checks; the scheduler in the unmodified pipeline then gives sample_pipeline's latents.  The
    calibration is refused for another model (its fingerprint names the transformer)."""
    monkeypatch.setattr(reg, "AUTO", reg.CALIBRATED)
    emb = embeds(sd3_pipe)
    lat = torch.randn(2, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = sample_pipeline(sd3_pipe, **emb, guidance_scale=G, nfe=3, stabilizer="auto", calibration_dir=tmp_path,
                          calibrate="always", calibration_options=SMALL, latents=lat, dtype=torch.float64,
                          output_type="latent")
    plan = out.plan
    assert plan.gammas is not None and out.nfe == 3 and out.extra_passes == 0
    assert plan.meta["base_sigmas"] == pipeline_plan(sd3_pipe, 3)[1].sigmas.tolist()
    assert plan.meta["pipeline"]["sample_shape"] == [4, 8, 8] and plan.meta["diffusers"]["guidance_scale"] == G
    sd3_pipe.scheduler = SteinDiffScheduler.from_pipeline(sd3_pipe, calibration=plan, guidance_scale=G)
    theirs = sd3_pipe(**{k: v for k, v in emb.items()}, max_sequence_length=8, guidance_scale=G,
                      num_inference_steps=3, latents=lat, output_type="latent").images
    assert rel(theirs, out.latents) < 1e-9
    applied = sample_pipeline(sd3_pipe, **emb, guidance_scale=G, calibration=plan, latents=lat, dtype=torch.float64,
                              output_type="latent")
    assert torch.equal(applied.latents, out.latents)
    other = tp.stable_diffusion_3()
    with torch.no_grad():
        next(other.transformer.parameters()).add_(0.1)
    with pytest.raises(ValueError, match="calibration was made for another model: its fingerprint is .* this "
                                         r"pipeline's SD3Transformer2DModel \(weights"):
        sample_pipeline(other, **emb, guidance_scale=G, calibration=plan, latents=lat, output_type="latent")


def test_mismatched_calibrations_are_refused_naming_the_mismatch(sd3_pipe, flux_pipe):
    emb3, embf = embeds(sd3_pipe, 1), embeds(flux_pipe, 1)
    plan = hand_calibration(sd3_pipe)
    kw = dict(guidance_scale=G, output_type="latent")
    sample_pipeline(sd3_pipe, **emb3, calibration=plan, **kw)  # its own call: accepted
    for arg, match in [(dict(nfe=6), "made for NFE 4, requested 6"),
                       (dict(solver="euler"), "made for solver 'dpmpp_2m', requested 'euler'"),
                       (dict(schedule="karras"), "made for the 'flow' schedule, requested 'karras'")]:
        with pytest.raises(ValueError, match=re.escape(match)):
            sample_pipeline(sd3_pipe, **emb3, calibration=plan, **arg, **kw)
    guided = SamplingPlan(plan.solver, plan.sigmas, plan.schedule, plan.gammas, meta={
        **plan.meta, "diffusers": {"integration": "diffusers", "guidance_scale": 5.0}})
    with pytest.raises(ValueError, match="made for guidance scale 5, requested 3"):
        sample_pipeline(sd3_pipe, **emb3, calibration=guided, **kw)
    # another shift in the scheduler config: other plain levels than the calibration was fitted from
    shifted = SimpleNamespace(**{k: getattr(sd3_pipe, k) for k in ("transformer", "vae", "vae_scale_factor")},
                              scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=1.0))
    with pytest.raises(ValueError, match=r"made from the noise levels \[.*\], this call's are \[.*\] \(another shift"):
        sample_pipeline(shifted, **emb3, calibration=plan, **kw)
    # FLUX: another image size is another resolution shift, named when the calibration records its own
    fplan = hand_calibration(flux_pipe)
    with pytest.raises(ValueError, match=r"made from the noise levels"):
        sample_pipeline(flux_pipe, **embf, calibration=fplan, height=16, width=16, **kw)
    mu8, mu16 = pipeline_mu(flux_pipe, 8, 8), pipeline_mu(flux_pipe, 16, 16)
    fplan.meta["pipeline"] = {"mu": mu8, "height": 8, "width": 8}
    with pytest.raises(ValueError, match=re.escape(f"made for the resolution shift mu={mu8:.6g} (8x8 pixels), this "
                                                   f"call's is mu={mu16:.6g} (16x16 pixels)")):
        sample_pipeline(flux_pipe, **embf, calibration=fplan, height=16, width=16, **kw)
    bare = SamplingPlan(fplan.solver, fplan.sigmas, fplan.schedule, fplan.gammas,
                        meta={k: v for k, v in fplan.meta.items() if k != "base_sigmas"})
    with pytest.raises(ValueError, match=re.escape(f"resolution shift mu={mu8:.6g} (8x8 pixels)")):  # mu alone
        sample_pipeline(flux_pipe, **embf, calibration=bare, height=16, width=16, **kw)
    embedded = SamplingPlan(fplan.solver, fplan.sigmas, fplan.schedule, fplan.gammas, meta={
        **fplan.meta, "diffusers": {"integration": "diffusers", "guidance_scale": 1.0, "embedded_guidance": 5.0}})
    with pytest.raises(ValueError, match=re.escape("made for embedded guidance (FLUX guidance_scale) 5, requested 3")):
        sample_pipeline(flux_pipe, **embf, calibration=embedded, **kw)


def test_arguments_of_the_other_kind_of_pipeline_are_refused(sd3_pipe, flux_pipe):
    emb3 = embeds(sd3_pipe, 1)
    labels = torch.tensor([1])
    with pytest.raises(ValueError, match=r"class_labels does not apply to StableDiffusion3Pipeline \(a flow"):
        sample_pipeline(sd3_pipe, **emb3, class_labels=labels, guidance_scale=G)
    with pytest.raises(ValueError, match="text_ids does not apply to StableDiffusion3Pipeline"):
        sample_pipeline(sd3_pipe, **emb3, text_ids=torch.zeros(8, 3), guidance_scale=G)
    with pytest.raises(ValueError, match="timestep='round' applies to UNet pipelines"):
        sample_pipeline(sd3_pipe, **emb3, guidance_scale=G, timestep="round")
    with pytest.raises(ValueError, match="StableDiffusion3Pipeline needs prompt_embeds and pooled_prompt_embeds"):
        sample_pipeline(sd3_pipe, prompt_embeds=emb3["prompt_embeds"])
    with pytest.raises(ValueError, match="guidance_scale=3.0 needs negative_prompt_embeds and "
                                         "negative_pooled_prompt_embeds"):
        sample_pipeline(sd3_pipe, prompt_embeds=emb3["prompt_embeds"],
                        pooled_prompt_embeds=emb3["pooled_prompt_embeds"], guidance_scale=G)
    sd_pipe = tp.stable_diffusion()
    with pytest.raises(ValueError, match=r"pooled_prompt_embeds, text_ids do not apply to StableDiffusionPipeline "
                                         r"\(a UNet pipeline\)"):
        sample_pipeline(sd_pipe, prompt_embeds=torch.zeros(1, 8, 32), pooled_prompt_embeds=torch.zeros(1, 32),
                        text_ids=torch.zeros(8, 3))
    other = SimpleNamespace(transformer=torch.nn.Identity(), scheduler=tp.flow_scheduler("sd3"))
    with pytest.raises(ValueError, match="transformer Identity is not supported: steindiff's flow pipelines are"):
        sample_pipeline(other, **emb3)
