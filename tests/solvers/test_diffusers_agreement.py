"""Our solvers against diffusers' schedulers on the same model, latents and noise levels.

The model is a smooth nonlinear epsilon network in float64.  Our sigmas are taken from the
scheduler itself (``scheduler.sigmas`` or its ``alphas_cumprod`` at its timesteps), so these tests
check the solver arithmetic, not schedule construction; the Karras construction is checked apart.

diffusers keeps VP state ``x_vp = alpha x_ve`` (DDIM, DPM-Solver, UniPC) or VE state (Euler, Heun);
we always keep VE state, so VP latents are converted with ``x_ve = x_vp * sqrt(1 + sigma^2)``.  At
the final ``sigma = 0`` the two coordinates coincide.  Residual differences come from diffusers
computing its schedule tables in float32: measured 2.5e-8 to 4.7e-7 relative over these cases
(diffusers 0.42, CPU), so ``RTOL = 2e-6`` keeps a 4x margin over the worst case; a wrong
coefficient shows at 1e-3 or more.
"""

from __future__ import annotations

import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from steindiff import DiscreteVPProcess, karras_sigmas, sample  # noqa: E402
from steindiff.models import VPDenoiser  # noqa: E402
from steindiff.solvers import get_solver  # noqa: E402

RTOL = 2e-6
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


@pytest.mark.parametrize("variant,final", [("bh2", "zero"), ("bh2", "sigma_min"), ("bh1", "sigma_min")])
def test_unipc_order_1_matches_unipc(variant, final):
    """UniPC-1: a DDIM predictor and the UniC-1 corrector (c = 1/2).  bh1 with a final step to 0 is
    left out: diffusers returns NaN there (test_unipc_bh1_final_zero_is_finite)."""
    sch = diffusers.UniPCMultistepScheduler(beta_schedule="linear", solver_type=variant, solver_order=1,
                                            final_sigmas_type=final)
    sch.set_timesteps(STEPS)
    x_vp = latents()
    ref = run_vp_scheduler(sch, x_vp)
    sig = sch.sigmas.double()
    D = VPDenoiser(eps_net, process_of(sch), "epsilon")
    ours = sample(D, x_vp * (1 + sig[0] ** 2).sqrt(), sig, f"unipc_{variant}", solver_options={"order": 1})
    assert ours.nfe == STEPS
    assert rel_err(ours.x / (1 + sig[-1] ** 2).sqrt(), ref) < RTOL
    # the corrector acts: UniP alone (no corrector) is another sampler
    plain = sample(D, x_vp * (1 + sig[0] ** 2).sqrt(), sig, f"unipc_{variant}",
                   solver_options={"order": 1, "corrector": False})
    assert rel_err(plain.x / (1 + sig[-1] ** 2).sqrt(), ref) > 1e-3


@pytest.mark.parametrize("order", [2, 3])
def test_unipc_bh1_karras_matches_unipc_up_to_diffusers_final_step(order):
    """UniPC-bh1 with Karras sigmas.  diffusers 0.42 has no usable final step here: with
    final_sigmas_type="zero" its bh1 last step is NaN (B(h) = -h = -inf times an empty sum), and with
    "sigma_min" it repeats the last Karras sigma (a zero-length, model-calling step, which we reject).
    Both are pinned below; every state before diffusers' final step agrees, and ours ends finite."""
    sch = diffusers.UniPCMultistepScheduler(beta_schedule="linear", solver_type="bh1", solver_order=order,
                                            use_karras_sigmas=True)
    sch.set_timesteps(STEPS)
    sig = sch.sigmas.double()
    assert sig[-1] == 0
    x = latents()
    theirs = []
    for t in sch.timesteps:
        x = sch.step(eps_net(x, t.expand(BATCH)), t, x).prev_sample
        theirs.append(x)
    assert torch.isnan(theirs[-1]).all() and torch.isfinite(theirs[-2]).all()
    D = VPDenoiser(eps_net, process_of(sch), "epsilon", timestep="round")
    ours_states = []
    ours = sample(D, latents() * (1 + sig[0] ** 2).sqrt(), sig, "unipc_bh1", solver_options={"order": order},
                  callback=lambda d: ours_states.append(d["x"] / (1 + d["sigma_next"] ** 2) ** 0.5))
    assert torch.isfinite(ours.x).all() and len(ours_states) == STEPS
    for k in range(STEPS - 1):
        assert rel_err(ours_states[k], theirs[k]) < RTOL, k
    dup = diffusers.UniPCMultistepScheduler(beta_schedule="linear", solver_type="bh1", use_karras_sigmas=True,
                                            final_sigmas_type="sigma_min")
    dup.set_timesteps(STEPS)
    assert dup.sigmas[-1] == dup.sigmas[-2]
    with pytest.raises(ValueError, match="strictly decreasing"):
        sample(D, latents(), dup.sigmas.double(), "unipc_bh1")


def v_net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A smooth nonlinear v-prediction network on t in [0, 1] (the IPNDM scheduler's time)."""
    tt = t.to(x.dtype).reshape(-1, 1)
    return 0.8 * x * tt + 0.3 * torch.tanh(x @ _W) * (0.5 + tt) + 0.1 * torch.sin(3 * x) * (1 - tt)


def v_denoiser(x_ve: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The VE denoiser of ``v_net``: ``D = alpha x_vp - sigma_vp v`` with diffusers' IPNDM time
    ``t = atan2(sigma_vp, alpha) 2/pi = atan(sigma) 2/pi`` (its ``alpha^2 + sigma_vp^2 = 1``)."""
    s = sigma.reshape(-1, 1)
    a = 1 / (1 + s**2).sqrt()
    x_vp = a * x_ve
    return a * x_vp - a * s * v_net(x_vp, torch.atan(sigma) * 2 / torch.pi)


def ipndm_reference(sch, x_vp: torch.Tensor) -> torch.Tensor:
    x = x_vp.clone()
    for t in sch.timesteps:
        x = sch.step(v_net(x, t.expand(x.shape[0])), t, x).prev_sample
    return x


def test_ipndm_matches_ipndm_scheduler():
    """diffusers' IPNDMScheduler is Adams-Bashforth (fixed weights, orders 1 to 4 with warm-up) on
    eps = sigma_vp x + alpha v followed by a DDIM step: in VE coordinates x' = x + (s' - s) eps_AB,
    our ``ipndm`` with slope (x - D)/s = eps.  Its sigma_vp table is given as trained_betas (our
    Karras sigmas), so both step on the same levels; ``ipndm_v`` (variable-step weights) differs."""
    sig = karras_sigmas(STEPS, 0.02, 20.0)
    sch = diffusers.IPNDMScheduler(trained_betas=(sig / (1 + sig**2).sqrt()).numpy())
    sch.set_timesteps(STEPS)
    assert len(sch.timesteps) == STEPS
    x_vp = latents()
    ref = ipndm_reference(sch, x_vp)
    ours = sample(v_denoiser, x_vp * (1 + sig[0] ** 2).sqrt(), sig, "ipndm")
    assert ours.nfe == STEPS
    assert rel_err(ours.x, ref) < RTOL
    assert rel_err(sample(v_denoiser, x_vp * (1 + sig[0] ** 2).sqrt(), sig, "ipndm_v").x, ref) > 1e-3


def test_ipndm_default_schedule_starts_at_infinite_sigma():
    """diffusers' default IPNDM schedule starts at t = 1, where alpha = 0: VE sigma = inf, which no
    schedule of ours may hold (finite, validated).  Its first step ignores the model (its output is
    multiplied by alpha = 0) and stores eps = x_T as the first slope.  From step 1 on, with that
    first slope as history, our iPNDM step arithmetic agrees on diffusers' own levels."""
    from steindiff.solvers import Denoise

    sch = diffusers.IPNDMScheduler()
    sch.set_timesteps(STEPS)
    assert sch.alphas[0] == 0 and sch.betas[0] == 1
    alpha, beta = sch.alphas.double(), sch.betas.double()
    sig = [math.inf] + (beta[1:-1] / alpha[1:-1]).tolist() + [0.0]
    with pytest.raises(ValueError, match="finite"):
        sample(v_denoiser, latents(), sig, "ipndm")
    x_T = latents()
    ref = ipndm_reference(sch, x_T)
    solver = get_solver("ipndm")
    state = {"slopes": [x_T], "sigmas": [math.inf]}
    x = x_T * beta[1] / alpha[1]  # diffusers' first step: x_vp1 = sigma_vp1 x_T, in VE coordinates
    for i in range(1, STEPS):
        st = solver.step(Denoise(v_denoiser), x, i, sig, state)
        x, state = st.x_next, st.state
    assert rel_err(x, ref) < RTOL
