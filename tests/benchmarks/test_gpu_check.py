"""benchmarks/gpu_check.py in its CPU quick mode: every part runs and reports; the target rule."""

import json

import pytest


@pytest.fixture(scope="module")
def gpu_check(load_benchmark):
    return load_benchmark("gpu_check")


def test_quick_cpu_run(gpu_check, tmp_path, capsys):
    out = tmp_path / "g.json"
    assert gpu_check.main(["--device", "cpu", "--quick", "--out", str(out), "--out-dir", str(tmp_path)]) == 0
    printed = json.loads(capsys.readouterr().out)
    r = json.loads(out.read_text())
    assert r == printed and r["schema"] == "steindiff.gpu-check/1"
    assert json.loads((tmp_path / "gpu-check-cpu.json").read_text())["schema"] == r["schema"]
    assert r["environment"]["device"] == "cpu" and r["environment"]["torch"]
    # quick: digits only in the agreement and the commands
    assert [t["model"] for t in r["timing"]][1:] == ["gmm:image64"] and r["timing"][0]["model"].startswith("unet")
    assert [a["model"] for a in r["agreement"]] == [r["timing"][0]["model"], "gmm:image64", "digits"]
    for t in r["timing"]:
        names = [row["variant"] for row in t["rows"]]
        assert {"plain", "calibrated", "stein_vjp_p1", "stein_vjp_p5", "stein_jvp_p1", "stein-tr", "stein-energy",
                "stein-sc"} <= set(names)
        for row in t["rows"]:
            assert row["status"] == "ok", row
            assert row["median_s"] > 0 and row["time_ratio"] > 0 and row["mem_ratio"] is None and row["finite"]
    unet_rows = [row["variant"] for row in r["timing"][0]["rows"]]
    assert {"stein_vjp_p1_jb2", "stein_vjp_p1_bf16", "stein_vjp_p1_bf16_jb2"} <= set(unet_rows)
    assert {"stein_vjp_p1_bf16", "stein_vjp_p1_bf16_jb2"} <= {row["variant"] for row in r["targets"]["rows"]}
    bf16 = next(row for row in r["timing"][0]["rows"] if row["variant"] == "stein_vjp_p1_bf16")
    assert bf16["extra_passes"] == 2 * bf16["nfe"]  # its own forward pass and one backward per model pass
    assert all(a["all_agree"] for a in r["agreement"]) and r["summary"]["agreement_ok"]
    assert all(c["ok"] for c in r["commands"]) and r["summary"]["commands_ok"]
    assert {c["argv"].split()[0] for c in r["commands"]} == {"sample", "train", "sample-dist", "merge"}
    assert r["targets"]["rows"] and r["summary"]["target_met"] is False  # no memory measured on the CPU


def test_targets_rule(gpu_check):
    rows = [{"variant": "plain", "time_ratio": 1.0, "mem_ratio": 1.0},
            {"variant": "stein_vjp_p1", "time_ratio": 2.3, "mem_ratio": 5.9},
            {"variant": "stein_vjp_p1_jb16", "time_ratio": 2.45, "mem_ratio": 2.2},
            {"variant": "stein_vjp_p1_jb8", "time_ratio": 2.7, "mem_ratio": 1.6},
            {"variant": "stein_vjp_p5", "time_ratio": 8.0, "mem_ratio": 9.0}]
    t = gpu_check.targets([{"model": "gmm:image64", "rows": []}, {"model": "unet-34.4M", "batch": 64, "rows": rows}])
    assert [r["variant"] for r in t["rows"]] == ["stein_vjp_p1", "stein_vjp_p1_jb16", "stein_vjp_p1_jb8"]
    assert t["met_by"] == ["stein_vjp_p1_jb16"] and t["model"] == "unet-34.4M"


def test_bad_device_exits_2(gpu_check, capsys):
    assert gpu_check.main(["--device", "tpu", "--quick"]) == 2
    assert "unknown device" in capsys.readouterr().err
