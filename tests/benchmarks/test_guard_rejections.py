"""benchmarks/guard_rejections.py: each candidate of a cell fitted as the bench fits it, the guards of each set
that reject it, and its metrics with the protocol's verdict against plain."""

import json

import pytest


@pytest.fixture(scope="module")
def gr(load_benchmark):
    return load_benchmark("guard_rejections")


def test_candidates_are_judged_and_scored(gr, tmp_path, monkeypatch, capsys):
    from steindiff.trajectory import passes_guard

    small = {"n": 64, "seed": 12345, "ref_steps": 40, "max_solves": 10, "max_seconds": 30.0,
             "gradient_options": {"max_iters": 5, "batch_size": 16}}
    monkeypatch.setattr(gr, "calibration_options", lambda spec, method: small)
    out = tmp_path / "r.json"
    assert gr.main(["--model", "gmm:toy2d", "--cells", "euler/karras/3", "--seeds", "0,1", "--n", "100",
                    "--json-out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["guard_sets"]["default"] != res["guard_sets"]["without dominance"]
    (cell,) = res["cells"]
    cands = cell["candidates"]
    assert {"plain", "gits", "gradient"} <= set(cands) and cands["plain"]["verdicts"] == {}
    for name, c in cands.items():
        assert set(c["metrics"]) == {"sw2", "nll", "mode_tv"}
        if name != "plain":
            assert set(c["verdicts"]) == set(c["metrics"])
            for s, gs in res["guard_sets"].items():
                assert set(c["rejected_by"][s]) <= set(gs)
                for g in (g for g in gs if ":" in g):  # thresholds: judged again from the recorded deviations
                    assert (g in c["rejected_by"][s]) == (not passes_guard(c, cands["plain"], g))
    assert "euler/karras/3 gradient" in capsys.readouterr().out
    assert gr.main(["--cells", "euler/karras"]) == 2
    assert gr.main(["--model", "gmm:toy2d", "--cells", "nope/karras/3", "--json-out", str(tmp_path / "x.json")]) == 2
    assert "nope" in capsys.readouterr().err and not (tmp_path / "x.json").exists()
