"""FlowProcess, its schedules (flow_time_shift, FlowSchedule) and FlowDenoiser against closed forms and diffusers'
flow schedulers; the solvers' stable forms from t near 1 (sigma near infinity) in float32."""

import math

import pytest
import torch

from steindiff import sample
from steindiff.models import FlowDenoiser, get_gmm
from steindiff.models.registry import flow_mixture, load_model
from steindiff.noise import FlowProcess, VEProcess
from steindiff.sampling import prior_noise
from steindiff.schedules import FlowSchedule, flow_shift_mu, flow_time_shift, get_sigmas
from steindiff.stabilizers.schedule import GammaSchedule


def test_flow_process_coordinates():
    p = FlowProcess(0.01, 0.99)
    t = torch.tensor([0.01, 0.25, 0.5, 0.9, 0.99], dtype=torch.float64)
    s = p.t_to_sigma(t)
    torch.testing.assert_close(s, t / (1 - t))
    torch.testing.assert_close(p.sigma_to_t(s), t)
    torch.testing.assert_close(p.alpha(s), 1 - t)  # x_t = (1 - t) x_ve
    assert p.sigma_min == pytest.approx(0.01 / 0.99) and p.sigma_max == pytest.approx(99.0)
    assert p.prior_scale(p.sigma_max) == pytest.approx(100.0)
    # x_t of the prior is N(0, I): the VE state times (1 - t)
    x = prior_noise((20000, 2), p.sigma_max, p, seed=0, dtype=torch.float64)
    assert float(p.to_vp(x, p.sigma_max).std()) == pytest.approx(1.0, abs=0.02)
    for bad in ((0.0, 0.5), (0.5, 0.4), (0.1, 1.0)):
        with pytest.raises(ValueError, match="t_min"):
            FlowProcess(*bad)


def test_flow_time_shift_closed_forms():
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    torch.testing.assert_close(flow_time_shift(t, 1.0), t)
    torch.testing.assert_close(flow_time_shift(t, 3.0), 3 * t / (1 + 2 * t))
    torch.testing.assert_close(flow_time_shift(t, mu=0.0), t)  # e^0 = 1: no shift
    torch.testing.assert_close(flow_time_shift(t, mu=math.log(3.0)), 3 * t / (1 + 2 * t))
    torch.testing.assert_close(flow_time_shift(t, mu=2.0, kind="linear"), 2 / (2 + 1 / t - 1))
    with pytest.raises(ValueError, match="kind"):
        flow_time_shift(t, mu=1.0, kind="cubic")
    with pytest.raises(ValueError, match="shift"):
        flow_time_shift(t, 0.0)


def test_flow_time_shift_matches_diffusers():
    diffusers = pytest.importorskip("diffusers")
    sch = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    sch.set_timesteps(8)
    # the scheduler's range ends at its training table's last level, already shifted once, and shifts again
    t_min = float(flow_time_shift(torch.tensor(1 / 1000), 3.0))
    ours = flow_time_shift(torch.linspace(1.0, t_min, 8, dtype=torch.float64), 3.0)
    torch.testing.assert_close(ours.float(), sch.sigmas[:-1].float(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("prediction,time_scale", [("velocity", 1.0), ("velocity", 1000.0), ("x0", 1.0),
                                                   ("epsilon", 1.0)])
def test_flow_denoiser_recovers_the_exact_denoiser(prediction, time_scale):
    """A network that predicts the flow's velocity (or x0, or eps) of an exact mixture, from x_t and t,
    gives back the mixture's own VE denoiser."""
    gmm = get_gmm("gmm:toy2d")
    seen = []

    def net(x_t, t):
        seen.append(t)
        t = (t / time_scale).to(torch.float64)[:, None]
        x_ve = x_t / (1 - t)
        sigma = (t / (1 - t))[:, 0]
        x0 = gmm.denoise(x_ve, sigma)
        eps = (x_t - (1 - t) * x0) / t
        return {"velocity": eps - x0, "x0": x0, "epsilon": eps}[prediction]

    den = FlowDenoiser(net, prediction=prediction, time_scale=time_scale)
    x = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 3
    sigma = torch.linspace(0.05, 20.0, 64, dtype=torch.float64)
    torch.testing.assert_close(den(x, sigma), gmm.denoise(x, sigma), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(seen[-1], sigma / (1 + sigma) * time_scale)
    with pytest.raises(ValueError, match="prediction"):
        FlowDenoiser(net, prediction="v")


def _diffusers_times(sch, n, **kw):
    sch.set_timesteps(n, **kw)
    t = sch.sigmas.double()[:-1]
    return torch.cat([t[:1], t[1::2]]) if type(sch).__name__ == "FlowMatchHeunDiscreteScheduler" else t


FLOW = {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}
CONFIGS = [  # (diffusers class, its config, set_timesteps kwargs, our FlowSchedule)
    ("FlowMatchEulerDiscreteScheduler", {"shift": 3.0}, {}, FlowSchedule(shift=3.0)),
    ("FlowMatchEulerDiscreteScheduler", {"use_dynamic_shifting": True}, {"mu": 0.8},
     FlowSchedule(dynamic=True, mu=0.8)),
    ("FlowMatchEulerDiscreteScheduler", {"use_dynamic_shifting": True, "time_shift_type": "linear"}, {"mu": 0.8},
     FlowSchedule(dynamic=True, mu=0.8, shift_type="linear")),
    ("FlowMatchEulerDiscreteScheduler", {"shift": 3.0, "shift_terminal": 0.1}, {},
     FlowSchedule(shift=3.0, shift_terminal=0.1)),
    ("FlowMatchEulerDiscreteScheduler", {"shift": 2.0, "use_karras_sigmas": True}, {},
     FlowSchedule(shift=2.0, spacing="karras")),
    ("FlowMatchEulerDiscreteScheduler", {"shift": 2.0, "use_exponential_sigmas": True}, {},
     FlowSchedule(shift=2.0, spacing="exponential")),
    ("FlowMatchEulerDiscreteScheduler", {"shift": 2.0, "use_beta_sigmas": True}, {},
     FlowSchedule(shift=2.0, spacing="beta")),
    ("FlowMatchHeunDiscreteScheduler", {"shift": 3.0}, {}, FlowSchedule(shift=3.0)),
    ("DPMSolverMultistepScheduler", {**FLOW, "flow_shift": 3.0}, {}, FlowSchedule(shift=3.0, grid="dpm")),
    ("DPMSolverMultistepScheduler", {**FLOW, "use_dynamic_shifting": True}, {"mu": 0.7},
     FlowSchedule(grid="dpm", dynamic=True, mu=0.7)),
    ("UniPCMultistepScheduler", {**FLOW, "flow_shift": 3.0}, {}, FlowSchedule(shift=3.0, grid="unipc")),
    ("UniPCMultistepScheduler", {**FLOW, "use_dynamic_shifting": True, "shift_terminal": 0.05}, {"mu": 0.7},
     FlowSchedule(grid="unipc", dynamic=True, mu=0.7, shift_terminal=0.05)),
]


@pytest.mark.parametrize("cls,config,kw,ours", CONFIGS, ids=[f"{c[0][:12]}-{i}" for i, c in enumerate(CONFIGS)])
@pytest.mark.parametrize("n", [2, 5, 28])
def test_flow_schedule_is_diffusers_levels(cls, config, kw, ours, n):
    diffusers = pytest.importorskip("diffusers")
    sch = getattr(diffusers, cls)(**config)
    # diffusers computes its tables in float32
    torch.testing.assert_close(ours.times(n), _diffusers_times(sch, n, **kw), rtol=0, atol=3e-7)
    # and the process read from its config has that schedule
    from steindiff.integrations.diffusers import process_from_scheduler

    proc = process_from_scheduler(sch, mu=kw.get("mu"))
    assert proc.schedule == ours and proc.t_max == 1 - 1e-6 and proc.t_min == 1e-3


def test_flow_schedule_sigmas_put_t1_at_t_max():
    p = FlowProcess(1e-3, 1 - 1e-4, FlowSchedule(shift=3.0))
    s = get_sigmas("flow", 6, p)
    t = s / (1 + s)
    assert float(t[0]) == pytest.approx(1 - 1e-4) and s[-1] == 0 and len(s) == 7
    torch.testing.assert_close(t[1:-1], FlowSchedule(shift=3.0).times(6)[1:])
    with pytest.raises(ValueError, match="second level"):  # a level besides t = 1 above t_max cannot stand in
        get_sigmas("flow", 2000, FlowProcess(1e-4, 1 - 1e-3, FlowSchedule(shift=3.0)))
    with pytest.raises(ValueError, match="needs a FlowProcess"):
        get_sigmas("flow", 4, VEProcess())
    with pytest.raises(ValueError, match="mu"):  # dynamic shifting without the resolution shift
        get_sigmas("flow", 4, FlowProcess(schedule=FlowSchedule(dynamic=True)))
    with pytest.raises(ValueError, match="time_shift_type"):
        FlowSchedule(shift_type="cubic")
    with pytest.raises(ValueError, match="at least 2 steps"):
        FlowSchedule(shift_terminal=0.1).times(1)


def test_flow_shift_mu_is_flux_calculate_shift():
    pytest.importorskip("diffusers")
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    for seq in (256, 1024, 4096, 700):
        assert flow_shift_mu(seq) == pytest.approx(calculate_shift(seq))
        assert flow_shift_mu(seq, 128, 2048, 0.3, 1.2) == pytest.approx(calculate_shift(seq, 128, 2048, 0.3, 1.2))


SOLVERS = ["euler", "heun_flow", "dpmpp_2m", "dpmpp_3m", "unipc", "ipndm", "ipndm_v"]


@pytest.mark.parametrize("solver", SOLVERS)
def test_solvers_are_float32_exact_from_t_near_1(solver):
    """From t_max = 1 - 1e-8 (sigma 1e8, a state of size 1e8 eps) float32 solves agree with float64 ones to
    float32 rounding: no step cancels the large state against its slope (x + (s' - s) (x - D) / s would lose
    everything below 1e8 * 6e-8 = 6)."""
    gmm = get_gmm("gmm:toy2d")
    spec = flow_mixture(gmm)
    p = FlowProcess(spec.process.t_min, 1 - 1e-8)
    den = FlowDenoiser(gmm.velocity_net(1000.0), p, time_scale=1000.0)
    sig = get_sigmas("flow", 6, p)
    x64 = prior_noise((256, 2), float(sig[0]), p, seed=3, dtype=torch.float64)
    ref = sample(den, x64, sig, solver).x
    out = sample(den, x64.float(), sig, solver).x
    assert float((out.double() - ref).norm() / ref.norm()) < 1e-5
    # the calibrated sampler's rescaled step too, with gamma != 1 at the first step
    stab = GammaSchedule([0.9, 1.1, 1.0, 1.0, 1.0, 1.0])
    ref = sample(den, x64, sig, solver, stabilizer=stab).x
    out = sample(den, x64.float(), sig, solver, stabilizer=stab).x
    assert torch.isfinite(ref).all() and float((out.double() - ref).norm() / ref.norm()) < 1e-5


def test_flow_mixture_bed_is_the_mixture_through_the_adapter():
    spec = load_model("gmm:image64-flow")
    ve = load_model("gmm:image64")
    assert isinstance(spec.denoiser, FlowDenoiser) and isinstance(spec.process, FlowProcess)
    assert spec.gmm is not None and spec.name == "gmm:image64-flow" and spec.denoiser is not spec.gmm
    assert spec.process.sigma_max == pytest.approx(1e6 - 1) and spec.process.sigma_min == pytest.approx(0.002)
    x = torch.randn(8, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2
    sigma = torch.tensor([0.002, 0.05, 0.5, 2.0, 30.0, 1e3, 1e5, 1e6 - 1], dtype=torch.float64)
    torch.testing.assert_close(spec.denoiser(x, sigma), ve.denoiser(x, sigma), rtol=1e-9, atol=1e-9)
    # its velocity at t = 1 exactly (where diffusers' flow Euler starts) is the limit x_1 - E[x0]
    v = gmm_v = spec.gmm.velocity_net(1000.0)
    x1 = torch.randn(4, 64, dtype=torch.float64)
    mean = (spec.gmm.weights[:, None] * spec.gmm.means).sum(0)
    torch.testing.assert_close(v(x1, torch.full((4,), 1000.0, dtype=torch.float64)), x1 - mean)
    torch.testing.assert_close(gmm_v(x1, torch.full((4,), 1000 * (1 - 1e-7), dtype=torch.float64)), x1 - mean,
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unknown mixture preset"):
        load_model("gmm:nothing-flow")
