"""``steindiff demo --model patches``: the patch metrics in the table, the spectrum plot, the model's defaults."""

import json

from steindiff.cli import main


def test_patches_demo_writes_the_spectrum_plot(tmp_path, capsys):
    out = tmp_path / "d"
    assert main(["demo", "--model", "patches", "--nfe", "2", "--stabilizers", "none,stein-energy", "--n", "8",
                 "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "patch_fd" in text and "spectrum_high" in text and "1 Hutchinson probe(s)" in text
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "metrics.png", "results.json", "spectrum.png"]
    r = json.loads((out / "results.json").read_text())
    assert r["model"] == "patches" and r["probes"] == 1 and r["spectrum_plot"] == str(out / "spectrum.png")
    assert [row["stabilizer"] for row in r["rows"]] == ["none", "stein-energy"]
    for row in r["rows"]:
        assert row["status"] == "ok" and len(row["metrics"]["spectrum_bands"]) == 8
        assert row["metrics"]["patch_fd_floor"] > 0


def test_demo_table_says_calibrated_is_what_auto_runs_only_while_it_is(monkeypatch):
    import argparse

    from steindiff.cli.demo import _table
    from steindiff.stabilizers import registry

    args = argparse.Namespace(solver="dpmpp_2m", schedule="logsnr", n=8, probes=1)
    monkeypatch.setattr(registry, "AUTO", registry.CALIBRATED)
    assert "calibrated (what --stabilizer auto runs):" in _table([], args, "digits", ["digits_fid"])
    monkeypatch.setattr(registry, "AUTO", "none")
    assert "auto" not in _table([], args, "digits", ["digits_fid"])
