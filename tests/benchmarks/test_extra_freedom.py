"""benchmarks/extra_freedom.py: the added per-step parameters start at the base plan (zero change), each
kind fits and reports validation ratios; bad input is refused."""

import json
import math

import pytest
import torch

from steindiff.models.registry import load_model
from steindiff.plan import make_plan
from steindiff.sampling import prior_noise, sample


@pytest.fixture(scope="module")
def ef(load_benchmark):
    return load_benchmark("extra_freedom")


def test_zero_extra_parameters_are_the_plain_solver(ef):
    """beta = 0 and delta = 0 leave the plain solve unchanged; a non-zero beta or shift changes it."""
    spec = load_model("gmm:toy2d")
    plan = make_plan(spec.process, "dpmpp_2m", 4, "karras")
    x = prior_noise((32, 2), 80.0, seed=0, dtype=torch.float64)
    sig = [float(s) for s in plan.sigmas]
    plain = sample(spec.denoiser, x, plan.sigmas, "dpmpp_2m").x
    same = ef.solve(spec.denoiser, x, "dpmpp_2m", plan.sigmas, [1.0] * 4, [0.0] * 4, [0.0] * 4)
    assert torch.allclose(same, plain, rtol=1e-12, atol=1e-12)  # x - 1 (x - T(x)): T(x) up to rounding
    moved_beta = ef.solve(spec.denoiser, x, "dpmpp_2m", plan.sigmas, [1.0] * 4, [0.0, 0.5, 0.0, 0.0], None)
    moved_shift = ef.solve(spec.denoiser, x, "dpmpp_2m", plan.sigmas, [1.0] * 4, [0.0] * 4, [0.0, 0.2, 0.0, 0.0])
    assert not torch.allclose(moved_beta, plain) and not torch.allclose(moved_shift, plain)
    # the shift is exact at the levels and the model sees sigma e^delta there
    seen = []
    wrapped = ef.shifted_model(lambda x, s: seen.append(s.clone()) or x, sig, [0.1, 0.2, -0.1, 0.0])
    wrapped(x[:2], torch.full((2,), sig[1], dtype=torch.float64))
    assert seen[0][0].item() == pytest.approx(sig[1] * math.exp(0.2), rel=1e-12)


def test_each_kind_fits_and_reports(ef, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert ef.main(["--model", "gmm:toy2d", "--cells", "euler:karras:4", "--max-solves", "15",
                    "--json-out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["kind"] for r in rows] == list(ef.KINDS)
    assert rows[0]["params"] < rows[1]["params"] and rows[0]["params"] < rows[2]["params"]
    for r in rows:
        assert r["solves"] <= 15 and r["val_rms_ratio"] > 0 and r["val_median_ratio"] > 0
        assert math.isfinite(r["fit_rms_ratio"]) and r["fit_rms_ratio"] > 0
    assert "validation RMS" in capsys.readouterr().out


def test_bad_input_is_refused(ef, capsys):
    assert ef.main(["--cells", "euler:karras"]) == 2
    assert "solver:schedule:nfe" in capsys.readouterr().err
    assert ef.main(["--cells", "euler:karras:4", "--kinds", "magic"]) == 2
    assert "unknown kind(s) magic" in capsys.readouterr().err
    assert ef.main(["--model", "gmm:toy2d", "--cells", "euler:karras:4", "--eval-seeds", "1"]) == 2
    assert "--eval-seeds is for image models" in capsys.readouterr().err
