"""benchmarks/mutation_check.py does not rot: every mutation still applies to the current source
(its target text occurs exactly once, the mutated file compiles, its tests exist), and the check
itself reports a mutation that no longer applies."""

import dataclasses

import pytest


@pytest.fixture(scope="module")
def mc(load_benchmark):
    return load_benchmark("mutation_check")


def test_every_mutation_applies_cleanly(mc):
    assert mc.check_mutations() == []
    assert len(mc.MUTATIONS) >= 30
    # the two bugs that survived the whole suite before issue 14 stay on the list
    ids = {m.id for m in mc.MUTATIONS}
    assert {"sw2-sqrt", "energy-sigma2"} <= ids


def test_a_stale_mutation_is_reported(mc):
    m = mc.MUTATIONS[0]
    stale = dataclasses.replace(m, id="stale", find=m.find + "  # gone")
    twice = dataclasses.replace(m, id="twice", path="steindiff/metrics/mixture.py", find="return float(")
    problems = mc.check_mutations(mutations=[stale, twice, m, m])
    assert len(problems) == 3, problems
    assert f"duplicate id {m.id!r}" in problems[0]
    assert "stale: target text found 0 times" in problems[1]
    assert "twice: target text found" in problems[2] and "found 1 times" not in problems[2]


def test_cli_help_and_check(mc, capsys):
    with pytest.raises(SystemExit) as e:
        mc.main(["--help"])
    assert e.value.code == 0 and "--json" in capsys.readouterr().out
    assert mc.main(["--check"]) == 0
    assert "apply cleanly" in capsys.readouterr().out
