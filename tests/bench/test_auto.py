"""The evidence rule behind ``--stabilizer auto`` (steindiff.bench.auto)."""

from steindiff.bench.auto import auto_rule


def cell(nfe, verdict, room=True, secondary="tie", label="cal:trajectory", coords="ve"):
    v = {"verdict": verdict, "room": room, "worse_at_floor": False}
    return {"model": "gmm:image64", "solver": "euler", "schedule": "karras", "nfe_budget": nfe, "stabilizer": label,
            "coords": coords, "primary": "sw2",
            "verdicts": {"sw2": v, "nll": {"verdict": secondary, "room": True, "worse_at_floor": False}}}


def test_qualifies_with_enough_helps_no_hurt_and_secondaries_kept():
    cells = [cell(3, "helps")] * 8 + [cell(4, "tie")] * 2 + [cell(10, "tie")] * 5
    r = auto_rule(cells, "cal:trajectory/ve")
    assert r["qualifies"] and r["helps_pct"] == 80.0 and r["cells"] == 15


def test_one_hurt_or_too_few_helps_or_worse_secondaries_disqualify():
    base = [cell(3, "helps")] * 9 + [cell(4, "tie")]
    assert auto_rule(base, "cal:trajectory/ve")["qualifies"]
    assert not auto_rule(base + [cell(10, "hurts")], "cal:trajectory/ve")["qualifies"]
    assert not auto_rule([cell(3, "helps")] * 7 + [cell(4, "tie")] * 3, "cal:trajectory/ve")["qualifies"]  # 70%
    two_worse = [cell(3, "helps", secondary="hurts")] * 2 + [cell(3, "helps")] * 8
    r = auto_rule(two_worse, "cal:trajectory/ve")
    assert r["secondary_worse_cells"] == 2 and r["secondary_ok_pct"] == 80.0 and not r["qualifies"]
    # cells without room do not count towards the help share; other labels are ignored
    r = auto_rule(base + [cell(3, "tie", room=False)] * 5 + [cell(3, "hurts", label="stein")], "cal:trajectory/ve")
    assert r["qualifies"] and r["room_small_nfe"] == 10


def test_auto_is_what_the_committed_evidence_admits():
    """``AUTO`` is the calibrated sampler exactly when the rule admits ``cal:trajectory`` on the committed grids
    (README: ``python benchmarks/select_auto.py`` over the same three files)."""
    import json
    from pathlib import Path

    from steindiff.bench.auto import evaluate_candidates
    from steindiff.stabilizers import registry

    root = Path(__file__).resolve().parents[2] / "docs" / "results"
    files = [root / f"calibrated-{m}.json" for m in ("image64", "toy2d", "digits")]
    rows = {r["label"]: r for r in evaluate_candidates([json.loads(f.read_text()) for f in files])}
    r = rows["cal:trajectory/ve"]
    assert r["cells"] == 216  # 72 cells per grid
    assert (registry.AUTO == registry.CALIBRATED) == r["qualifies"]


def test_head_to_head_compares_the_same_cells_of_two_grids(load_benchmark):
    """benchmarks/select_auto.py --versus: each stabilizer cell against the same cell of the base grid, by the
    protocol's rule with the base's spread: a grid against itself ties everywhere; against a base whose
    candidate is far worse on sliced W2 it is better there and only there."""
    import copy

    import pytest

    from steindiff.bench.runner import run_grid

    sa = load_benchmark("select_auto")
    res = run_grid(["gmm:toy2d"], ["euler"], [3, 4], ["karras"], ["ve"], ["none", "stein"], [0, 1], 200,
                   progress=False, ref_steps=40)
    same = sa.head_to_head(res, res)
    assert [(r["label"], r["cells"]) for r in same] == [("stein/ve", 2)]
    assert all(t["tie"] == 2 for t in same[0]["metrics"].values())
    worse = copy.deepcopy(res)
    for row in worse["rows"]:
        if row["stabilizer"] == "stein":
            row["metrics"]["sw2"] += 1e3  # beyond any seed spread of the literal method here
    (r,) = sa.head_to_head(res, worse)
    assert r["metrics"]["sw2"]["helps"] == 2 and r["metrics"]["nll"]["tie"] == 2
    (r,) = sa.head_to_head(worse, res)
    assert r["metrics"]["sw2"]["hurts"] == 2
    other = copy.deepcopy(res)
    for row in other["rows"]:
        row["solver"] = "heun"
    with pytest.raises(ValueError, match="another grid"):
        sa.head_to_head(res, other)


def test_cells_with_room_split_by_the_fine_solve(load_benchmark):
    """benchmarks/select_auto.py --fine: the evidence rule's cells with room, split by whether vanilla is above
    the fine solve beyond both spreads, and the cells without a help counted by why; the counts add up to the
    rule's own, a kept plain plan is read from the rows, and a fine solve from other seeds is refused."""
    import copy
    import json
    from pathlib import Path

    import pytest

    from steindiff.bench.auto import evaluate_candidates

    sa = load_benchmark("select_auto")
    root = Path(__file__).resolve().parents[2] / "docs" / "results"
    grid = json.loads((root / "calibrated-digits-gradient.json").read_text())
    fine = json.loads((root / "digits-fine.json").read_text())
    (r,) = sa.fine_room(grid, fine)
    (rule,) = [x for x in evaluate_candidates([grid]) if x["label"] == r["label"]]
    assert (r["room"], r["helps"]) == (rule["room_small_nfe"], rule["helps_small_nfe"])
    assert r["helps_above_fine"] <= r["above_fine"] <= r["room"]
    assert r["helps"] + sum(r["not_helps"].values()) == r["room"]
    assert r["room"] - r["above_fine"] == r["not_helps"]["within_fine"] + (r["helps"] - r["helps_above_fine"])
    plain_everywhere = copy.deepcopy(grid)
    for row in plain_everywhere["rows"]:
        if row["stabilizer"] != "none":
            row["calibration"] = {**row.get("calibration", {}), "chosen": "plain"}
    (p,) = sa.fine_room(plain_everywhere, fine)
    assert p["not_helps"]["other"] == 0 and p["not_helps"]["kept_plain"] == r["above_fine"] - r["helps_above_fine"]
    other = copy.deepcopy(fine)
    for row in other["rows"]:
        row["seed"] += 100
    with pytest.raises(ValueError, match="seeds"):
        sa.fine_room(grid, other)
