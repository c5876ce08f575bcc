"""Benchmark reports: Markdown content and marks, PNG plots, atomic writes."""

import os

import pytest

from steindiff.bench import markdown, run_grid, summarize, write_markdown, write_plots


@pytest.fixture(scope="module")
def res():
    r = run_grid(["gmm:toy2d"], ["euler", "dpmpp_2m"], [3, 5], ["karras"], ["ve"], ["none", "stein", "stein-oracle"],
                 [0, 1], 64, progress=False, ref_steps=50)
    return r, summarize(r)


def test_markdown_tables(res):
    r, s = res
    text = markdown(r, s, title="Toy", command="steindiff bench --model gmm:toy2d")
    assert text.startswith("# Toy\n") and "steindiff bench --model gmm:toy2d" in text
    assert "## gmm:toy2d" in text and "### Best vanilla configuration per NFE" in text
    header = "| solver | schedule | NFE | none | stein/ve | stein-oracle/ve |"
    assert text.count(header) == 3  # excess sw2, nll, mode_tv tables
    # one table line per (solver, schedule, nfe), each stabilizer cell carrying a verdict mark
    lines = [ln for ln in text.splitlines() if ln.startswith("| euler | karras | 3 |")]
    assert len(lines) == 3
    cells = [c.strip() for c in lines[0].strip("|").split("|")]
    assert all(c.split()[-1] in {"+", "−", "=", "°", "°!", "✗"} for c in cells[4:])
    e = next(c for c in s["cells"] if c["solver"] == "euler" and c["nfe_budget"] == 3 and c["stabilizer"] == "none")
    assert f"{e['excess']['sw2']['mean']:.3g}±" in cells[3]
    assert "### Gamma per step" in text and "## Cost within the grid" in text


def test_write_markdown_is_atomic(res, tmp_path, monkeypatch):
    r, s = res
    path = tmp_path / "report.md"
    write_markdown(str(path), r, s)
    assert path.read_text().startswith("# SteinDiff benchmark")
    import steindiff.bench.report as rep

    monkeypatch.setattr(rep, "markdown", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        write_markdown(str(tmp_path / "other.md"), r, s)
    assert sorted(os.listdir(tmp_path)) == ["report.md"]


def test_write_plots(res, tmp_path):
    r, s = res
    out = tmp_path / "plots"
    paths = write_plots(r, s, str(out))
    names = sorted(os.listdir(out))
    assert names == sorted(os.path.basename(p) for p in paths)  # no temporary files left
    assert names == ["cost_quality_gmm-toy2d.png", "gamma_gmm-toy2d_karras_ve.png",
                     "nll_vs_nfe_gmm-toy2d_karras.png", "sw2_vs_nfe_gmm-toy2d_karras.png"]
    for p in paths:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plots_have_whole_number_ticks(res, tmp_path, monkeypatch):
    """NFE axes tick at the grid's NFEs (no 4.5), gamma axes at whole steps."""
    import steindiff.bench.report as rep

    figs = {}
    save = rep.save_figure
    monkeypatch.setattr(rep, "save_figure", lambda fig, path, **kw: figs.setdefault(os.path.basename(path), fig)
                        and save(fig, path, **kw))
    r, s = res
    write_plots(r, s, str(tmp_path))
    for name, fig in figs.items():
        if name.startswith("cost_quality"):
            continue
        for ax in (a for a in fig.axes if a.get_visible()):
            fig.canvas.draw()
            ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
            assert ticks and all(float(t).is_integer() for t in ticks), (name, ticks)
            if "_vs_nfe_" in name:
                assert ticks == [3, 5], (name, ticks)
