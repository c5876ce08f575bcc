"""Benchmark grid on the shipped patches U-Net: the patch metrics with their floors, patch_fd as the primary metric."""

import math

import pytest
import torch

from steindiff.bench import markdown, primary_metric, run_grid, summarize
from steindiff.bench.runner import excess
from steindiff.metrics.patches import PATCH_METRICS
from steindiff.models.registry import load_model


@pytest.fixture(scope="module")
def result():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # a 4-step trajectory reference: the grid's bookkeeping, not its accuracy, is tested here
        return run_grid(["patches"], ["euler"], [3], ["karras"], ["ve"], ["none", "stein-energy"], [0], 16,
                        probes=1, progress=False, ref_steps=4)
    finally:
        torch.set_num_threads(threads)


def test_patches_rows_carry_the_patch_metrics_and_their_floors(result):
    for r in result["rows"]:
        assert r["status"] == "ok", r["status"]
        m = r["metrics"]
        for name in PATCH_METRICS:
            assert math.isfinite(m[name]) and math.isfinite(m[f"{name}_floor"])
        assert len(m["spectrum_bands"]) == 8 and m["n"] == 16 and m["n_heldout"] > 1000 and m["traj_err"] > 0
        assert "digits_fid" not in m and "sw2" not in m


def test_patches_summary_and_report_use_patch_fd(result):
    assert primary_metric(result["rows"]) == "patch_fd" == primary_metric(load_model("patches"))
    s = summarize(result)
    assert s["primary"] == {"patches": "patch_fd"}
    (best,) = s["best_vanilla"]
    none = result["rows"][0]["metrics"]
    assert best["excess_patch_fd"]["mean"] == pytest.approx(none["patch_fd"] - none["patch_fd_floor"])
    assert excess(none, "spectrum") == pytest.approx(none["spectrum"] - none["spectrum_floor"])
    cell = next(c for c in s["cells"] if c["stabilizer"] == "stein-energy")
    assert set(cell["verdicts"]) >= {"patch_fd", "spectrum", "pixel_sw2", "traj_err"}
    text = markdown(result, s)
    assert "### excess patch-FD" in text and "### excess spectrum distance" in text and "patch-FD use" in text
