"""Our solvers against diffusers' schedulers on the same model, latents and noise levels.

The model is a smooth nonlinear epsilon network in float64.  Our sigmas are taken from the
scheduler itself (``scheduler.sigmas`` or its ``alphas_cumprod`` at its timesteps), so these tests
check the solver arithmetic, not schedule construction; the Karras construction is checked apart.

diffusers keeps VP state ``x_vp = alpha x_ve`` (DDIM, DPM-Solver, UniPC) or VE state (Euler, Heun);
we always keep VE state, so VP latents are converted with ``x_ve = x_vp * sqrt(1 + sigma^2)``.  At
the final ``sigma = 0`` the two coordinates coincide.  Residual differences (~1e-7) come from
diffusers computing its schedule tables in float32.
"""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from steindiff import DiscreteVPProcess, karras_sigmas, sample  # noqa: E402
from steindiff.models import VPDenoiser  # noqa: E402

RTOL = 1e-4
DIM, BATCH, STEPS = 8, 4, 10

_W = torch.randn(DIM, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 0.4


def eps_net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Smooth nonlinear epsilon prediction that depends on the (possibly fractional) timestep.

    The linear term is the exact epsilon of N(0, I) data on a continuous linear VP schedule, so the
    samples stay at data scale; the nonlinear terms make every solver order matter."""
    tt = (t.to(x.dtype) / 1000).reshape(-1, 1)
    abar = torch.exp(-(0.1 * tt + 9.95 * tt**2))
    return (1 - abar).sqrt() * x + 0.3 * torch.tanh(x @ _W) * (0.5 + tt) + 0.1 * torch.sin(3 * x) * (1 - tt)


class CountingNet:
    def __init__(self, net):
        self.net, self.calls = net, 0

    def __call__(self, x, t):
        self.calls += 1
        return self.net(x, t)


def latents() -> torch.Tensor:
    return torch.randn(BATCH, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def process_of(sch) -> DiscreteVPProcess:
    return DiscreteVPProcess(alphas_cumprod=sch.alphas_cumprod.double().numpy())


def run_vp_scheduler(sch, x_vp: torch.Tensor, net=eps_net) -> torch.Tensor:
    """diffusers loop for schedulers whose state is the VP latent (no input scaling)."""
    x = x_vp.clone()
    for t in sch.timesteps:
        x = sch.step(net(x, t.expand(x.shape[0])), t, x).prev_sample
    return x


def run_ve_scheduler(sch, x_ve: torch.Tensor, net=eps_net) -> torch.Tensor:
    """diffusers loop for k-diffusion style schedulers (VE state, ``scale_model_input``)."""
    x = x_ve.clone()
    for t in sch.timesteps:
        inp = sch.scale_model_input(x, t)
        x = sch.step(net(inp, t.expand(x.shape[0])), t, x).prev_sample
    return x


@pytest.mark.parametrize("spacing", ["trailing", "leading"])
def test_ddim_eta0_matches_euler(spacing):
    # set_alpha_to_one=True: the last DDIM step goes to alpha_cumprod = 1, i.e. sigma = 0 (the data),
    # as in the DDIM / EDM papers; with False it would stop at alphas_cumprod[0] (sigma ~ 0.01).
    # STEPS divides 1000, so DDIM's prev_timestep = t - 1000 // STEPS is exactly the next timestep
    # for either spacing (otherwise diffusers steps to a timestep that is not the next one).
    sch = diffusers.DDIMScheduler(
        num_train_timesteps=1000, beta_schedule="linear", clip_sample=False,
        set_alpha_to_one=True, timestep_spacing=spacing,
    )
    sch.set_timesteps(STEPS)
    x_vp = latents()
    ref = torch.clone(x_vp)
    for t in sch.timesteps:
        ref = sch.step(eps_net(ref, t.expand(BATCH)), t, ref, eta=0.0).prev_sample

    ac = sch.alphas_cumprod.double()
    abar = ac[sch.timesteps.long()]
    sig = torch.cat([((1 - abar) / abar).sqrt(), torch.zeros(1, dtype=torch.float64)])
    D = VPDenoiser(eps_net, process_of(sch), "epsilon")
    ours = sample(D, x_vp * (1 + sig[0] ** 2).sqrt(), sig, "euler")
    assert ours.nfe == STEPS
    assert rel_err(ours.x, ref) < RTOL
    # "ddim" is the same solver under its other name
    assert torch.equal(sample(D, x_vp * (1 + sig[0] ** 2).sqrt(), sig, "ddim").x, ours.x)


def test_euler_discrete_karras_matches_euler():
    sch = diffusers.EulerDiscreteScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                                           beta_start=0.00085, beta_end=0.012, use_karras_sigmas=True)
    sch.set_timesteps(STEPS)
    # Euler keeps the VE state x = x0 + sigma eps, like us: the same latent (any scale; diffusers
    # would draw it as randn * init_noise_sigma) is the initial state of both.
    x = latents() * sch.init_noise_sigma
    ref = run_ve_scheduler(sch, x)
    # model timesteps are fractional (interpolated in log sigma): our default "interp"
    D = VPDenoiser(eps_net, process_of(sch), "epsilon", timestep="interp")
    ours = sample(D, x, sch.sigmas.double(), "euler")
    assert ours.nfe == STEPS
    assert rel_err(ours.x, ref) < RTOL


def test_heun_discrete_matches_heun_and_nfe():
    sch = diffusers.HeunDiscreteScheduler(num_train_timesteps=1000, beta_schedule="linear", use_karras_sigmas=True)
    sch.set_timesteps(STEPS)
    net = CountingNet(eps_net)
    x = latents() * sch.init_noise_sigma
    ref = run_ve_scheduler(sch, x, net)
    # diffusers stores every intermediate sigma twice: [s0, s1, s1, ..., s_{N-1}, s_{N-1}, 0]
    sig = torch.cat([sch.sigmas[:1], sch.sigmas[1::2]]).double()
    assert len(sig) == STEPS + 1 and sig[-1] == 0
    D = VPDenoiser(eps_net, process_of(sch), "epsilon")
    ours = sample(D, x, sig, "heun")
    assert rel_err(ours.x, ref) < RTOL
    assert net.calls == 2 * STEPS - 1
    assert ours.nfe == net.calls


DPM_CASES = [
    # (order, karras, final_sigmas_type, lower_order_final)
    (2, False, "zero", True),
    (3, False, "zero", True),
    (2, True, "zero", True),
    (3, True, "zero", True),
    # lower_order_final only changes anything with final_sigmas_type="sigma_min": with "zero" diffusers
    # always takes a first-order final step (lambda = inf leaves no higher-order term), and our
    # solver does the same.  So the on/off pair is pinned to "sigma_min" (last sigma > 0).
    (2, False, "sigma_min", True),
    (2, False, "sigma_min", False),
    (3, False, "sigma_min", True),
    (3, False, "sigma_min", False),
    # Karras + "sigma_min" is left out: diffusers' last Karras sigma already is sigma_min, so it appends
    # it a second time and takes a zero-length final step (test_dpmsolver_karras_sigma_min_duplicate).
]


@pytest.mark.parametrize("order,karras,final,lof", DPM_CASES)
def test_dpmsolver_multistep_matches_dpmpp(order, karras, final, lof):
    sch = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_schedule="linear", algorithm_type="dpmsolver++", solver_order=order,
        use_karras_sigmas=karras, final_sigmas_type=final, lower_order_final=lof,
    )
    sch.set_timesteps(STEPS)
    x_vp = latents()
    ref = run_vp_scheduler(sch, x_vp)
    sig = sch.sigmas.double()
    assert (sig[-1] == 0) == (final == "zero")
    # with Karras sigmas diffusers feeds the network the rounded timestep (the sigma in the update
    # stays the unrounded Karras one)
    D = VPDenoiser(eps_net, process_of(sch), "epsilon", timestep="round" if karras else "interp")
    x0 = x_vp * (1 + sig[0] ** 2).sqrt()
    ours = sample(D, x0, sig, f"dpmpp_{order}m", solver_options={"lower_order_final": lof})
    if final == "sigma_min":  # VP state at sigma_min
        ours_x = ours.x / (1 + sig[-1] ** 2).sqrt()
    else:
        ours_x = ours.x
    assert ours.nfe == STEPS
    assert rel_err(ours_x, ref) < RTOL


def test_dpmsolver_lower_order_final_changes_result():
    """Guard that the on/off pair above is not vacuous: with sigma_min, the flag changes the sample."""
    outs = []
    for lof in (True, False):
        sch = diffusers.DPMSolverMultistepScheduler(beta_schedule="linear", solver_order=3,
                                                    final_sigmas_type="sigma_min", lower_order_final=lof)
        sch.set_timesteps(STEPS)
        outs.append(run_vp_scheduler(sch, latents()))
    assert rel_err(outs[0], outs[1]) > 100 * RTOL


def test_dpmsolver_karras_sigma_min_duplicate():
    """diffusers' Karras + final_sigmas_type="sigma_min" repeats sigma_min (a zero-length, model-calling
    last step); we reject such a schedule instead of silently spending an NFE on it."""
    sch = diffusers.DPMSolverMultistepScheduler(beta_schedule="linear", use_karras_sigmas=True,
                                                final_sigmas_type="sigma_min")
    sch.set_timesteps(STEPS)
    assert sch.sigmas[-1] == sch.sigmas[-2]
    D = VPDenoiser(eps_net, process_of(sch), "epsilon", timestep="round")
    with pytest.raises(ValueError, match="strictly decreasing"):
        sample(D, latents(), sch.sigmas.double(), "dpmpp_2m")


@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("karras", [False, True])
def test_unipc_bh2_matches_unipc(order, karras):
    sch = diffusers.UniPCMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear", solver_type="bh2",
                                            solver_order=order, use_karras_sigmas=karras)
    sch.set_timesteps(STEPS)
    x_vp = latents()
    ref = run_vp_scheduler(sch, x_vp)
    sig = sch.sigmas.double()
    D = VPDenoiser(eps_net, process_of(sch), "epsilon", timestep="round" if karras else "interp")
    ours = sample(D, x_vp * (1 + sig[0] ** 2).sqrt(), sig, "unipc", solver_options={"order": order})
    assert ours.nfe == STEPS
    assert rel_err(ours.x, ref) < RTOL


@pytest.mark.parametrize("order", [2, 3])
def test_unipc_bh1_matches_unipc(order):
    # final_sigmas_type="sigma_min": with the default "zero", diffusers 0.42's bh1 returns NaN at the
    # last step (B(h) = -h = -inf there, multiplied by an empty predictor sum of 0); see the test below.
    sch = diffusers.UniPCMultistepScheduler(beta_schedule="linear", solver_type="bh1", solver_order=order,
                                            final_sigmas_type="sigma_min")
    sch.set_timesteps(STEPS)
    x_vp = latents()
    ref = run_vp_scheduler(sch, x_vp)
    sig = sch.sigmas.double()
    D = VPDenoiser(eps_net, process_of(sch), "epsilon")
    ours = sample(D, x_vp * (1 + sig[0] ** 2).sqrt(), sig, "unipc_bh1", solver_options={"order": order})
    assert sig[-1] > 0
    assert rel_err(ours.x / (1 + sig[-1] ** 2).sqrt(), ref) < RTOL


def test_unipc_bh1_final_zero_is_finite():
    """Same setting with a final step to sigma = 0: diffusers yields NaN (B(h) = -inf times 0); we take a
    plain first-order final step.  Agreement holds up to the last step, and our result is finite."""
    sch = diffusers.UniPCMultistepScheduler(beta_schedule="linear", solver_type="bh1", solver_order=2)
    sch.set_timesteps(STEPS)
    x = latents()
    states = []
    for t in sch.timesteps:
        x = sch.step(eps_net(x, t.expand(BATCH)), t, x).prev_sample
        states.append(x)
    sig = sch.sigmas.double()
    assert sig[-1] == 0
    D = VPDenoiser(eps_net, process_of(sch), "epsilon")
    ours_states = []
    ours = sample(D, latents() * (1 + sig[0] ** 2).sqrt(), sig, "unipc_bh1",
                  callback=lambda d: ours_states.append(d["x"] / (1 + d["sigma_next"] ** 2) ** 0.5))
    assert torch.isfinite(ours.x).all()
    # the state after the second-to-last step is the uncorrected predictor in both implementations
    assert rel_err(ours_states[-2], states[-2]) < RTOL


@pytest.mark.parametrize("steps", [5, 10, 25])
@pytest.mark.parametrize("cls", ["EulerDiscreteScheduler", "DPMSolverMultistepScheduler"])
def test_karras_sigmas_match_diffusers(cls, steps):
    sch = getattr(diffusers, cls)(num_train_timesteps=1000, beta_schedule="scaled_linear",
                                  beta_start=0.00085, beta_end=0.012, use_karras_sigmas=True)
    sch.set_timesteps(steps)
    theirs = sch.sigmas.double()
    assert theirs[-1] == 0
    smax, smin = float(theirs[0]), float(theirs[-2])
    ours = karras_sigmas(steps, smin, smax, rho=7.0)
    assert ours.shape == theirs.shape
    # diffusers stores sigmas in float32
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
