"""benchmarks/flow_peers.py and benchmarks/digits_flow_compare.py: diffusers' flow schedulers run on the bench's own
model and noise (so diffusers' Euler equals steindiff's on the same levels), and the comparisons pick the best
configurations per NFE."""

import pytest

from steindiff.bench.runner import run_grid

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def fp(load_benchmark):
    return load_benchmark("flow_peers")


def test_diffusers_flow_euler_on_the_bench_noise_is_steindiff_euler(fp, tmp_path):
    bench = run_grid(["gmm:toy2d-flow"], ["euler"], [4], ["flow"], ["ve"], ["none"], [0], 200, progress=False,
                     ref_steps=40)
    peers = [fp.Peer("FlowMatchEulerDiscreteScheduler", "FlowMatchEuler shift 1", {"shift": 1.0}),
             fp.Peer("FlowMatchHeunDiscreteScheduler", "FlowMatchHeun shift 1", {"shift": 1.0}, heun=True)]
    res = fp.run(bench, peers, progress=False)
    rows = {r["label"]: r for r in res["rows"] if r["framework"] == "diffusers"}
    assert rows["FlowMatchEuler shift 1"]["nfe"] == 4 and rows["FlowMatchHeun shift 1"]["nfe"] == 3
    ours = bench["rows"][0]["metrics"]
    theirs = rows["FlowMatchEuler shift 1"]["metrics"]
    # the same solver on the same levels from the same noise (t = 1 against t_max = 1 - 1e-6): the same samples
    for m in ("sw2", "nll", "traj_err"):
        assert theirs[m] == pytest.approx(ours[m], rel=1e-4, abs=1e-6), m
    summ = fp.summarize(res, bench)
    best = summ["best"][4]
    assert best["steindiff"]["label"] == "steindiff euler flow" and "vs_diffusers" in best["steindiff"]
    assert best["diffusers"]["label"] in rows
    md = fp.markdown(res, bench, "cmd")
    assert "| 4 |" in md and "FlowMatchHeun shift 1" in md
    with pytest.raises(ValueError, match="-flow model"):
        fp.run({**bench, "config": {**bench["config"], "models": ["gmm:toy2d"]}}, peers, progress=False)


def test_room_below_diffusers_is_measured_against_the_fine_solve(fp):
    bench = run_grid(["gmm:toy2d-flow"], ["euler"], [3], ["flow"], ["ve"], ["none"], [0, 1, 2], 200,
                     progress=False, ref_steps=40)
    peers = [fp.Peer("FlowMatchEulerDiscreteScheduler", "FlowMatchEuler shift 1", {"shift": 1.0})]
    res = fp.run(bench, peers, progress=False)
    summ = fp.summarize(res, bench)
    fine = [fp.excess(r["metrics"], "sw2") for r in res["rows"] if r["framework"] == "reference"]
    d = summ["best"][3]["diffusers"]["excess"]["sw2"]
    gap, spreads = d["mean"] - sum(fine) / 3, d["std"] + summ["reference"]["sw2_std"]
    assert summ["reference"]["sw2_std"] > 0 and len(fine) == 3
    assert summ["best"][3]["diffusers"]["room_vs_fine"] == (gap > spreads)
    # Euler at NFE 3 on a 2-d mixture is far from its fine solve: room, said in the table
    assert gap > spreads
    assert "| yes |" in fp.markdown(res, bench, "cmd")


def test_digits_compare_picks_best_and_gap(load_benchmark):
    dc = load_benchmark("digits_flow_compare")

    def row(solver, schedule, stab, nfe, fid, seed=0):
        return {"solver": solver, "schedule": schedule, "stabilizer": stab, "nfe_budget": nfe, "coords": "-",
                "seed": seed, "status": "ok", "metrics": {"digits_fid": fid, "digits_fid_floor": 0.5}}

    edm = {"rows": [row("euler", "karras", "none", 4, 3.5), row("euler", "karras", "cal:trajectory", 4, 2.5),
                    row("heun", "karras", "none", 4, 1.5)]}  # heun: not in the flow grid, left out
    flow = {"rows": [row("euler", "karras", "none", 4, 4.5), row("euler", "flow", "none", 4, 2.5),
                     row("euler", "flow", "cal:trajectory", 4, 1.5)]}
    fine = {"rows": [row("dpmpp_3m", "karras", "none", 100, 1.0)]}
    res = dc.compare(edm, fine, flow, fine)
    e, f = res["models"]["digits (EDM)"]["by_nfe"][4], res["models"]["digits-flow"]["by_nfe"][4]
    assert e["plain"]["solver"] == "euler" and e["plain"]["digits_fid"]["mean"] == pytest.approx(3.0)
    assert e["gap_closed"] == pytest.approx((3.0 - 2.0) / (3.0 - 0.5))
    assert f["plain"]["schedule"] == "flow" and f["gap_closed"] == pytest.approx((2.0 - 1.0) / (2.0 - 0.5))
    assert "| 4 |" in dc.markdown(res, "cmd")
