"""diffusers bridge: UNet denoisers, pipeline sampling against diffusers' own loop, CFG, VAE decoding, errors.

All models are tiny and built from configs with random weights (no downloads)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from steindiff import sample  # noqa: E402
from steindiff.integrations.diffusers import (  # noqa: E402
    CFGDenoiser,
    denoiser_from_diffusers,
    process_from_scheduler,
)
from steindiff.integrations.diffusers_pipeline import sample_pipeline  # noqa: E402
from steindiff.stabilizers import SteinStabilizer  # noqa: E402


def tiny_unet(dtype=torch.float64, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = dict(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
               down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
               norm_num_groups=4)
    cfg.update(kw)
    return diffusers.UNet2DModel(**cfg).to(dtype).eval()


def tiny_cond_unet(dtype=torch.float64) -> torch.nn.Module:
    torch.manual_seed(1)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4,
    ).to(dtype).eval()


def tiny_vae() -> torch.nn.Module:
    torch.manual_seed(2)
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4,
        sample_size=16,
    ).eval()


def x_and_sigma(process, t: float, shape=(2, 3, 8, 8)):
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    return x, process.t_to_sigma(torch.tensor(t))


@pytest.mark.parametrize("pred,timestep,t", [("epsilon", "round", 500.0), ("v_prediction", "interp", 500.3),
                                             ("sample", "interp", 123.7)])
def test_unet2d_denoiser_matches_formula(pred, timestep, t):
    unet = tiny_unet()
    sch = diffusers.DDPMScheduler(prediction_type=pred)
    D = denoiser_from_diffusers(unet, sch, timestep=timestep)
    x, s = x_and_sigma(D.process, t)
    ac = 1 / (1 + s**2)  # alpha^2 at that noise level
    x_vp = x * ac.sqrt()
    with torch.no_grad():
        F = unet(x_vp, torch.full((2,), t, dtype=torch.float64)).sample
        got = D(x, s.expand(2))
    want = {"epsilon": x - s * F, "v_prediction": ac.sqrt() * x_vp - (1 - ac).sqrt() * F, "sample": F}[pred]
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_condition_unet_takes_encoder_hidden_states_and_config_dict():
    unet = tiny_cond_unet()
    sch = diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    D = denoiser_from_diffusers(unet, dict(sch.config), timestep="interp")
    x, s = x_and_sigma(D.process, 321.5, (2, 4, 8, 8))
    emb = torch.randn(2, 5, 8, dtype=torch.float64)
    with torch.no_grad():
        eps = unet(x / (1 + s**2).sqrt(), torch.full((2,), 321.5, dtype=torch.float64),
                   encoder_hidden_states=emb).sample
        torch.testing.assert_close(D(x, s.expand(2), encoder_hidden_states=emb), x - s * eps, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kw",
                         [dict(beta_schedule="linear"),
                          dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
                                dict(beta_schedule="squaredcos_cap_v2"),
                                dict(trained_betas=np.linspace(1e-4, 0.02, 500).tolist(),
                                                                              num_train_timesteps=500)])
def test_beta_schedules_match_scheduler_tables(kw):
    sch = diffusers.DDPMScheduler(**kw)
    proc = process_from_scheduler(sch)  # also checks against sch.alphas_cumprod internally
    np.testing.assert_allclose(proc.alphas_cumprod.numpy(), sch.alphas_cumprod.double().numpy(), rtol=2e-5)


def test_ddpm_pipeline_matches_diffusers_dpmsolver_loop():
    unet = tiny_unet()
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DPMSolverMultistepScheduler())
    pipe.set_progress_bar_config(disable=True)
    steps = 8
    with torch.no_grad():
        ref_np = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=steps,
                      output_type="np").images
    # diffusers' own loop with raw (unclamped) latents, same noise as the pipeline draws
    sch = diffusers.DPMSolverMultistepScheduler()
    sch.set_timesteps(steps)
    x0 = torch.randn((2, 3, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = x0.clone()
    with torch.no_grad():
        for t in sch.timesteps:
            ref = sch.step(unet(ref, t).sample, t, ref).prev_sample
    # ours: the scheduler's own sigmas (its timesteps are integers: "round")
    sigmas = sch.sigmas.double()
    out = sample_pipeline(pipe, solver="dpmpp_2m", schedule=sigmas, latents=x0, timestep="round",
                          dtype=torch.float64, output_type="latent")
    assert out.nfe == steps
    assert float((out.latents - ref).norm() / ref.norm()) < 1e-4
    # seeded noise is drawn as diffusers draws it, and the np output matches the pipeline's
    out_np = sample_pipeline(pipe, schedule=sigmas, generator=torch.Generator().manual_seed(0), batch_size=2,
                             timestep="round", dtype=torch.float64, output_type="np")
    assert out_np.images.shape == ref_np.shape == (2, 8, 8, 3)
    np.testing.assert_allclose(out_np.images, ref_np, atol=1e-4)


def test_cfg_formula_gradient_and_stabilizer():
    unet = tiny_cond_unet()
    D = denoiser_from_diffusers(unet, diffusers.DDPMScheduler())
    c, u = torch.randn(1, 5, 8, dtype=torch.float64), torch.zeros(1, 5, 8, dtype=torch.float64)
    cfg = CFGDenoiser(D, 3.0, c, u)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64, requires_grad=True)
    s = torch.full((2,), 2.5, dtype=torch.float64)
    out = cfg(x, s)
    d_c, d_u = D(x, s, encoder_hidden_states=c.expand(2, -1, -1)), D(x, s, encoder_hidden_states=u.expand(2, -1, -1))
    torch.testing.assert_close(out, d_u + 3.0 * (d_c - d_u), rtol=1e-9, atol=1e-9)
    v = torch.randn_like(x)
    (g,) = torch.autograd.grad(out, x, v)
    (g_c,) = torch.autograd.grad(d_c, x, v)
    (g_u,) = torch.autograd.grad(d_u, x, v)
    torch.testing.assert_close(g, g_u + 3.0 * (g_c - g_u), rtol=1e-8, atol=1e-9)
    assert torch.equal(CFGDenoiser(D, 1.0, c)(x, s), d_c)

    pipe = SimpleNamespace(unet=unet, scheduler=diffusers.DDPMScheduler())
    stab = SteinStabilizer(probes=1, seed=0)
    res = sample_pipeline(pipe, prompt_embeds=c, negative_prompt_embeds=u, guidance_scale=3.0, batch_size=3,
                          solver="euler", nfe=3, stabilizer=stab, dtype=torch.float64, output_type="latent", seed=0)
    assert res.latents.shape == (3, 4, 8, 8) and torch.isfinite(res.latents).all()
    assert len(res.trace) == 3 and res.extra_passes > 0
    assert all(math.isfinite(r["gamma_raw"]) for r in res.trace)


def test_vae_decode_path_shapes():
    pipe = SimpleNamespace(unet=tiny_cond_unet(torch.float32), scheduler=diffusers.DDPMScheduler(), vae=tiny_vae())
    emb = torch.randn(1, 5, 8)
    lat = sample_pipeline(pipe, prompt_embeds=emb, batch_size=2, nfe=2, output_type="latent", seed=1)
    assert lat.images.shape == (2, 4, 8, 8)
    pt = sample_pipeline(pipe, prompt_embeds=emb, batch_size=2, nfe=2, output_type="pt", seed=1)
    assert pt.images.shape == (2, 3, 16, 16) and 0 <= float(pt.images.min()) and float(pt.images.max()) <= 1
    torch.testing.assert_close(pt.latents, lat.latents)
    with torch.no_grad():
        want = (pipe.vae.decode(lat.latents / pipe.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(pt.images, want)
    arr = sample_pipeline(pipe, prompt_embeds=emb, batch_size=2, nfe=2, output_type="np", seed=1).images
    assert arr.shape == (2, 16, 16, 3)
    pil = sample_pipeline(pipe, prompt_embeds=emb, batch_size=2, nfe=2, output_type="pil", seed=1).images
    assert len(pil) == 2 and pil[0].size == (16, 16)


def test_errors_name_the_value():
    unet = tiny_unet()
    with pytest.raises(ValueError, match="'flow_prediction'"):
        denoiser_from_diffusers(unet, {**diffusers.DDPMScheduler().config, "prediction_type": "flow_prediction"})
    with pytest.raises(ValueError, match="VE scheduler ScoreSdeVeScheduler"):
        denoiser_from_diffusers(unet, diffusers.ScoreSdeVeScheduler())
    with pytest.raises(ValueError, match="unsupported beta_schedule 'sigmoid'"):
        denoiser_from_diffusers(unet, {"beta_schedule": "sigmoid", "num_train_timesteps": 1000})
    with pytest.raises(ValueError, match="trained_betas has 10 entries but num_train_timesteps is 1000"):
        denoiser_from_diffusers(unet, {"trained_betas": [0.01] * 10, "num_train_timesteps": 1000})
    sch = diffusers.DDPMScheduler(num_train_timesteps=1000)
    sch.alphas_cumprod = sch.alphas_cumprod[:500]
    with pytest.raises(ValueError, match="500 entries but its config gives num_train_timesteps=1000"):
        denoiser_from_diffusers(unet, sch)
    learned = tiny_unet(num_train_timesteps=500, time_embedding_type="learned")
    with pytest.raises(ValueError, match="num_train_timesteps=500 but the scheduler's table has 1000"):
        denoiser_from_diffusers(learned, diffusers.DDPMScheduler())
    pipe = SimpleNamespace(unet=tiny_cond_unet(), scheduler=diffusers.DDPMScheduler())
    with pytest.raises(ValueError, match="needs negative_prompt_embeds"):
        sample_pipeline(pipe, prompt_embeds=torch.zeros(1, 5, 8), guidance_scale=5.0)
    with pytest.raises(ValueError, match="output_type"):
        sample_pipeline(pipe, prompt_embeds=torch.zeros(1, 5, 8), output_type="jpeg")


def test_class_conditional_guidance():
    unet = tiny_unet(num_class_embeds=3)
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler())
    kw = dict(solver="euler", nfe=2, dtype=torch.float64, output_type="latent", seed=0)
    guided = sample_pipeline(pipe, class_labels=[0, 1], negative_class_labels=[2], guidance_scale=2.0, **kw)
    # the same guidance by hand: D_u + 2 (D_c - D_u) with the null class 2
    D = denoiser_from_diffusers(unet, pipe.scheduler)
    cfg = CFGDenoiser(D, 2.0, {"class_labels": torch.tensor([0, 1])}, {"class_labels": torch.tensor([2])})
    x = torch.randn((2, 3, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sig = guided.sigmas
    want = sample(cfg, x * (1 + sig[0] ** 2).sqrt(), sig, "euler").x
    torch.testing.assert_close(guided.latents, want)
    plain = sample_pipeline(pipe, class_labels=[0, 1], **kw)
    assert not torch.allclose(plain.latents, guided.latents)


def test_flow_scheduler_configs_are_read_or_refused_naming_the_field():
    from steindiff.integrations.diffusers import process_from_scheduler
    from steindiff.noise import FlowProcess
    from steindiff.schedules import FlowSchedule, flow_shift_mu, get_sigmas

    euler = diffusers.FlowMatchEulerDiscreteScheduler
    p = process_from_scheduler(euler(shift=3.0))
    assert isinstance(p, FlowProcess) and p.schedule == FlowSchedule(shift=3.0)
    # a config mapping without its class (a shift, no betas) reads as FlowMatchEuler's
    assert process_from_scheduler({"shift": 3.0, "num_train_timesteps": 1000}).schedule == FlowSchedule(shift=3.0)
    # dynamic shifting: mu, or the image size it is computed from (FLUX's calculate_shift on the config's fields)
    flux = euler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                 max_image_seq_len=4096)
    assert process_from_scheduler(flux, image_seq_len=1024).schedule.mu == pytest.approx(flow_shift_mu(1024))
    # without mu the process is built, and its flow levels are refused as diffusers' set_timesteps refuses them
    with pytest.raises(ValueError, match="use_dynamic_shifting=True.*mu"):
        get_sigmas("flow", 4, process_from_scheduler(flux))
    with pytest.raises(ValueError, match="mu or image_seq_len, not both"):
        process_from_scheduler(flux, mu=0.5, image_seq_len=1024)
    with pytest.raises(ValueError, match="does not set use_dynamic_shifting"):
        process_from_scheduler(euler(shift=3.0), mu=0.5)
    with pytest.raises(ValueError, match="time_shift_type='cubic'"):
        process_from_scheduler({**flux.config, "time_shift_type": "cubic"})
    with pytest.raises(ValueError, match="stochastic_sampling=True"):
        process_from_scheduler(euler(stochastic_sampling=True))
    with pytest.raises(ValueError, match="invert_sigmas=True"):
        process_from_scheduler(euler(invert_sigmas=True))
    dpm = dict(use_flow_sigmas=True, prediction_type="flow_prediction")
    with pytest.raises(ValueError, match="use_karras_sigmas=True"):
        process_from_scheduler(diffusers.DPMSolverMultistepScheduler(**dpm, use_karras_sigmas=True))
    with pytest.raises(ValueError, match="final_sigmas_type='sigma_min'"):
        process_from_scheduler(diffusers.UniPCMultistepScheduler(**dpm, final_sigmas_type="sigma_min"))
    with pytest.raises(ValueError, match="algorithm_type='sde-dpmsolver\\+\\+'"):
        process_from_scheduler(diffusers.DPMSolverMultistepScheduler(**dpm, algorithm_type="sde-dpmsolver++"))
    with pytest.raises(ValueError, match="prediction_type='epsilon'"):
        process_from_scheduler(diffusers.UniPCMultistepScheduler(use_flow_sigmas=True))
    with pytest.raises(ValueError, match="FlowMatchLCMScheduler is not supported"):
        process_from_scheduler({"_class_name": "FlowMatchLCMScheduler", "shift": 1.0})
    with pytest.raises(ValueError, match="apply to flow-matching schedulers only"):
        process_from_scheduler(diffusers.DDPMScheduler(), mu=0.5)
    p = process_from_scheduler(euler(), t_max=1 - 1e-3)
    assert p.t_max == pytest.approx(1 - 1e-3)


def test_flow_transformers_time_conventions():
    """SD3's transformer gets timestep = 1000 t, FLUX's t (FluxPipeline divides by 1000); FLUX's packed latents
    (B, tokens, 4 C) are the sampled state, its ids and pooled projections extra arguments."""
    from steindiff import sample
    from steindiff.models import FlowDenoiser
    from steindiff.schedules import get_sigmas

    diffusers.utils.logging.set_verbosity_error()
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x, timestep, **kw):
            seen.append(timestep)
            return torch.zeros_like(x)

    sd3_like = type("SD3Transformer2DModel", (Probe,), {})()
    den = denoiser_from_diffusers(sd3_like, diffusers.FlowMatchEulerDiscreteScheduler())
    assert isinstance(den, FlowDenoiser) and den.time_scale == 1000.0 and den.prediction == "velocity"
    den(torch.zeros(1, 2), torch.tensor([1.0]))
    assert float(seen[-1]) == pytest.approx(500.0)
    flux_like = type("FluxTransformer2DModel", (Probe,), {})()
    flux_den = denoiser_from_diffusers(flux_like, diffusers.FlowMatchEulerDiscreteScheduler())
    flux_den(torch.zeros(1, 2), torch.tensor([1.0]))
    assert float(seen[-1]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="time_scale applies to flow-matching models"):
        denoiser_from_diffusers(tiny_unet(), diffusers.DDPMScheduler(), time_scale=1000.0)

    torch.manual_seed(0)
    flux = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                            pooled_projection_dim=8, axes_dims_rope=(2, 2, 4)).eval()
    sch = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    den = denoiser_from_diffusers(flux, sch, image_seq_len=16)
    tokens = 16  # a 4x4 grid of packed 2x2 patches of a 4-channel 8x8 latent
    img_ids = torch.zeros(tokens, 3)
    img_ids[:, 1], img_ids[:, 2] = torch.arange(tokens) // 4, torch.arange(tokens) % 4
    extra = {"encoder_hidden_states": torch.randn(2, 3, 16), "pooled_projections": torch.randn(2, 8),
             "img_ids": img_ids, "txt_ids": torch.zeros(3, 3)}
    sig = get_sigmas("flow", 3, den.process)
    with torch.no_grad():
        res = sample(den, torch.randn(2, tokens, 16) * den.process.prior_scale(float(sig[0])), sig, "euler",
                     extra_args=extra)
    assert res.x.shape == (2, tokens, 16) and torch.isfinite(res.x).all() and res.nfe == 3
