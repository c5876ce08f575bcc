"""Per-step contractivity record: closed forms on a linear denoiser, coordinates, bounds, the
stabilized operator, agreement with the sampler's trajectory, the PNG."""

import math

import pytest
import torch

from steindiff import VEProcess
from steindiff.diagnostics import diagnose, plot_diagnosis, summarize
from steindiff.generate import generate
from steindiff.models.registry import ModelSpec, load_model
from steindiff.stabilizers import SteinStabilizer

S2 = torch.tensor([2.0, 0.5, 0.1, 0.02], dtype=torch.float64)


def gauss_denoiser(x, sigma):
    s = sigma.to(torch.float64).reshape(-1, 1)
    return (S2 / (S2 + s**2) * x.to(torch.float64)).to(x.dtype)


@pytest.fixture(scope="module")
def gauss():
    return ModelSpec(name="gauss4", denoiser=gauss_denoiser, process=VEProcess(0.002, 80.0), sample_shape=(4,))


def euler_factor(s, t):
    return float((t / s + (1 - t / s) * S2 / (S2 + s**2)).max())


SIG = [20.0, 3.0, 0.8, 0.1, 0.0]


def test_euler_linear_closed_form_bounds_and_vp(gauss):
    r = diagnose(gauss, "euler", sigmas=SIG, n=6, iters=8)
    assert r["schema"] == "steindiff.diagnose/1" and r["config"]["steps"] == 4 and r["passes"]["nfe"] == 4
    for rec in r["steps"]:
        s, t = rec["sigma"], rec["sigma_next"]
        L = rec["per_sample"]["lipschitz"]
        torch.testing.assert_close(L, torch.full_like(L, euler_factor(s, t)), rtol=1e-6, atol=0)
        LD = rec["per_sample"]["lipschitz_D"]
        torch.testing.assert_close(LD, torch.full_like(LD, float((S2 / (S2 + s**2)).max())), rtol=1e-6, atol=0)
        # the first-order bound is attained by Euler on a linear denoiser
        assert rec["bound_first_order"]["median"] == pytest.approx(euler_factor(s, t), rel=1e-6)
        assert rec["frac_above_first_order_bound"] == 0.0
        if t > 0:
            h = math.log(s / t)
            assert rec["h"] == pytest.approx(h)
            torch.testing.assert_close(rec["per_sample"]["bound"], t / s + t * h * LD)
        else:
            assert rec["h"] is None and rec["bound"] is None and rec["frac_above_bound"] is None
        assert rec["lipschitz"]["frac_gt_1"] == float(euler_factor(s, t) > 1)
        q = rec["lipschitz"]
        assert q["min"] <= q["q05"] <= q["q25"] <= q["median"] <= q["q75"] <= q["q95"] <= q["max"]
    # VP coordinates: a linear change of coordinates, L_vp = L_ve * alpha_t / alpha_s
    v = diagnose(gauss, "euler", sigmas=SIG, n=6, iters=8, coords="vp")
    for a, b in zip(r["steps"], v["steps"]):
        ratio = math.sqrt(1 + a["sigma"] ** 2) / math.sqrt(1 + a["sigma_next"] ** 2)
        assert b["lipschitz"]["median"] == pytest.approx(a["lipschitz"]["median"] * ratio, rel=1e-6)
        assert b["lipschitz_D"]["median"] == pytest.approx(a["lipschitz_D"]["median"] * math.sqrt(1 + a["sigma"] ** 2),
                                                           rel=1e-6)
        assert b["bound_first_order"]["median"] == pytest.approx(b["lipschitz"]["median"], rel=1e-6)
    prod = math.prod(euler_factor(s, t) for s, t in zip(SIG[:-1], SIG[1:]))
    assert r["summary"]["trajectory_amplification"]["median"] == pytest.approx(prod, rel=1e-5)


@pytest.mark.parametrize("gamma", [1.0, 0.5])
def test_stabilized_operator(gauss, gamma):
    """gamma clipped to a constant: S = (1-gamma) x + gamma T in VE, so L_S = (1-gamma) + gamma L_T
    for the linear Euler step (all factors positive); gamma = 1 leaves L unchanged."""
    stab = SteinStabilizer("stein", gamma_min=gamma, gamma_max=gamma, probes=1)
    r = diagnose(gauss, "euler", sigmas=SIG, n=6, iters=8, stabilizer=stab)
    for rec in r["steps"]:
        assert rec["gamma"] == gamma
        expected = (1 - gamma) + gamma * rec["lipschitz"]["median"]
        assert rec["lipschitz_stabilized"]["median"] == pytest.approx(expected, rel=1e-6)
    assert r["summary"]["gammas"] == [gamma] * 4
    assert r["passes"]["stabilizer_extra_passes"] > 0 and r["passes"]["nfe"] == 4


def test_same_trajectory_and_nfe_as_generate():
    """The diagnostics run the sampler exactly: same final samples and NFE as generate(),
    with and without a stabilizer; Lipschitz passes are counted apart."""
    spec = load_model("gmm:toy2d")
    for solver, stab in (("heun", None), ("dpmpp_2m", "stein-tr")):
        r = diagnose(spec, solver, 5, n=8, seed=3, iters=3, stabilizer=stab)
        kw = {}
        if stab:
            from steindiff.stabilizers import make_stabilizer
            kw["stabilizer"] = make_stabilizer(stab, spec, coords="ve", seed=3)
        g = generate(spec, solver=solver, nfe=5, n=8, seed=3, **kw)
        assert torch.equal(r["x"], g.x)
        assert r["passes"]["nfe"] == g.nfe == 5
        assert r["config"]["sigmas"] == [float(s) for s in g.sigmas]
        assert r["passes"]["jvp"] == r["passes"]["vjp"] > 0
        assert all(len(rec["per_sample"]["lipschitz"]) == 8 for rec in r["steps"])


def test_batch_size_chunks_and_summary(tmp_path):
    spec = load_model("gmm:toy2d")
    a = diagnose(spec, "dpmpp_2m", 4, n=10, iters=4)
    b = diagnose(spec, "dpmpp_2m", 4, n=10, iters=4, batch_size=3)
    for ra, rb in zip(a["steps"], b["steps"]):
        torch.testing.assert_close(ra["per_sample"]["lipschitz"], rb["per_sample"]["lipschitz"], rtol=1e-6, atol=1e-9)
    s = summarize(a)
    assert "per_sample" not in s and "x" not in s and all("per_sample" not in r for r in s["steps"])
    assert s["summary"]["median_per_step"] == [r["lipschitz"]["median"] for r in a["steps"]]
    png = tmp_path / "diag.png"
    plot_diagnosis(a, str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["diag.png"]  # nothing else left behind


def test_errors(gauss):
    with pytest.raises(ValueError, match="coords"):
        diagnose(gauss, "euler", sigmas=SIG, n=4, coords="xy")
    with pytest.raises(ValueError, match="per-sample"):
        diagnose(gauss, "euler", sigmas=SIG, n=4, stabilizer=SteinStabilizer("stein", per_sample=True))
    with pytest.raises(ValueError, match="solver"):
        diagnose(gauss, "nope", 4, n=4)
    with pytest.raises(ValueError, match="n must"):
        diagnose(gauss, "euler", sigmas=SIG, n=0)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                                      reason="no CUDA device"))])
def test_diagnose_on_a_device(device):
    cpu = diagnose(load_model("gmm:toy2d"), "dpmpp_2m", 4, n=6, seed=1, iters=3, stabilizer="stein", device="cpu")
    r = diagnose(load_model("gmm:toy2d").to(device), "dpmpp_2m", 4, n=6, seed=1, iters=3, stabilizer="stein")
    assert r["x"].device.type == device
    torch.testing.assert_close(r["x"].cpu(), cpu["x"], rtol=1e-5, atol=1e-6)
    assert r["summary"]["gammas"] == pytest.approx(cpu["summary"]["gammas"], rel=1e-5)
