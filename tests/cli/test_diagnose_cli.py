"""``steindiff diagnose``: JSON summary and full record, PNG, text output, usage errors (exit 2, no files)."""

import json

import pytest

from steindiff.cli import main

BASE = ["diagnose", "--model", "gmm:toy2d", "--solver", "dpmpp_2m", "--nfe", "4", "--n", "12", "--iters", "5",
        "--no-progress"]


def test_json_png_and_full_record(tmp_path, capsys):
    png, out = tmp_path / "d.png", tmp_path / "d.json"
    rc = main(BASE + ["--png", str(png), "--out", str(out), "--json"])
    assert rc == 0
    s = json.loads(capsys.readouterr().out)
    assert s["config"]["model"] == "gmm:toy2d" and s["config"]["solver"] == "dpmpp_2m" and s["config"]["n"] == 12
    assert s["passes"]["nfe"] == 4 and s["passes"]["jvp"] > 0
    assert len(s["steps"]) == 4 and s["png"] == str(png) and s["out"] == str(out)
    for r in s["steps"]:
        assert {"sigma", "sigma_next", "h", "lipschitz", "lipschitz_D", "bound", "bound_first_order",
                "convergence"} <= set(r)
        assert {"q05", "q25", "median", "q75", "q95", "max", "frac_gt_1"} <= set(r["lipschitz"])
        assert "per_sample" not in r
    assert s["steps"][-1]["bound"] is None and s["steps"][-1]["h"] is None
    assert {"median_per_step", "max_per_step", "frac_gt_1_per_step", "peak_median",
            "trajectory_amplification"} <= set(s["summary"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    full = json.loads(out.read_text())
    assert full["schema"] == "steindiff.diagnose/1" and "definitions" in full and "x" not in full
    assert all(len(r["per_sample"]["lipschitz"]) == 12 for r in full["steps"])
    assert [r["lipschitz"]["median"] for r in full["steps"]] == s["summary"]["median_per_step"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.json", "d.png"]


def test_text_output_with_stabilizer_and_vp(capsys):
    rc = main(BASE + ["--stabilizer", "stein-tr", "--coords", "vp", "--method", "power", "--batch-size", "5"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "peak median L" in text and "VP coords" in text and "gamma" in text and "power x5" in text


@pytest.mark.parametrize("extra", [
    ["--solver", "nope"], ["--schedule", "nope"], ["--nfe", "0"], ["--n", "0"], ["--iters", "0"],
    ["--batch-size", "0"], ["--model", "gmm:nope"], ["--stabilizer", "nope"], ["--coords", "xy"],
    ["--method", "svd"],
])
def test_usage_errors_exit_2_and_leave_no_file(tmp_path, extra, capsys):
    png, out = tmp_path / "d.png", tmp_path / "d.json"
    argv = BASE + ["--png", str(png), "--out", str(out)] + extra
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse rejects bad choices itself, with exit code 2
        rc = e.code
    assert rc == 2
    assert "error" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output_and_same_path(tmp_path, capsys):
    assert main(BASE + ["--png", str(tmp_path / "missing" / "d.png")]) == 2
    assert main(BASE + ["--png", str(tmp_path / "a"), "--out", str(tmp_path / "a")]) == 2
    assert main(BASE + ["--out", str(tmp_path)]) == 2  # a directory
    assert list(tmp_path.iterdir()) == []
