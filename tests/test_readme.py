"""The README and the documentation pages as a new user reads them: every ```python block runs as written
(and prints what the ```text block after it shows), every command they show parses with the CLI (the README's
first one runs and prints what it shows), their outputs have distinct names, and their claims about the flags
hold."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
import shlex
from pathlib import Path

import pytest

from steindiff.cli import build_parser, main

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
#: the pages a user reads: the README and the documentation site's own pages (not the result reports)
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
#: pages whose Python blocks build on one another: run in order, by their own test
IN_ORDER = {"diffusers-scheduler.md": "tests/test_diffusers_scheduler_page.py"}
TEXT = README.read_text()
COMMANDS = {"sample", "calibrate", "diagnose", "bench", "train", "demo", "sample-dist", "merge"}
# flags whose value is a file or folder the command writes
OUTPUT_FLAGS = {"--out", "--trace", "--png", "--grid", "--json-out", "--markdown", "--plots", "--out-dir"}


def _fenced(page: Path) -> list[tuple[str, str]]:
    """``(language, code)`` of every fenced block of a page, in order."""
    return re.findall(r"^```(\w*)\n(.*?)^```", page.read_text(), flags=re.S | re.M)


def _blocks(lang: str, pages=PAGES) -> list[tuple[Path, str]]:
    return [(p, code) for p in pages for lg, code in _fenced(p) if lg == lang]


def _with_output(lang: str) -> list[tuple[Path, str, str | None]]:
    """Blocks of ``lang`` with the ```text block that follows each, if any (what it prints)."""
    out = []
    for p in PAGES:
        if p.name in IN_ORDER and lang == "python":
            continue
        blocks = _fenced(p)
        for i, (lg, code) in enumerate(blocks):
            if lg == lang:
                nxt = blocks[i + 1] if i + 1 < len(blocks) else None
                text = p.read_text()
                follows = nxt is not None and nxt[0] == "text" and re.search(
                    re.escape(code) + r"```\s*\n```text\n" + re.escape(nxt[1]), text)
                out.append((p, code, nxt[1] if follows else None))
    return out


def _subcommands() -> dict:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return sub.choices


def _argvs(lines: list[str]) -> list[list[str]]:
    """argv (after ``steindiff``) of every steindiff command in these shell lines."""
    out = []
    for line in lines:
        for part in re.sub(r"\s#.*$", "", line).split("&&"):  # drop shell comments, split chains
            words = shlex.split(part)
            if "steindiff" in words:
                argv = words[words.index("steindiff") + 1:]
                if argv and argv[0] in COMMANDS:
                    out.append(argv)
    return out


def _block_lines(block: str) -> list[str]:
    return block.replace("\\\n", " ").splitlines()


def _invocations() -> list[list[str]]:
    """Every command of the ```bash blocks (complete commands)."""
    return _argvs([line for _, block in _blocks("bash") for line in _block_lines(block)])


def _mentions() -> list[list[str]]:
    """Commands quoted in the text (`steindiff train --data digits`): possibly partial."""
    return _argvs([m for p in PAGES for m in re.findall(r"`(steindiff [^`]+)`", p.read_text())])


def _same_output(shown: str, printed: str) -> None:
    """The printed lines are the shown ones: the same words, and numbers within 10% (a calibration under a
    time budget can stop a little earlier on a loaded machine)."""
    a, b = shown.strip().splitlines(), printed.strip().splitlines()
    assert len(a) == len(b), f"shown:\n{shown}\nprinted:\n{printed}"
    num = r"-?\d+\.?\d*(?:e[-+]?\d+)?"
    for x, y in zip(a, b):
        assert re.sub(num, "#", x) == re.sub(num, "#", y), f"shown {x!r}, printed {y!r}"
        for u, v in zip(re.findall(num, x), re.findall(num, y)):
            assert float(v) == pytest.approx(float(u), rel=0.1, abs=1e-3), f"shown {x!r}, printed {y!r}"


def test_pages_have_snippets_and_commands():
    assert len(_blocks("python", [README])) >= 2 and _blocks("bash", [README])
    assert {argv[0] for argv in _invocations()} == COMMANDS  # the pages show every command


def test_readme_is_a_front_page():
    assert len(TEXT.splitlines()) <= 200
    for page in PAGES:  # the pages speak of the library, not of its development history
        text = page.read_text()
        for pattern in (r"\bissue \d", r"this round", r"until now", r"git show", r"\b[0-9a-f]{7,40}\b"):
            assert not re.search(pattern, text, flags=re.I), f"{page.name}: {pattern}"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """One working folder for every snippet: what one writes (a calibration cache) the next one reuses."""
    return tmp_path_factory.mktemp("snippets")


@pytest.mark.parametrize("page,code,shown", _with_output("python"),
                         ids=[f"{p.name}-{i}" for i, (p, _, _) in enumerate(_with_output("python"))])
def test_python_snippet_runs_and_prints_what_is_shown(page, code, shown, workdir, monkeypatch):
    if "diffusers" in code and importlib.util.find_spec("diffusers") is None:
        pytest.skip("diffusers is not installed")
    monkeypatch.chdir(workdir)  # anything a snippet writes lands here
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(page), "exec"), {"__name__": "__readme__"})
    assert out.getvalue().strip(), f"a snippet of {page.name} prints nothing"
    if shown is not None:
        _same_output(shown, out.getvalue())


def test_readme_command_prints_what_is_shown(tmp_path, monkeypatch, capsys):
    page, code, shown = next((p, c, s) for p, c, s in _with_output("bash") if p == README)
    (argv,) = _argvs(_block_lines(code))
    monkeypatch.chdir(tmp_path)
    assert main([*argv, "--no-progress"]) == 0
    _same_output(shown, capsys.readouterr().out)


@pytest.mark.parametrize("argv", _invocations(), ids=lambda a: " ".join(a)[:60])
def test_command_parses(argv, capsys):
    """Exactly what the CLI accepts: an unknown flag or a bad value makes argparse exit 2."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"`steindiff {' '.join(argv)}` is refused by the CLI: {capsys.readouterr().err.strip()} ({e})")
    assert args.command == argv[0]


@pytest.mark.parametrize("argv", _mentions(), ids=lambda a: " ".join(a)[:60])
def test_quoted_command_flags_exist(argv):
    p = _subcommands()[argv[0]]
    flags = {o for a in p._actions for o in a.option_strings}
    unknown = [w for w in argv[1:] if w.startswith("--") and w.split("=")[0] not in flags]
    assert not unknown, f"`steindiff {' '.join(argv)}`: {argv[0]} has no {', '.join(unknown)}"


def test_command_outputs_have_distinct_names():
    written = []
    for _, block in _blocks("bash"):
        for argv in _argvs(_block_lines(block)):
            written += [argv[i + 1].rstrip("/") for i, a in enumerate(argv[:-1]) if a in OUTPUT_FLAGS]
    assert len(written) >= 8
    assert len(set(written)) == len(written), f"the examples overwrite each other's outputs: {written}"


def test_examples_use_no_stabilizer_the_docs_call_harmful():
    """`stein` (the paper's literal method) appears only on the page that shows it on purpose."""
    for page, block in _blocks("bash"):
        for argv in _argvs(_block_lines(block)):
            for flag in ("--stabilizer", "--stabilizers"):
                if flag in argv and page.name != "stabilizers.md":
                    names = argv[argv.index(flag) + 1].split(",")
                    assert not {"stein", "stein-tr"} & set(names) or argv[0] == "bench", (page.name, argv)
    for page, code in _blocks("python"):
        assert 'stabilizer="stein"' not in code and "make_stabilizer(\"stein" not in code, page.name


def test_flag_claims_hold():
    """The guide: every command has --help, --json and --no-progress; those that draw random numbers take
    --seed (bench: --seeds; merge draws none)."""
    claim = re.sub(r"\s+", " ", (ROOT / "docs" / "guide.md").read_text())
    assert "Every command has `--help` (it shows every default), `--json`" in claim
    assert "`bench` takes a list, `--seeds`; `merge` draws none and has no seed" in claim
    for name, p in _subcommands().items():
        flags = {o for a in p._actions for o in a.option_strings}
        assert {"--help", "--json", "--no-progress"} <= flags, name
        json_action = next(a for a in p._actions if "--json" in a.option_strings)
        assert json_action.nargs == 0, f"{name}: --json must be a switch"
        # merge, export and calibrations draw no random numbers (listings and file conversions)
        seed = {"bench": "--seeds", "merge": None, "export": None, "calibrations": None}.get(name, "--seed")
        if seed:
            assert seed in flags, name
        else:
            assert not {"--seed", "--seeds"} & flags, name


def test_pages_state_the_contract_and_the_digits_size():
    flat = re.sub(r"\s+", " ", (ROOT / "docs" / "guide.md").read_text())
    assert "`sigma`: a tensor of shape `(B,)`" in flat and "`extra_args`: a dict passed as keyword arguments" in flat
    assert "8x8-pixel" in re.sub(r"\s+", " ", TEXT)
