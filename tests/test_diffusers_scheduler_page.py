"""docs/diffusers-scheduler.md as a user follows it: its python and bash blocks run in order, in one namespace,
on a tiny Stable Diffusion 3 pipeline saved as ./my-pipeline (512x512 images, random weights).  The
calibrate-pipeline command gets a tiny budget appended (a few samples and solves) so that it runs in seconds."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import sys
from pathlib import Path

import pytest

PAGE = Path(__file__).resolve().parent.parent / "docs" / "diffusers-scheduler.md"
TEXT = PAGE.read_text()
TINY_BUDGET = ["--n", "4", "--ref-steps", "8", "--max-solves", "2", "--max-seconds", "10",
               "--max-sequence-length", "8", "--no-progress"]


def blocks() -> list[tuple[str, str]]:
    """(language, code) of the page's python and bash blocks, in order."""
    return re.findall(r"^```(python|bash)\n(.*?)^```", TEXT, flags=re.S | re.M)


def test_page_shows_the_three_steps():
    langs = [lang for lang, _ in blocks()]
    assert langs.count("bash") == 2 and langs.count("python") >= 4
    commands = " ".join(code for lang, code in blocks() if lang == "bash")
    assert "steindiff calibrate-pipeline" in commands and "steindiff export" in commands


def test_page_runs_as_written(tmp_path, monkeypatch):
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent / "integrations"))
    import tiny_pipelines as tp

    from steindiff.cli import main

    tp.stable_diffusion_3(image_size=512).to(torch.float32).save_pretrained(tmp_path / "my-pipeline")
    (tmp_path / "prompts.txt").write_text("a lighthouse at dusk\na red boat\n")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__page__"}
    printed = io.StringIO()
    for lang, code in blocks():
        if lang == "python":
            with contextlib.redirect_stdout(printed):
                exec(compile(code, str(PAGE), "exec"), namespace)
            continue
        for line in code.replace("\\\n", " ").splitlines():
            words = shlex.split(line)
            argv = words[words.index("steindiff") + 1:]
            if argv[0] == "calibrate-pipeline":
                argv += TINY_BUDGET
            assert main(argv) == 0, line
    assert (tmp_path / "cal.json").exists()
    # what the page says the refused call prints
    assert "calibration does not match this pipeline call: it has 8 steps, this call asks for 6" in printed.getvalue()
    # the exported sigmas made the pipeline's own scheduler run the calibration's noise levels
    import json

    levels = torch.tensor(json.loads((tmp_path / "cal.json").read_text())["sigmas"][:-1], dtype=torch.float64)
    torch.testing.assert_close(namespace["pipe"].scheduler.sigmas[:-1].double(), levels / (1 + levels), rtol=2e-6,
                               atol=1e-6)
