"""GammaStabilizer's Jacobian passes: chunked (--jacobian-batch) equals unchunked, pass sizes are
bounded, out-of-memory is reported with the pass size, every statistic follows the state's device,
the bf16 Jacobian pass (jacobian_precision) agrees with fp32 within the probe noise, and a step reads
values back to the host once."""

import pytest
import torch

from steindiff import VEProcess, get_sigmas, prior_noise, sample
from steindiff.models import EDMPrecond, UNet, UNetConfig
from steindiff.models.registry import load_model
from steindiff.sampling import steps
from steindiff.stabilizers import SteinStabilizer, make_stabilizer
from steindiff.stabilizers.base import JacobianOutOfMemoryError

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]
# (stabilizer, options): reverse mode (looped and vmapped probes), forward mode, exact trace, energy matching
# and the bf16 Jacobian pass (on these float64 states autocast changes nothing: the step runs apart from the pass)
VARIANTS = [("stein", {}), ("stein", {"batched_probes": True}), ("stein", {"divergence": "jvp"}),
            ("stein-exact", {}), ("stein-energy", {"energy_from": "each"}), ("stein", {"jacobian_precision": "bf16"})]


def run(spec, x, sig, solver, name, device="cpu", **opts):
    stab = make_stabilizer(name, spec, probes=3, seed=4, **opts)
    return sample(spec.denoiser, x.to(device), sig, solver, stabilizer=stab)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("solver", ["dpmpp_3m", "unipc", "heun"])  # histories of tensors, tuples, two passes per step
@pytest.mark.parametrize("name,opts", VARIANTS)
def test_chunked_equals_unchunked(device, solver, name, opts):
    """The statistics are sums over samples and the probes are drawn for the whole batch first, so
    chunking samples (and grouping probes) changes no result: same samples, gammas and pass counts."""
    spec = load_model("gmm:toy2d").to(device)
    sig = get_sigmas("karras", 4, spec.process)
    x = prior_noise((10, 2), float(sig[0]), spec.process, seed=1, dtype=torch.float64)
    ref = run(spec, x, sig, solver, name, device, **opts)
    # chunks of 1; of 4, 4, 2 (probes in groups of 1); the whole batch (groups of 1); forward mode is slow
    for jb in ((4,) if opts.get("divergence") == "jvp" else (1, 4, 10)):
        got = run(spec, x, sig, solver, name, device, jacobian_batch=jb, **opts)
        assert got.x.device == ref.x.device
        torch.testing.assert_close(got.x, ref.x, rtol=1e-10, atol=1e-10)
        assert [r["gamma"] for r in got.trace] == pytest.approx([r["gamma"] for r in ref.trace], rel=1e-9, abs=1e-12)
        assert (got.nfe, got.extra_passes) == (ref.nfe, ref.extra_passes)


class Recorder(torch.nn.Module):
    """A denoiser that records the batch size of every call made with a graph."""

    def __init__(self):
        super().__init__()
        self.inner = EDMPrecond(UNet(UNetConfig(model_channels=8, channel_mult=(1, 2), attn_levels=())))
        self.inner.requires_grad_(False)
        self.grad_batches: list[int] = []

    def forward(self, x, sigma):
        if x.requires_grad:
            self.grad_batches.append(x.shape[0])
        return self.inner(x, sigma)


def test_jacobian_batch_bounds_the_differentiable_passes(monkeypatch):
    model = Recorder()
    sig = get_sigmas("karras", 3, VEProcess())
    x = prior_noise((10, 1, 8, 8), float(sig[0]), seed=0)
    grads = []
    real_grad = torch.autograd.grad

    def counting_grad(out, inp, grad_outputs=None, **kw):
        grads.append(tuple(grad_outputs.shape))
        return real_grad(out, inp, grad_outputs=grad_outputs, **kw)

    monkeypatch.setattr(torch.autograd, "grad", counting_grad)
    stab = make_stabilizer("stein", None, probes=5, jacobian_batch=8, batched_probes=True)
    res = sample(model, x, sig, "dpmpp_2m", stabilizer=stab)
    # 8 samples, then 2; probes in groups of max(1, 8 // 8) = 1 sample-chunk x probe pairs per backward
    assert model.grad_batches == [8, 2] * 3
    assert all(s[0] == 8 or s[0] == 2 for s in grads) and len(grads) == 3 * 2 * 5
    assert res.nfe == 3 and res.extra_passes == 15  # chunks do not count as extra model passes
    grads.clear()
    stab = make_stabilizer("stein", None, probes=5, jacobian_batch=20, batched_probes=True)
    sample(model, x[:4], sig, "dpmpp_2m", stabilizer=stab)
    # 4 samples in one chunk, 20 // 4 = 5 probes per vmapped backward: one batched pass per step
    assert grads == [(5, 4, 1, 8, 8)] * 3


def test_bad_jacobian_batch():
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="jacobian_batch must be a positive integer"):
            make_stabilizer("stein", None, jacobian_batch=bad)


@pytest.mark.parametrize("jb,per_pass", [(None, "batch of 6 samples, 6 samples x 5"), (4, "4 samples x 5")])
def test_out_of_memory_names_the_pass_size_and_the_option(jb, per_pass, oom_under_grad):
    sig = get_sigmas("karras", 3, VEProcess())
    x = prior_noise((6, 3), float(sig[0]), seed=0)
    with pytest.raises(JacobianOutOfMemoryError) as e:
        sample(oom_under_grad, x, sig, "euler", stabilizer=make_stabilizer("stein", None, jacobian_batch=jb))
    msg = str(e.value)
    assert "--jacobian-batch" in msg and per_pass in msg and "step 0" in msg
    assert e.value.__cause__ is None  # the failed pass's graph is not kept alive by the error


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["stein", "stein-tr", "stein-energy", "stein-sc", "stein-oracle"])
def test_statistics_follow_the_state_device(device, name):
    """Every tensor a stabilizer creates (probes, the batch count stacked with the statistics,
    energy matching's zeros) lands on the state's device; the result equals the CPU run's."""
    spec = load_model("gmm:image64")
    sig = get_sigmas("karras", 4, spec.process)
    x = prior_noise((12, 64), float(sig[0]), spec.process, seed=2, dtype=torch.float64)
    cpu = run(spec, x, sig, "dpmpp_2m", name)
    spec.to(device)
    got = run(spec, x, sig, "dpmpp_2m", name, device)
    assert got.x.device.type == torch.device(device).type
    torch.testing.assert_close(got.x.cpu(), cpu.x, rtol=1e-7, atol=1e-9)
    assert [r["gamma"] for r in got.trace] == pytest.approx([r["gamma"] for r in cpu.trace], rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("device", DEVICES)
def test_unet_stabilizer_on_device(device):
    torch.manual_seed(0)
    unet = UNet(UNetConfig(model_channels=8, channel_mult=(1, 2), attn_levels=(1,)))
    for m in unet.modules():  # weights for the zero-initialized output layers: a non-trivial network
        if isinstance(m, torch.nn.Conv2d) and not m.weight.any():
            m.reset_parameters()
    net = EDMPrecond(unet).eval().requires_grad_(False)
    sig = get_sigmas("karras", 3, VEProcess())
    x = prior_noise((4, 1, 8, 8), float(sig[0]), seed=0)
    cpu = sample(net, x, sig, "dpmpp_2m", stabilizer=make_stabilizer("stein", None, probes=2, jacobian_batch=3))
    net.to(device)
    got = sample(net, x.to(device), sig, "dpmpp_2m",
                 stabilizer=make_stabilizer("stein", None, probes=2, jacobian_batch=3))
    torch.testing.assert_close(got.x.cpu(), cpu.x, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("name,opts", VARIANTS)
def test_probes_drawn_in_a_worker_thread_are_the_same(name, opts):
    """On CUDA the probes are drawn in a worker thread during the forward pass: same generator, same values."""
    spec = load_model("gmm:toy2d")
    sig = get_sigmas("karras", 4, spec.process)
    x = prior_noise((10, 2), float(sig[0]), spec.process, seed=1, dtype=torch.float64)
    res = []
    for threaded in (False, True):
        stab = make_stabilizer(name, spec, probes=3, seed=4, jacobian_batch=4, async_probes=threaded, **opts)
        res.append(sample(spec.denoiser, x, sig, "unipc", stabilizer=stab))
    assert torch.equal(res[0].x, res[1].x)
    assert [r["gamma"] for r in res[0].trace] == [r["gamma"] for r in res[1].trace]


def _tiny_unet():
    torch.manual_seed(0)
    unet = UNet(UNetConfig(model_channels=8, channel_mult=(1, 2), attn_levels=(1,)))
    for m in unet.modules():  # weights for the zero-initialized output layers: a non-trivial network
        if isinstance(m, torch.nn.Conv2d) and not m.weight.any():
            m.reset_parameters()
    return EDMPrecond(unet).eval().requires_grad_(False)


def test_bf16_jacobian_pass_agrees_with_fp32_within_the_probe_noise():
    """Same probes, fp32 against bf16 at every step of a float32 U-Net solve: the solver's step is the same
    (it runs outside autocast), and the batch mean of the divergence (``s_div``) differs by at most a quarter of
    its spread over probe draws.  benchmarks/jacobian_precision.py measured at most 1.7% (digits U-Net) and
    5.3% (a small random U-Net) of that spread, so a quarter leaves a margin of 5 for this model and for the
    spread's own error with 6 draws."""
    net = _tiny_unet()
    sig = get_sigmas("karras", 4, VEProcess())
    x = prior_noise((8, 1, 8, 8), float(sig[0]), seed=0)
    worst = 0.0
    for ev in steps(net, x, sig, "dpmpp_2m"):
        s_div, extra = {}, {}
        for prec in ("fp32", "bf16"):
            s_div[prec] = []
            for seed in range(6):
                stab = make_stabilizer("stein", None, probes=1, seed=seed, jacobian_precision=prec)
                _, st, rec = stab.step(ev.op, ev.x)
                torch.testing.assert_close(st.x_next, ev.step.x_next)  # the plain solver's step in both
                s_div[prec].append(rec["s_div"])
                extra[prec] = rec["extra_passes"]
        spread = torch.tensor(s_div["fp32"], dtype=torch.float64).std()
        diff = (torch.tensor(s_div["bf16"], dtype=torch.float64) - torch.tensor(s_div["fp32"], dtype=torch.float64))
        worst = max(worst, float(diff.abs().max() / spread))
        assert s_div["bf16"] != s_div["fp32"]  # the pass did run in bf16
        # fp32: one backward pass (the step's forward pass carries the graph); bf16: its own forward pass too
        assert (extra["fp32"], extra["bf16"]) == (1, 2)
    assert worst <= 0.25


def test_bad_jacobian_precision_names_the_option():
    for bad in ("fp16", "bfloat16", None, 16):
        with pytest.raises(ValueError, match="jacobian_precision must be one of 'fp32', 'bf16'"):
            SteinStabilizer(jacobian_precision=bad)
    for div in ("jvp", "exact"):
        with pytest.raises(ValueError, match=f"jacobian_precision='bf16' is for the reverse-mode .* got divergence "
                                             f"'{div}'"):
            SteinStabilizer(divergence=div, jacobian_precision="bf16")
    with pytest.raises(ValueError, match="jacobian_precision"):
        make_stabilizer("stein-exact", load_model("gmm:toy2d"), jacobian_precision="bf16")


@pytest.mark.parametrize("opts", [{}, {"jacobian_batch": 3}, {"per_sample": True}, {"jacobian_precision": "bf16"},
                                  {"divergence": "jvp"}])
def test_a_step_reads_back_once(opts, read_backs):
    """The statistics, the check of the residual, the per-sample gamma's mean and the finiteness of the
    step's model outputs come back to the host in one read-back per step (on CUDA each read-back waits for
    the device; there were 6 to 8 before)."""
    net = _tiny_unet()
    sig = get_sigmas("karras", 4, VEProcess())
    x = prior_noise((6, 1, 8, 8), float(sig[0]), seed=0)
    stab = make_stabilizer("stein", None, probes=2, **opts)
    gen = steps(net, x, sig, "dpmpp_2m", stabilizer=stab)
    next(gen)  # the checks of the arguments read the schedule before the first step
    with read_backs() as r:
        n = sum(1 for _ in gen)
    assert n == 3 and r.count == n


def test_energy_matching_reads_back_once_per_step(read_backs):
    spec = load_model("gmm:toy2d")
    sig = get_sigmas("karras", 4, spec.process)
    x = prior_noise((10, 2), float(sig[0]), spec.process, seed=1, dtype=torch.float64)
    gen = steps(spec.denoiser, x, sig, "dpmpp_2m", stabilizer=make_stabilizer("stein-energy", spec, probes=2))
    next(gen)
    with read_backs() as r:
        n = sum(1 for _ in gen)
    assert n == 3 and r.count == n


REDUCED = [("stein", {}), ("stein-energy", {}), ("stein-sc", {}), ("stein", {"per_sample": True}),
           ("stein-energy", {"per_sample": True})]


@pytest.mark.parametrize("name,opts", REDUCED)
def test_batch_means_are_global_sums_over_the_global_count(name, opts):
    """The means of a step are the all-reduced sums divided by the all-reduced sample count: with ``reduce``
    summing three identical ranks (3 x every sum, the count too) every recorded mean, gamma and sample equals one
    process's; the first step's s_uu and s_xu are the batch means of u.u and u.x_c, u = x - T(x) (Euler, VE)."""
    spec = load_model("gmm:toy2d")
    sig = get_sigmas("karras", 4, spec.process)
    x = prior_noise((10, 2), float(sig[0]), spec.process, seed=1, dtype=torch.float64)
    one = run(spec, x, sig, "euler", name, **opts)
    three = run(spec, x, sig, "euler", name, reduce=lambda t: 3 * t, **opts)
    torch.testing.assert_close(three.x, one.x, rtol=1e-12, atol=1e-12)
    for a, b in zip(one.trace, three.trace):
        for k in ("gamma", "gamma_raw", *(k for k in a if k.startswith("s_"))):
            assert b[k] == pytest.approx(a[k], rel=1e-12, abs=1e-300), k
    s0, s1 = float(sig[0]), float(sig[1])
    with torch.no_grad():
        d = spec.denoiser(x, torch.full((10,), s0, dtype=torch.float64))
    u = x - (d + (s1 / s0) * (x - d))
    rec = one.trace[0]
    assert rec["s_uu"] == pytest.approx(float(u.pow(2).sum(1).mean()), rel=1e-12)
    assert rec["s_xu"] == pytest.approx(float((u * x).sum(1).mean()), rel=1e-12)
