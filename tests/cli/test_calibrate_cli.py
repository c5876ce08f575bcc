"""``steindiff calibrate`` and ``sample --gamma-schedule`` end to end, with refusals."""

import json

from steindiff.cli import main


def test_calibrate_then_sample(tmp_path, capsys):
    out = tmp_path / "g.json"
    assert main(["calibrate", "--model", "gmm:toy2d", "--solver", "euler", "--nfe", "4", "--n", "200",
                 "--out", str(out), "--json", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert len(summary["gammas"]) == 4 and out.exists()
    assert main(["sample", "--model", "gmm:toy2d", "--solver", "euler", "--nfe", "4", "--n", "100",
                 "--gamma-schedule", str(out), "--json", "--no-progress"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["extra_passes"] == 0 and res["gammas"] == summary["gammas"]
    # mismatched configuration is refused with a usage error naming the mismatch, no output written
    samples = tmp_path / "s.npz"
    assert main(["sample", "--model", "gmm:toy2d", "--solver", "euler", "--nfe", "5", "--gamma-schedule", str(out),
                 "--out", str(samples), "--no-progress"]) == 2
    assert "nfe: file has 4, requested 5" in capsys.readouterr().err
    assert not samples.exists()
    assert main(["sample", "--model", "gmm:image64", "--solver", "euler", "--nfe", "4", "--gamma-schedule", str(out),
                 "--no-progress"]) == 2
    assert "model: file has 'gmm:toy2d'" in capsys.readouterr().err


def test_calibrate_bad_input(tmp_path, capsys):
    assert main(["calibrate", "--model", "gmm:toy2d", "--variant", "nope", "--out", str(tmp_path / "x.json")]) == 2
    assert "unknown variant" in capsys.readouterr().err
    assert main(["calibrate", "--model", "gmm:toy2d", "--variant", "reference", "--out", str(tmp_path / "x.json")]) == 2
    assert main(["calibrate", "--model", "gmm:toy2d", "--out", str(tmp_path / "nodir" / "x.json")]) == 2
    assert not (tmp_path / "x.json").exists()
