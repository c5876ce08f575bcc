"""The calibrated sampler (issue 9) in the integrations: k-diffusion-style ``sample_*(..., calibration=)``
and diffusers' ``calibrate_pipeline`` / ``sample_pipeline(stabilizer="auto" | calibration=plan)``.

Models are tiny (an exact mixture; a diffusers UNet with random weights built from a config), and the
calibrations small (``n=16, ref_steps=20, max_solves=10``)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

import steindiff as sd
import steindiff.calibration as cal_mod
import steindiff.stabilizers.registry as reg
from steindiff.calibration import calibrate, plan_from_schedule
from steindiff.integrations import kdiffusion as kd
from steindiff.models import get_gmm
from steindiff.models.registry import load_model
from steindiff.plan import SamplingPlan, make_plan
from steindiff.stabilizers.schedule import GammaSchedule, load_gamma_schedule

SMALL = {"n": 16, "ref_steps": 20, "max_solves": 10, "max_seconds": 20.0}
GMM = get_gmm("gmm:toy2d")


# ------------------------------------------------------------------------------------------------
# k-diffusion-style functions
# ------------------------------------------------------------------------------------------------
def fitted_plan(solver: str = "dpmpp_2m", steps: int = 4) -> tuple[SamplingPlan, torch.Tensor]:
    """A plan as a calibration with fitted steps and gammas makes it: moved interior noise levels,
    gammas away from 1, the base noise levels recorded."""
    base = sd.get_sigmas("karras", steps, sd.VEProcess())
    moved = base.clone()
    moved[1:-1] = moved[1:-1] * 0.8
    gammas = [0.9, 1.2, 0.95, 1.0][:steps]
    meta = {"solver": solver, "schedule": "karras", "sigmas": moved.tolist(), "base_sigmas": base.tolist(),
            "model": "gmm:toy2d", "nfe": steps}
    return SamplingPlan(solver, moved, "fitted", gammas, "ve", {}, meta), base


def x0(n=32):
    return torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 80.0


@pytest.mark.parametrize("fn,solver", [(kd.sample_dpmpp_2m, "dpmpp_2m"), (kd.sample_euler, "euler"),
                                       (kd.sample_unipc, "unipc")])
def test_kdiffusion_calibration_equals_sample_with_the_plan(fn, solver, tmp_path):
    plan, base = fitted_plan(solver)
    x = x0()
    want = sd.sample(GMM, x, plan.sigmas, plan.solver, stabilizer=plan.stabilizer()).x
    got = fn(GMM, x, base, calibration=plan)
    assert torch.equal(got, want)
    assert not torch.allclose(got, fn(GMM, x, base))  # the calibration changed the solve
    # the same as a GammaSchedule and as a file
    sched = GammaSchedule(plan.gammas, "ve", plan.meta)
    assert torch.equal(fn(GMM, x, base, calibration=sched), want)
    path = tmp_path / "cal.json"
    sched.save(path)
    assert torch.equal(fn(GMM, x, base, calibration=str(path)), want)
    assert torch.equal(fn(GMM, x, base, calibration=path), want)


def test_kdiffusion_applies_model_noise_levels_and_history_from_a_second_generation_file(tmp_path):
    plan, base = fitted_plan("unipc")
    plan.model_sigmas = [float(s) * 1.05 for s in plan.sigmas[:-1]]
    plan.history = [[], [0.2], [0.1, -0.05], [0.0]]
    x = x0()
    want = sd.sample(GMM, x, plan.sigmas, plan.solver, stabilizer=plan.stabilizer()).x
    assert not torch.allclose(want, sd.sample(GMM, x, plan.sigmas, plan.solver,
                                              stabilizer=GammaSchedule(plan.gammas, "ve")).x)
    sched = GammaSchedule(plan.gammas, "ve", plan.meta, model_sigmas=plan.model_sigmas, history=plan.history)
    path = tmp_path / "cal2.json"
    sched.save(path)
    for cal in (plan, sched, path):
        assert torch.equal(kd.sample_unipc(GMM, x, base, calibration=cal), want)
    loaded = plan_from_schedule(load_gamma_schedule(path), make_plan(sd.VEProcess(), "unipc", 4))
    assert loaded.model_sigmas == plan.model_sigmas and loaded.history == plan.history
    assert torch.equal(sd.sample(GMM, x, loaded.sigmas, "unipc", stabilizer=loaded.stabilizer()).x, want)


def test_kdiffusion_callback_sees_the_calibrated_noise_levels():
    plan, base = fitted_plan()
    seen = []
    kd.sample_dpmpp_2m(GMM, x0(4), base, calibration=plan, callback=lambda d: seen.append(float(d["sigma"])))
    assert seen == [float(s) for s in plan.sigmas[:-1]]


def test_kdiffusion_calibration_from_a_real_calibration_file(tmp_path):
    spec = load_model("gmm:toy2d")
    sched = calibrate(spec, solver="dpmpp_2m", nfe=4, schedule="karras", dtype=torch.float64, **SMALL)
    path = tmp_path / "cal.json"
    sched.save(path)
    base = make_plan(spec.process, "dpmpp_2m", 4, "karras")
    plan = plan_from_schedule(load_gamma_schedule(path), base)
    x = x0()
    want = sd.sample(GMM, x, plan.sigmas, "dpmpp_2m", stabilizer=plan.stabilizer()).x
    assert torch.equal(kd.sample_dpmpp_2m(GMM, x, base.sigmas, calibration=path), want)


def test_kdiffusion_refusals_name_both_values():
    plan, base = fitted_plan()
    x = x0(4)
    with pytest.raises(ValueError, match="it has 4 steps, sigmas has 5"):
        kd.sample_dpmpp_2m(GMM, x, sd.get_sigmas("karras", 5, sd.VEProcess()), calibration=plan)
    with pytest.raises(ValueError, match=r"its sigma_max is 80, sigmas\[0\] is 14.6"):
        kd.sample_dpmpp_2m(GMM, x, sd.get_sigmas("karras", 4, sd.VEProcess(0.002, 14.6)), calibration=plan)
    with pytest.raises(ValueError, match="made for solver 'dpmpp_2m', this is 'euler'"):
        kd.sample_euler(GMM, x, base, calibration=plan)
    with pytest.raises(ValueError, match="either calibration or stabilizer"):
        kd.sample_dpmpp_2m(GMM, x, base, calibration=plan, stabilizer=sd.stabilizers.SteinStabilizer())
    with pytest.raises(TypeError, match="SamplingPlan, a GammaSchedule or the path"):
        kd.sample_dpmpp_2m(GMM, x, base, calibration=[1.0, 1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        import tempfile

        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            f.write('{"schema": "steindiff.gamma-sch')
        kd.sample_dpmpp_2m(GMM, x, base, calibration=f.name)
    # aliases are the same solver; another schedule with the same steps and sigma_max only warns
    e_plan, _ = fitted_plan("euler")
    kd.sample_euler(GMM, x, base,
                    calibration=SamplingPlan("ddim", e_plan.sigmas, gammas=e_plan.gammas, meta=e_plan.meta))
    with pytest.warns(UserWarning, match="other noise levels"):
        kd.sample_dpmpp_2m(GMM, x, sd.get_sigmas("logsnr", 4, sd.VEProcess()), calibration=plan)


# ------------------------------------------------------------------------------------------------
# diffusers
# ------------------------------------------------------------------------------------------------
diffusers = pytest.importorskip("diffusers")

from steindiff.integrations.diffusers import (  # noqa: E402
    UNCOND_PREFIX,
    CFGDenoiser,
    calibrate_pipeline,
    denoiser_from_diffusers,
    pipeline_model,
)
from steindiff.integrations.diffusers_pipeline import sample_pipeline  # noqa: E402


def tiny_cond_unet(seed: int = 1) -> torch.nn.Module:
    torch.manual_seed(seed)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4,
    ).to(torch.float64).eval()


@pytest.fixture(scope="module")
def pipe():
    return SimpleNamespace(unet=tiny_cond_unet(), scheduler=diffusers.DDPMScheduler())


def prompts(k: int = 3, seed: int = 5) -> torch.Tensor:
    return torch.randn(k, 5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


NEG = torch.zeros(1, 5, 8, dtype=torch.float64)
KW = dict(solver="dpmpp_2m", nfe=3, schedule="karras", dtype=torch.float64, notice=None, **SMALL)


def test_calibrate_pipeline_keys_the_cache_by_guidance_and_prompts(pipe, tmp_path, monkeypatch):
    seen = []
    fit = cal_mod.fit_trajectory

    def spy(model, base, noise, **kw):
        seen.append((model, noise.shape[0], kw["extra_args"]))
        return fit(model, base, noise, **kw)

    monkeypatch.setattr(cal_mod, "fit_trajectory", spy)
    emb = prompts()
    plan = calibrate_pipeline(pipe, prompt_embeds=emb, negative_prompt_embeds=NEG, guidance_scale=3.0,
                              cache_dir=tmp_path, **KW)
    (f,) = tmp_path.glob("*.json")
    key = json.loads(f.read_text())["key"]
    cond = json.loads(key["conditioning"])
    assert cond["guidance_scale"] == 3.0 and cond["integration"] == "diffusers" and cond["conditioning"]
    assert plan.meta["diffusers"] == cond and plan.steps == 3 and len(plan.gammas) == 3
    # the calibration batch saw the user's prompts cycled to its size, under guidance, on the same model
    (model, n, extra), = seen
    assert n == 16 and isinstance(model, CFGDenoiser) and model.scale == 3.0
    torch.testing.assert_close(extra["encoder_hidden_states"], emb[torch.arange(16) % 3])
    torch.testing.assert_close(extra[UNCOND_PREFIX + "encoder_hidden_states"], NEG.expand(16, -1, -1))

    # the second call reads the cache: no fit, the same plan
    again = calibrate_pipeline(pipe, prompt_embeds=emb, negative_prompt_embeds=NEG, guidance_scale=3.0,
                               cache_dir=tmp_path, **KW)
    assert len(seen) == 1
    assert again.gammas == plan.gammas and torch.equal(again.sigmas, plan.sigmas)
    # another guidance scale, other prompts: other keys, calibrated anew
    calibrate_pipeline(pipe, prompt_embeds=emb, negative_prompt_embeds=NEG, guidance_scale=5.0, cache_dir=tmp_path,
                       **KW)
    calibrate_pipeline(pipe, prompt_embeds=prompts(seed=6), negative_prompt_embeds=NEG, guidance_scale=3.0,
                       cache_dir=tmp_path, **KW)
    assert len(seen) == 3 and len(list(tmp_path.glob("*.json"))) == 3
    keys = [json.loads(json.loads(p.read_text())["key"]["conditioning"]) for p in tmp_path.glob("*.json")]
    assert sorted(k["guidance_scale"] for k in keys) == [3.0, 3.0, 5.0]
    assert len({k["conditioning"] for k in keys}) == 2
    # only reading the cache: nothing cached for NFE 4, so the plain plan
    plain = calibrate_pipeline(pipe, prompt_embeds=emb, negative_prompt_embeds=NEG, guidance_scale=3.0,
                               cache_dir=tmp_path, calibrate_missing=False, **{**KW, "nfe": 4})
    assert plain.gammas is None and len(seen) == 3


def test_calibrate_pipeline_prints_a_notice_on_first_use_only(pipe, tmp_path, capsys):
    kw = {**KW, "notice": calibrate_pipeline.__kwdefaults__["notice"]}
    calibrate_pipeline(pipe, prompt_embeds=prompts(1), cache_dir=tmp_path, **kw)
    assert "steindiff: calibrating dpmpp_2m / karras / NFE 3" in capsys.readouterr().err
    calibrate_pipeline(pipe, prompt_embeds=prompts(1), cache_dir=tmp_path, **kw)
    assert capsys.readouterr().err == ""


def hand_plan(pipe, guidance: float, emb) -> SamplingPlan:
    """A calibration-like plan with gammas away from 1 and moved noise levels, recording its conditioning
    and fingerprint as calibrate_pipeline's plans do."""
    pm = pipeline_model(pipe, prompt_embeds=emb, negative_prompt_embeds=NEG, guidance_scale=guidance)
    base = make_plan(pm.process, "dpmpp_2m", 3, "karras")
    sig = base.sigmas.clone()
    sig[1:-1] *= 0.7
    meta = {"schedule": "karras", "base_sigmas": base.sigmas.tolist(),
            "fingerprint": cal_mod.model_fingerprint(pm.spec()), "diffusers": pm.conditioning()}
    return SamplingPlan("dpmpp_2m", sig, "fitted", [0.8, 1.1, 1.0], "ve", {}, meta)


def test_sample_pipeline_applies_a_calibration_on_the_same_model(pipe):
    emb = prompts()
    plan = hand_plan(pipe, 3.0, emb)
    lat = torch.randn(6, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = sample_pipeline(pipe, prompt_embeds=emb, negative_prompt_embeds=NEG, guidance_scale=3.0, latents=lat,
                          calibration=plan, dtype=torch.float64, output_type="latent")
    # by hand: guidance over the UNet's denoiser, the plan's noise levels and gammas
    den = denoiser_from_diffusers(pipe.unet, pipe.scheduler)
    cfg = CFGDenoiser(den, 3.0, emb.repeat_interleave(2, 0), NEG)
    want = sd.sample(cfg, lat * (1 + plan.sigmas[0] ** 2).sqrt(), plan.sigmas, "dpmpp_2m",
                     stabilizer=plan.stabilizer()).x
    torch.testing.assert_close(out.latents, want, rtol=1e-10, atol=1e-10)
    assert out.plan is plan and out.nfe == 3 and out.extra_passes == 0 and torch.equal(out.sigmas, plan.sigmas)
    plain = sample_pipeline(pipe, prompt_embeds=emb, negative_prompt_embeds=NEG, guidance_scale=3.0, latents=lat,
                            solver="dpmpp_2m", nfe=3, dtype=torch.float64, output_type="latent")
    assert not torch.allclose(plain.latents, out.latents)
    # the same through a k-diffusion-style function on the pipeline's model
    pm = pipeline_model(pipe, prompt_embeds=emb, negative_prompt_embeds=NEG, guidance_scale=3.0)
    base = make_plan(pm.process, "dpmpp_2m", 3, "karras").sigmas
    x = kd.sample_dpmpp_2m(pm.model, lat * (1 + base[0] ** 2).sqrt(), base, extra_args=pm.extra_args(6),
                           calibration=plan)
    torch.testing.assert_close(x, want, rtol=1e-10, atol=1e-10)


def test_sample_pipeline_applies_model_noise_levels_and_history_at_the_plain_nfe(pipe):
    emb = prompts()
    plan = hand_plan(pipe, 3.0, emb)
    plan.model_sigmas = [float(s) * 0.9 for s in plan.sigmas[:-1]]
    plan.history = [[], [0.3], [-0.1, 0.1]]
    lat = torch.randn(6, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = sample_pipeline(pipe, prompt_embeds=emb, negative_prompt_embeds=NEG, guidance_scale=3.0, latents=lat,
                          calibration=plan, dtype=torch.float64, output_type="latent")
    cfg = CFGDenoiser(denoiser_from_diffusers(pipe.unet, pipe.scheduler), 3.0, emb.repeat_interleave(2, 0), NEG)
    want = sd.sample(cfg, lat * (1 + plan.sigmas[0] ** 2).sqrt(), plan.sigmas, "dpmpp_2m",
                     stabilizer=plan.stabilizer()).x
    torch.testing.assert_close(out.latents, want, rtol=1e-10, atol=1e-10)
    assert out.nfe == 3 and out.extra_passes == 0
    without = SamplingPlan("dpmpp_2m", plan.sigmas, "fitted", plan.gammas, "ve", {}, plan.meta)
    assert not torch.allclose(sample_pipeline(pipe, prompt_embeds=emb, negative_prompt_embeds=NEG, guidance_scale=3.0,
                                              latents=lat, calibration=without, dtype=torch.float64,
                                              output_type="latent").latents, out.latents)


def test_sample_pipeline_refuses_a_mismatched_calibration(pipe):
    emb = prompts()
    plan = hand_plan(pipe, 3.0, emb)
    kw = dict(prompt_embeds=emb, negative_prompt_embeds=NEG, dtype=torch.float64, output_type="latent", seed=0)
    with pytest.raises(ValueError, match="made for guidance scale 3, requested 5"):
        sample_pipeline(pipe, guidance_scale=5.0, calibration=plan, **kw)
    with pytest.raises(ValueError, match="made for NFE 3, requested 4"):
        sample_pipeline(pipe, guidance_scale=3.0, nfe=4, calibration=plan, **kw)
    with pytest.raises(ValueError, match="made for solver 'dpmpp_2m', requested 'euler'"):
        sample_pipeline(pipe, guidance_scale=3.0, solver="euler", calibration=plan, **kw)
    with pytest.raises(ValueError, match="made for the 'karras' schedule, requested 'logsnr'"):
        sample_pipeline(pipe, guidance_scale=3.0, schedule="logsnr", calibration=plan, **kw)
    with pytest.raises(ValueError, match="either calibration or stabilizer"):
        sample_pipeline(pipe, guidance_scale=3.0, calibration=plan, stabilizer="stein", **kw)
    other = SimpleNamespace(unet=tiny_cond_unet(seed=9), scheduler=diffusers.DDPMScheduler())
    with pytest.raises(ValueError, match="made for another model: its fingerprint is"):
        sample_pipeline(other, guidance_scale=3.0, calibration=plan, **kw)
    # matching values given explicitly are fine
    sample_pipeline(pipe, guidance_scale=3.0, solver="dpmpp_2m", nfe=3, schedule="karras", calibration=plan, **kw)


def test_sample_pipeline_auto_is_the_cached_calibration(pipe, tmp_path, monkeypatch):
    emb = prompts(2)
    kw = dict(prompt_embeds=emb, negative_prompt_embeds=NEG, guidance_scale=2.0, solver="dpmpp_2m", nfe=3,
              dtype=torch.float64, output_type="latent", seed=0)
    # while auto is not the calibrated sampler, it is the registry's choice (the plain solver)
    monkeypatch.setattr(reg, "AUTO", "none")
    assert torch.equal(sample_pipeline(pipe, stabilizer="auto", calibration_dir=tmp_path, **kw).latents,
                       sample_pipeline(pipe, **kw).latents)
    assert not list(tmp_path.glob("*.json"))
    monkeypatch.setattr(reg, "AUTO", reg.CALIBRATED)
    out = sample_pipeline(pipe, stabilizer="auto", calibration_dir=tmp_path, calibration_options=SMALL,
                          calibrate="always", **kw)  # not left to the estimate on a loaded machine
    (f,) = tmp_path.glob("*.json")
    assert out.extra_passes == 0 and out.nfe == 3
    # the cached calibration is calibrate_pipeline's for the same conditioning and options (the state's float64 is
    # not the calibration's dtype: both take the default); applied, it gives the same samples
    plan = calibrate_pipeline(pipe, prompt_embeds=emb, negative_prompt_embeds=NEG, guidance_scale=2.0,
                              solver="dpmpp_2m", nfe=3, schedule="karras", cache_dir=tmp_path,
                              calibrate_missing=False, **SMALL)
    assert plan.meta.get("key") is not None and out.plan.gammas == plan.gammas
    applied = sample_pipeline(pipe, calibration=f, **{k: v for k, v in kw.items() if k not in ("solver", "nfe")})
    assert torch.equal(applied.latents, out.latents)
    # calibrate=False with nothing cached for this solver: the plain solver
    other = sample_pipeline(pipe, stabilizer="auto", calibration_dir=tmp_path, calibrate=False,
                            calibration_options=SMALL, **{**kw, "solver": "euler"})
    assert torch.equal(other.latents, sample_pipeline(pipe, **{**kw, "solver": "euler"}).latents)


def test_pipeline_model_conditioning_batches_and_errors(pipe):
    emb = prompts(2)
    pm = pipeline_model(pipe, prompt_embeds=emb, negative_prompt_embeds=NEG, guidance_scale=4.0)
    assert pm.batch == 2 and set(pm.cond) == {"encoder_hidden_states", UNCOND_PREFIX + "encoder_hidden_states"}
    assert pm.extra_args(4)["encoder_hidden_states"].shape == (4, 5, 8)
    # guidance 1: no CFG, the negative prompts play no part in the model nor in the key
    p1 = pipeline_model(pipe, prompt_embeds=emb, negative_prompt_embeds=NEG, guidance_scale=1.0)
    assert p1.model is p1.denoiser
    assert p1.conditioning_key() == pipeline_model(pipe, prompt_embeds=emb).conditioning_key()
    assert p1.conditioning_key() != pm.conditioning_key()
    # the timestep convention is part of the key
    assert pipeline_model(pipe, prompt_embeds=emb, timestep="round").conditioning_key() != p1.conditioning_key()
    with pytest.raises(ValueError, match="needs negative_prompt_embeds"):
        pipeline_model(pipe, prompt_embeds=emb, guidance_scale=4.0)
    with pytest.raises(ValueError, match="batch size 2, which does not divide the sample batch size 3"):
        pm.extra_args(3)
    with pytest.raises(ValueError, match="without their conditional counterparts encoder_hidden_states"):
        pm.model(torch.zeros(1, 4, 8, 8, dtype=torch.float64), torch.ones(1, dtype=torch.float64),
                 **{UNCOND_PREFIX + "encoder_hidden_states": NEG})
