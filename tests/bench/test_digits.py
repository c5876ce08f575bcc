"""Benchmark grid on the digits U-Net: same schema, image metrics, digits_fid as the primary metric."""

import math

import pytest
import torch

from steindiff.bench import markdown, primary_metric, run_grid, summarize, validate_grid
from steindiff.bench.runner import DIGITS_METRICS, SCHEMA, excess
from steindiff.models.registry import load_model

pytestmark = pytest.mark.skipif(load_model("digits").info.get("heldout") is None,
                                reason="digits training data not available for the held-out images")


@pytest.fixture(scope="module")
def result():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the small U-Net is fastest on one thread on a shared CPU
    try:
        return run_grid(["digits"], ["euler"], [3], ["karras"], ["ve"], ["none", "stein-energy"], [0], 64,
                        progress=False, ref_steps=1000 + 8)
    finally:
        torch.set_num_threads(threads)


def test_digits_rows_have_schema_fields_and_image_metrics(result):
    assert result["schema"] == SCHEMA
    assert result["machine"]["dtype"] == "float32"
    # the requested steps are recorded; image models use at most 100
    assert result["config"]["reference"] == {"solver": "dpmpp_3m", "steps": 1008, "schedule": "karras",
                                             "image_model_steps": 100}
    rows = result["rows"]
    assert [(r["stabilizer"], r["coords"]) for r in rows] == [("none", "-"), ("stein-energy", "ve")]
    for r in rows:
        assert r["status"] == "ok", r["status"]
        assert r["model"] == "digits" and r["nfe"] == 3 and r["nfe_budget"] == 3 and r["steps"] == 3
        assert isinstance(r["wall_s_per_sample"], float) and r["wall_s_per_sample"] > 0
        assert len(r["gammas"]) == r["steps"]
        m = r["metrics"]
        for name in DIGITS_METRICS:
            assert math.isfinite(m[name]) and math.isfinite(m[f"{name}_floor"])
        assert m["traj_err"] > 0 and m["n"] == 64
        assert "sw2" not in m
    assert rows[0]["gammas"] == [1.0] * 3 and rows[0]["extra_passes"] == 0


def test_digits_summary_uses_digits_fid(result):
    assert primary_metric(result["rows"]) == "digits_fid" == primary_metric(load_model("digits"))
    assert primary_metric(load_model("gmm:toy2d")) == "sw2"
    s = summarize(result)
    assert s["primary"] == {"digits": "digits_fid"}
    (best,) = s["best_vanilla"]
    assert best["metric"] == "digits_fid" and best["solver"] == "euler"
    none = result["rows"][0]["metrics"]
    assert best["excess_digits_fid"]["mean"] == pytest.approx(none["digits_fid"] - none["digits_fid_floor"])
    assert excess(none, "recall") == pytest.approx(none["recall_floor"] - none["recall"])
    cell = next(c for c in s["cells"] if c["stabilizer"] == "stein-energy")
    assert set(cell["verdicts"]) >= {"digits_fid", "traj_err", "recall"}
    assert cell["vs_best_vanilla"]["solver"] == "euler"
    assert "digits_fid" in s["counts"]["digits"]["stein-energy/ve"]
    text = markdown(result, s)
    assert "excess digits-FID" in text and "float32 states" in text and "100 Karras steps" in text
    assert "sliced-W2" not in text


@pytest.mark.parametrize("stab", ["stein-oracle", "stein-exact"])
def test_digits_rejects_stabilizers_that_need_a_mixture(stab):
    with pytest.raises(ValueError, match="needs an exact-score mixture"):
        validate_grid(["digits"], ["euler"], [3], ["karras"], ["ve"], ["none", stab], [0], 64)
