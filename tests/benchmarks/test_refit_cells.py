"""benchmarks/refit_cells.py: its cell list is parsed or refused before any work."""

import pytest


@pytest.fixture(scope="module")
def refit(load_benchmark):
    return load_benchmark("refit_cells")


def test_cells_are_parsed_or_refused(refit, tmp_path, capsys):
    assert refit.parse_cells("dpmpp_2m/karras/4,heun/logsnr/3") == [("dpmpp_2m", "karras", 4), ("heun", "logsnr", 3)]
    for bad in ("euler/karras", "euler/karras/x", "euler/karras/4/1"):
        with pytest.raises(ValueError, match="solver/schedule/nfe"):
            refit.parse_cells(bad)
    out = tmp_path / "r.json"
    assert refit.main(["--cells", "euler/karras", "--json-out", str(out)]) == 2
    assert "solver/schedule/nfe" in capsys.readouterr().err and not out.exists()
