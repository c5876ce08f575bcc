"""benchmarks/distance_breakdown.py: re-sampling a committed calibrated grid reproduces its trajectory errors,
and the per-sample split is what it says."""

import json

import pytest
import torch

from steindiff.cli import main as cli_main


@pytest.fixture(scope="module")
def breakdown(load_benchmark):
    return load_benchmark("distance_breakdown")


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    j = tmp_path_factory.mktemp("grid") / "r.json"
    assert cli_main(["bench", "--model", "gmm:toy2d", "--solvers", "euler", "--nfe", "3", "--schedules", "karras",
                     "--coords", "ve", "--stabilizers", "none,cal:trajectory", "--seeds", "0", "--n", "64",
                     "--ref-steps", "20", "--calibration-solves", "6", "--no-progress", "--json-out", str(j)]) == 0
    return j


def test_split_of_per_sample_distances(breakdown):
    d = torch.tensor([1.0] * 19 + [10.0], dtype=torch.float64)
    b = breakdown.breakdown(d)
    assert b["median"] == 1.0 and b["rms"] == pytest.approx((119 / 20) ** 0.5)
    assert b["top5_share"] == pytest.approx(100 / 119)  # one sample in twenty is the farthest 5%
    x, ref = torch.zeros(2, 3, 2), torch.ones(2, 3, 2)
    assert breakdown.per_sample(x, ref).tolist() == [1.0, 1.0]


def test_resampled_grid_reproduces_the_bench_trajectory_errors(breakdown, grid, tmp_path):
    out = tmp_path / "b.json"
    assert breakdown.main([str(grid), "--no-progress", "--json-out", str(out)]) == 0
    res = json.loads(out.read_text())
    rows = json.loads(grid.read_text())["rows"]
    (cell,) = res["cells"]
    plain_row = next(r for r in rows if r["stabilizer"] == "none")
    cal_row = next(r for r in rows if r["stabilizer"] == "cal:trajectory")
    assert cell["plain"]["rms"] == pytest.approx(plain_row["metrics"]["traj_err"], rel=1e-9)
    assert cell["calibrated"]["rms"] == pytest.approx(cal_row["metrics"]["traj_err"], rel=1e-9)
    assert cell["ratio"]["rms"] == pytest.approx(cell["calibrated"]["rms"] / cell["plain"]["rms"])
    assert 0.0 <= cell["plain"]["switched"] <= 1.0 and 0.0 < cell["plain"]["top5_share"] <= 1.0
    summary = res["summary"]["gmm:toy2d"]
    assert summary["rms_reproduces_bench"] < 1e-9 and summary["median_ratio_median"] == cell["ratio"]["median"]


def test_bad_input_is_refused(breakdown, grid, tmp_path, capsys):
    assert breakdown.main([str(tmp_path / "missing.json")]) == 2
    assert "missing.json" in capsys.readouterr().err
    obj = json.loads(grid.read_text())
    obj["rows"] = [r for r in obj["rows"] if r["stabilizer"] == "none"]
    (tmp_path / "plain.json").write_text(json.dumps(obj))
    assert breakdown.main([str(tmp_path / "plain.json")]) == 2
    assert "has no cal:trajectory rows" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{")
    assert breakdown.main([str(tmp_path / "bad.json")]) == 2
