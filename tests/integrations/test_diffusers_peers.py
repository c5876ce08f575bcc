"""benchmarks/diffusers_peers.py on a tiny configuration: diffusers' schedulers drive the mixture as a VP
epsilon network from the grid's noise, agree with steindiff's solvers on the same noise levels, steindiff's
calibrated sampler is fitted once per cell and applied with the plain solver's model passes, and the script
writes its JSON and Markdown."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("diffusers")

from steindiff.models import get_gmm  # noqa: E402
from steindiff.plan import SamplingPlan  # noqa: E402
from steindiff.sampling import prior_noise, sample  # noqa: E402


@pytest.fixture(scope="module")
def dp(load_benchmark):
    return load_benchmark("diffusers_peers")


def peer(dp, label):
    (p,) = [p for p in dp.peers() if p.label == label]
    return p


def test_peers_cover_the_issue_list(dp):
    labels = {p.label for p in dp.peers()}
    for s in ("DPMSolverMultistepScheduler/2M", "DPMSolverMultistepScheduler/3M", "UniPCMultistepScheduler",
              "EulerDiscreteScheduler"):
        assert {f"diffusers:{s}", f"diffusers:{s}-trailing", f"diffusers:{s}-karras"} <= labels
    assert {"diffusers:DDIMScheduler", "diffusers:DDIMScheduler-trailing"} <= labels
    assert not any("DDIM" in lab and "karras" in lab for lab in labels)


@pytest.mark.parametrize("label,solver,timestep", [
    ("diffusers:DDIMScheduler-trailing", "euler", "round"),
    ("diffusers:DPMSolverMultistepScheduler/2M-karras", "dpmpp_2m", "round"),
    ("diffusers:UniPCMultistepScheduler-trailing", "unipc", "round"),
])
def test_diffusers_loop_equals_steindiff_on_its_noise_levels(dp, label, solver, timestep):
    """The same solver over the noise levels diffusers visited, from the same noise, gives the same samples:
    the eps network, the VP <-> VE conversion and the noise convention are right."""
    gmm = get_gmm(dp.MODEL)
    process = dp.DiscreteVPProcess(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    noise_ve = prior_noise((64, gmm.dim), process.sigma_max, process, seed=0, dtype=torch.float64)
    latents = noise_ve / math.sqrt(1 + process.sigma_max**2)
    # the VP latents are the grid's standard normal draws of the seed
    torch.testing.assert_close(latents, prior_noise((64, gmm.dim), 80.0, seed=0, dtype=torch.float64) / 80.0)
    out = dp.run_diffusers(peer(dp, label), "scaled_linear", gmm, process, latents, 4)
    assert out["nfe"] == 4 and out["steps"] == 4 and out["sigmas"][-1] == 0.0
    den, _ = dp.vp_denoiser(gmm, process, timestep)
    sig = torch.tensor(out["sigmas"], dtype=torch.float64)
    x = sample(den, latents * math.sqrt(1 + float(sig[0]) ** 2), sig, solver).x
    rel = float((x - out["x"]).norm() / x.norm())
    assert rel < 1e-4, rel
    # and the noise levels matter: steindiff's log-SNR levels give other samples
    other = dp.run_plain(dp.Plain(solver, "logsnr"), gmm, process, noise_ve, 4)["x"]
    assert float((other - out["x"]).norm() / x.norm()) > 1e-3


def test_run_peers_rows_and_summary(dp):
    peers = [peer(dp, "diffusers:DDIMScheduler-trailing"), peer(dp, "diffusers:DPMSolverMultistepScheduler/2M-karras")]
    plains = [dp.Plain("euler", "karras"), dp.Plain("dpmpp_2m", "karras", "round")]
    res = dp.run_peers(nfes=[3], seeds=[0, 1], n=64, peer_list=peers, plain_list=plains, ref_steps=40,
                       calibrated=False, progress=False)
    assert res["schema"] == "steindiff.bench/1" and res["config"]["calibration"] is None
    rows = res["rows"]
    assert len(rows) == 2 * (1 + 4) and all(r["status"] == "ok" for r in rows)
    runs = [r for r in rows if r["framework"] != "reference"]
    assert all(r["nfe"] == 3 and r["nfe_budget"] == 3 for r in runs)
    assert {r["stabilizer"] for r in runs} == {"diffusers:DDIMScheduler-trailing",
                                               "diffusers:DPMSolverMultistepScheduler/2M-karras",
                                               "none", "none[t-round]"}
    for r in rows:
        assert {"sw2", "sw2_floor", "nll", "nll_floor", "mode_tv", "mode_tv_floor", "traj_err"} <= set(r["metrics"])
        assert all(math.isfinite(v) for v in r["metrics"].values())
    assert res["config"]["process"]["sigma_max"] == pytest.approx(14.6146, abs=1e-4)
    summ = dp.summarize(res)
    # diffusers' DPM-Solver++ 2M with Karras sigmas is steindiff's dpmpp_2m on them with rounded network time
    a = summ["cells"]["diffusers:DPMSolverMultistepScheduler/2M-karras"]["by_nfe"][3]["excess"]["sw2"]["mean"]
    b = summ["cells"]["steindiff dpmpp_2m karras t-round"]["by_nfe"][3]["excess"]["sw2"]["mean"]
    assert a == pytest.approx(b, abs=1e-5)
    assert set(summ["best"][3]) == {"diffusers", "steindiff"} and "calibration" not in summ
    md = dp.markdown(res, "python benchmarks/diffusers_peers.py --test")
    assert "Regenerate: `python benchmarks/diffusers_peers.py --test`" in md and "Not comparable" in md
    assert "| 3 | diffusers:" in md
    with pytest.raises(ValueError, match="unknown betas 'cosine'"):
        dp.run_peers(betas="cosine", nfes=[3], seeds=[0], n=8)


def test_calibrated_rows(dp):
    """One calibration per (solver, schedule, NFE), not per seed, on the calibration noise (seed 12345); every seed
    sampled with the fitted plan with the plain solver's model passes; the plan a row applies is the one its
    calibration chose, which is closer to the reference solve than the plain solver on the validation noise."""
    cal = {"n": 128, "ref_steps": 40, "max_solves": 20}
    nfe = 4  # at 3, with the last two steps plain, one gamma is left to fit
    plains = [dp.Plain("dpmpp_2m", "karras"), dp.Plain("dpmpp_2m", "karras", "round")]
    res = dp.run_peers(nfes=[nfe], seeds=[0, 1], n=64, peer_list=[peer(dp, "diffusers:DDIMScheduler-trailing")],
                       plain_list=plains, ref_steps=40, calibration=cal, progress=False)
    rows = res["rows"]
    assert all(r["status"] == "ok" for r in rows)
    plain = {r["seed"]: r for r in rows if r["stabilizer"] == "none"}
    calr = {r["seed"]: r for r in rows if r["stabilizer"] == dp.CALIBRATED}
    assert len(calr) == 2 and len(rows) == 2 * (1 + 1 + 2 + 1)  # no calibrated row for the t-round configuration
    for seed, r in calr.items():
        assert (r["framework"], r["solver"], r["schedule"], r["nfe_budget"]) == ("steindiff", "dpmpp_2m", "karras", nfe)
        assert r["nfe"] == plain[seed]["nfe"] == nfe
        assert r["calibration"] == calr[0]["calibration"] and r["sigmas"] == calr[0]["sigmas"]  # fitted once
    c = calr[0]["calibration"]
    assert (c["seed"], c["n"], c["solves"]) == (12345, 128, 20) and c["chosen"] != "plain" and c["val_ratio"] < 1
    assert res["config"]["calibration"]["max_seconds"] == dp.CAL_MAX_SECONDS
    # the calibration's validation distance again, from the row's own plan and the calibration noise
    gmm = get_gmm(dp.MODEL)
    process = dp.DiscreteVPProcess(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    ref = dp._calibration_reference(dp.vp_spec(gmm, process, "x"), {"n": 128, "seed": 12345, "ref_steps": 40})
    noise = prior_noise((128, gmm.dim), process.sigma_max, process, seed=12345, dtype=torch.float64)[64:]
    target = ref.final[64:]
    row_plan = SamplingPlan("dpmpp_2m", torch.tensor(calr[0]["sigmas"]), gammas=calr[0]["calibrated_gammas"])
    rms_cal = float((dp.run_plan(row_plan, gmm, process, noise)["x"] - target).pow(2).mean().sqrt())
    rms_plain = float((dp.run_plain(plains[0], gmm, process, noise, nfe)["x"] - target).pow(2).mean().sqrt())
    assert rms_cal == pytest.approx(c["val_rms"][c["chosen"]], rel=1e-6)
    assert rms_plain == pytest.approx(c["val_rms"]["plain"], rel=1e-6) and rms_cal < rms_plain
    # on the evaluation seeds too the calibrated samples are closer to the reference solve than the plain ones
    assert all(calr[k]["metrics"]["traj_err"] < plain[k]["metrics"]["traj_err"] for k in calr)
    summ = dp.summarize(res)
    assert summ["best"][nfe]["calibrated"]["label"] == "steindiff dpmpp_2m karras cal:trajectory"
    assert summ["best"][nfe]["calibrated"]["below_diffusers"][1] == 2
    assert summ["calibration"]["cells"] == 1 and summ["calibration"]["chosen"] == {c["chosen"]: 1}
    assert summ["calibration"]["traj_err_ratio"]["max"] < 1 and summ["calibration"]["solves"]["max"] == 20
    md = dp.markdown(res, "python benchmarks/diffusers_peers.py --test")
    assert f"| {nfe} | diffusers:DDIMScheduler-trailing | " in md
    assert " | steindiff dpmpp_2m karras cal:trajectory | " in md
    assert "**The calibrations** (1 cells" in md and "seed 12345" in md


def test_script_writes_json_and_markdown(dp, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        dp.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--json-out" in out and "--no-calibrated" in out
    j, m = tmp_path / "p.json", tmp_path / "p.md"
    assert dp.main(["--n", "16", "--nfe", "3", "--seeds", "0", "--ref-steps", "10", "--betas", "linear",
                    "--no-calibrated", "--no-progress", "--json-out", str(j), "--markdown", str(m)]) == 0
    res = json.loads(j.read_text())
    assert res["config"]["process"]["betas"] == "linear" and res["config"]["process"]["sigma_max"] > 150
    assert res["config"]["command"].startswith("python benchmarks/diffusers_peers.py --n 16")
    assert len(res["rows"]) == 1 + len(dp.peers()) + len(dp.plains())  # --no-calibrated: no cal:trajectory rows
    assert res["config"]["command"] in m.read_text()
    # the Markdown again from the saved results, without running
    m2 = tmp_path / "again.md"
    assert dp.main(["--from-json", str(j), "--markdown", str(m2)]) == 0
    assert m2.read_text() == m.read_text()
    assert dp.main(["--from-json", str(tmp_path / "missing.json")]) == 2
    assert dp.main(["--n", "1", "--no-progress"]) == 2
