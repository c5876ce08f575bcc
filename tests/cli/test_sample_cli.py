"""``steindiff sample``: JSON summary, outputs, exit codes, nothing half-written."""

import json
import os

import numpy as np
import pytest
import torch

from steindiff.cli import main
from steindiff.models.registry import ModelSpec, register_model_loader
from steindiff.noise import VEProcess


def _nan_model(x, sigma):
    out = torch.zeros_like(x)
    if float(sigma[0]) < 1.0:  # fails mid-run, after some steps succeeded
        out[0, 0] = float("nan")
    return out


register_model_loader(lambda name: name == "test:nan-late",
                      lambda name: ModelSpec(name, _nan_model, VEProcess(0.002, 80.0), (3,)))


def test_sample_json_summary_and_npz(tmp_path, capsys):
    out = tmp_path / "s.npz"
    assert main(["sample", "--model", "gmm:image64", "--solver", "dpmpp_2m", "--nfe", "10", "--schedule", "karras",
                 "--n", "300", "--seed", "0", "--out", str(out), "--json", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["nfe"] == 10 and summary["extra_passes"] == 0 and len(summary["sigmas"]) == 11
    m = summary["metrics"]
    assert set(m) >= {"sw2", "sw2_floor", "mode_tv", "nll"} and 0 < m["sw2_floor"] < 0.5 and 0 < m["sw2"] < 0.5
    data = np.load(out)
    assert data["samples"].shape == (300, 64) and np.isfinite(data["samples"]).all()


def test_same_seed_same_samples(tmp_path):
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    for p in (a, b):
        assert main(["sample", "--model", "gmm:toy2d", "--nfe", "4", "--n", "50", "--seed", "7", "--out", str(p),
                     "--no-progress"]) == 0
    assert np.array_equal(np.load(a)["samples"], np.load(b)["samples"])


@pytest.mark.parametrize("args,needle", [
    (["--solver", "eulr"], "unknown solver 'eulr'"),
    (["--schedule", "cosine"], "unknown schedule 'cosine'"),
    (["--model", "gmm:nope"], "unknown mixture preset"),
    (["--nfe", "0"], "--nfe must be >= 1"),
    (["--stabilizer", "stien"], "unknown stabilizer 'stien'"),
    (["--stabilizer", "stein-oracle", "--model", "test:nan-late"], "needs an exact-score mixture"),
])
def test_usage_errors_exit_2(args, needle, tmp_path, capsys):
    out = tmp_path / "s.npz"
    assert main(["sample", "--n", "10", "--out", str(out), "--no-progress", *args]) == 2
    assert needle in capsys.readouterr().err
    assert not out.exists()


def test_unwritable_output_is_a_usage_error(tmp_path, capsys):
    assert main(["sample", "--n", "10", "--out", str(tmp_path / "missing" / "s.npz"), "--no-progress"]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_an_output_folder_that_refuses_new_files_exits_2_before_sampling(capsys, monkeypatch):
    """/proc passes a permission check (as root) but creates no file: found before any work, named as given."""
    import steindiff.cli.sample as cli_sample

    monkeypatch.setattr(cli_sample, "generate", lambda *a, **k: pytest.fail("sampled before checking --out"))
    assert main(["sample", "--n", "10", "--out", "/proc/s.npz", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("steindiff sample: error: cannot write '/proc/s.npz'") and ".s.npz." not in err


def test_gammas_out_of_range_warn_in_one_line(tmp_path, capsys):
    """The paper's literal estimate on an exact mixture: gammas in the hundreds and near 0, exit 0, one warning
    line on stderr naming the range and what it means (also in the JSON summary); the plain solver: none."""
    args = ["sample", "--model", "gmm:toy2d", "--n", "64", "--nfe", "6", "--no-progress", "--json"]
    assert main([*args, "--stabilizer", "stein", "--probes", "2"]) == 0
    out, err = capsys.readouterr()
    summary = json.loads(out)
    assert any(not 0.1 <= g <= 10 for g in summary["gammas"])
    line = err.strip()
    assert len(line.splitlines()) == 1 and line.startswith("steindiff sample: warning: gamma left [0.1, 10]")
    assert "collapses samples" in line and summary["warnings"] == [line.removeprefix("steindiff sample: ")]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert err == "" and "warnings" not in json.loads(out)


def test_gamma_warning_bounds():
    from steindiff.cli.common import gamma_warning

    assert gamma_warning([1.0, 0.1, 10.0, 0.5]) is None
    assert "at 2 of 3 steps (0.05 at step 1, nan at step 3)" in gamma_warning([0.05, 1.0, float("nan")])


def test_runtime_failure_names_step_and_leaves_no_file(tmp_path, capsys):
    out = tmp_path / "s.npz"
    assert main(["sample", "--model", "test:nan-late", "--solver", "euler", "--nfe", "6", "--n", "4",
                 "--out", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert "NaN or Inf at step" in err and "sigma=" in err and len(err.splitlines()) == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_patches_model_samples_an_rgb_grid(tmp_path, capsys):
    from PIL import Image

    grid = tmp_path / "g.png"
    assert main(["sample", "--model", "patches", "--solver", "euler", "--nfe", "2", "--n", "3", "--grid", str(grid),
                 "--no-progress", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == "patches"
    with Image.open(grid) as img:  # 3 patches of 32x32 in a row, 1-pixel gaps
        assert img.mode == "RGB" and img.size == (3 * 33 + 1, 34)


@pytest.mark.parametrize("model,config,n", [("digits", ("dpmpp_2m", "karras", 10), []),
                                            ("patches", ("dpmpp_2m", "logsnr", 8), ["--n", "2"])])  # a test's budget
def test_shipped_models_auto_with_default_flags_uses_a_shipped_calibration(model, config, n, capsys, monkeypatch):
    """`steindiff sample --model NAME --stabilizer auto`, nothing else: the model's own solver, schedule, NFE (which
    ship a calibration, so nothing is estimated or fitted) and number of samples (64: seconds, not minutes)."""
    import steindiff.calibration as cal
    import steindiff.stabilizers.registry as reg

    monkeypatch.setattr(reg, "AUTO", reg.CALIBRATED)
    monkeypatch.setattr(cal, "estimate_fit", lambda *a, **k: pytest.fail("estimated a fit"))
    monkeypatch.setattr(cal, "calibrate", lambda *a, **k: pytest.fail("fitted"))
    assert main(["sample", "--model", model, *n, "--stabilizer", "auto", "--json", "--no-progress"]) == 0
    out = capsys.readouterr()
    res = json.loads(out.out)
    assert res["stabilizer"] == "auto (calibrated)" and (res["solver"], res["schedule"], res["nfe"]) == config
    assert res["n"] == (64 if not n else 2)
    assert out.err == ""
    # flags given win over the model's defaults
    assert main(["sample", "--model", model, "--n", "2", "--solver", "euler", "--nfe", "3", "--json",
                 "--no-progress"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert (res["solver"], res["schedule"], res["nfe"]) == ("euler", config[1], 3)
