"""Peers as bench rows (steindiff.bench.peers): validation, one fit per cell from the calibration teacher,
applied to every seed, and the mechanism open to another peer."""

import json

import pytest
import torch

from steindiff.bench import run_grid, summarize, validate_grid
from steindiff.bench.peers import PEERS, Peer, fit_peer, peer_name, register_peer
from steindiff.cli import main
from steindiff.noise import VEProcess
from steindiff.plan import make_plan

OPTS = {"n": 64, "ref_steps": 40, "max_solves": 10}


def test_peer_names_are_validated():
    assert peer_name("peer:gits") == "gits" and peer_name("none") is None
    with pytest.raises(ValueError, match="unknown peer 'magic'"):
        validate_grid(["gmm:toy2d"], ["euler"], [3], ["karras"], ["ve"], ["none", "peer:magic"], [0], 8)
    validate_grid(["gmm:toy2d"], ["euler"], [3], ["karras"], ["ve"], ["none", "peer:gits"], [0], 8)
    with pytest.raises(ValueError, match="bad peer name"):
        register_peer(Peer("peer:x", lambda *a, **k: None, "", ""))


def test_gits_rows_fit_once_per_cell_from_the_calibration_teacher(monkeypatch):
    from steindiff.bench import peers as peers_module

    calls = []
    fit = PEERS["gits"].fit

    def counting(model, base, noise, teacher, **kw):
        calls.append((base.solver, base.nfe, noise.shape[0], teacher.final.shape[0]))
        return fit(model, base, noise, teacher, **kw)

    monkeypatch.setitem(peers_module.PEERS, "gits", Peer("gits", counting, PEERS["gits"].paper,
                                                         PEERS["gits"].distance))
    res = run_grid(["gmm:toy2d"], ["euler", "dpmpp_2m"], [3], ["karras"], ["ve", "vp"],
                   ["none", "cal:trajectory", "peer:gits"], [0, 1], 100, progress=False, ref_steps=50,
                   calibration=OPTS)
    rows = [r for r in res["rows"] if r["stabilizer"] == "peer:gits"]
    assert len(rows) == 4 and all(r["status"] == "ok" and r["coords"] == "-" for r in rows)  # once per solver and seed
    # one fit per cell, from the noise and teacher of cal:trajectory
    assert sorted(calls) == [("dpmpp_2m", 3, 64, 64), ("euler", 3, 64, 64)]
    none = {(r["solver"], r["seed"]): r for r in res["rows"] if r["stabilizer"] == "none"}
    for r in rows:
        assert r["nfe"] == none[(r["solver"], r["seed"])]["nfe"] and r["extra_passes"] == 0
        assert r["peer"]["name"] == "gits" and "L2" in r["peer"]["distance"] and r["peer"]["wall_s"] > 0
        assert r["peer"]["record"]["cost"] <= r["peer"]["record"]["plain_cost"]
        assert r["peer_sigmas"][0] == 80.0 and r["peer_sigmas"][-1] == 0.0 and len(r["peer_sigmas"]) == r["steps"] + 1
    by = {}
    for r in rows:
        by.setdefault(r["solver"], []).append(r["peer_sigmas"])
    assert all(a == b for a, b in by.values())  # the same plan on every seed
    assert res["config"]["peers"]["gits"]["distance"] == PEERS["gits"].distance
    summ = summarize(res)
    ps = [p for p in summ["peers"] if p["peer"] == "peer:gits"]
    assert len(ps) == 1 and ps[0]["cells"] == 2 and len(ps[0]["best_per_nfe"]) == 1
    assert sum(ps[0]["calibrated_vs_peer"][k] for k in ("helps", "tie", "hurts", "failed")) == 2


def test_another_peer_plugs_in(monkeypatch):
    """A peer is any function of (model, plain plan, calibration noise, teacher): one returning the plain plan
    gives the plain solver's samples exactly."""
    from steindiff.bench import peers as peers_module

    monkeypatch.setitem(peers_module.PEERS, "same", Peer("same", lambda model, base, noise, teacher, **kw: base,
                                                         "none", "none"))
    res = run_grid(["gmm:toy2d"], ["euler"], [3], ["karras"], ["ve"], ["none", "peer:same"], [0], 64, progress=False,
                   ref_steps=20, calibration=OPTS)
    by = {r["stabilizer"]: r for r in res["rows"]}
    assert by["peer:same"]["metrics"]["sw2"] == by["none"]["metrics"]["sw2"]
    assert by["peer:same"]["peer"]["name"] == "same" and by["peer:same"]["peer"]["distance"] == "none"
    base = make_plan(VEProcess(), "euler", 3)
    assert fit_peer("peer:same", None, base, torch.zeros(1), None, sigma_min=0.002).meta["peer"]["name"] == "same"
    seen = {}
    monkeypatch.setitem(peers_module.PEERS, "opts", Peer("opts", lambda model, base, noise, teacher, **kw:
                                                         seen.update(kw) or make_plan(VEProcess(), "euler", 3),
                                                         "none", "none"))
    plan = fit_peer("peer:opts", None, base, torch.zeros(1), None, sigma_min=0.002, max_iters=7)
    assert seen["max_iters"] == 7 and plan.meta["peer"]["options"] == {"max_iters": 7}


def test_bench_cli_peers_option(tmp_path, capsys):
    j, md = tmp_path / "r.json", tmp_path / "r.md"
    args = ["bench", "--model", "gmm:toy2d", "--solvers", "euler", "--nfe", "3", "--schedules", "karras",
            "--coords", "ve", "--stabilizers", "none", "--peers", "gits", "--seeds", "0", "--n", "32",
            "--ref-steps", "20", "--calibration-solves", "5", "--no-progress", "--json-out", str(j),
            "--markdown", str(md)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "peer:gits" in out
    res = json.loads(j.read_text())
    assert {r["stabilizer"] for r in res["rows"]} == {"none", "peer:gits"}
    assert "--peers gits" in res["command"]
    assert "### peer:gits (a peer)" in md.read_text()
    assert main([*args[:-4], "--peers", "magic"]) == 2
    assert "unknown peer 'magic'" in capsys.readouterr().err


def test_run_cost_times_a_peer_after_fitting_it():
    from steindiff.bench import run_cost

    entries = run_cost(["gmm:toy2d"], ["euler"], [3], stabilizers=["none", "peer:gits"], n=16, repeats=1,
                       progress=False)
    by = {e["stabilizer"]: e for e in entries}
    assert by["peer:gits"]["status"] == "ok" and by["peer:gits"]["coords"] == "-"
    assert by["peer:gits"]["nfe"] == by["none"]["nfe"] and by["peer:gits"]["ratio"] > 0
