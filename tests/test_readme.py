"""The README as a new user reads it: every ```python block runs as written, every command it shows
parses with the CLI, its outputs have distinct names, and its claims about the flags hold."""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest

from steindiff.cli import build_parser

README = Path(__file__).resolve().parent.parent / "README.md"
TEXT = README.read_text()
COMMANDS = {"sample", "calibrate", "diagnose", "bench", "train", "demo", "sample-dist", "merge"}
# flags whose value is a file or folder the command writes
OUTPUT_FLAGS = {"--out", "--trace", "--png", "--grid", "--json-out", "--markdown", "--plots", "--out-dir"}


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", TEXT, flags=re.S | re.M)


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
    """Every command of the ```bash blocks (the command list, complete commands)."""
    return _argvs([line for block in _blocks("bash") for line in _block_lines(block)])


def _mentions() -> list[list[str]]:
    """Commands quoted in the text (`steindiff train --data digits`): possibly partial."""
    return _argvs(re.findall(r"`(steindiff [^`]+)`", TEXT))


def test_readme_has_snippets_and_commands():
    assert len(_blocks("python")) >= 3
    assert {argv[0] for argv in _invocations()} == COMMANDS  # the command list shows every command


@pytest.mark.parametrize("code", _blocks("python"), ids=[f"snippet{i}" for i in range(len(_blocks("python")))])
def test_python_snippet_runs(code, tmp_path, monkeypatch):
    if "diffusers" in code and importlib.util.find_spec("diffusers") is None:
        pytest.skip("diffusers is not installed")
    monkeypatch.chdir(tmp_path)  # anything a snippet writes lands here
    exec(compile(code, str(README), "exec"), {"__name__": "__readme__"})


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


def test_command_list_outputs_have_distinct_names():
    written = []
    for block in _blocks("bash"):
        for argv in _argvs(_block_lines(block)):
            written += [argv[i + 1].rstrip("/") for i, a in enumerate(argv[:-1]) if a in OUTPUT_FLAGS]
    assert len(written) >= 8
    assert len(set(written)) == len(written), f"README examples overwrite each other's outputs: {written}"


def test_flag_claims_hold():
    """The README: every command has --help, --json and --no-progress; those that draw random numbers
    take --seed (bench: --seeds; merge draws none)."""
    claim = re.sub(r"\s+", " ", TEXT)
    assert "Every command has `--help` (it shows every default), `--json`" in claim
    assert "`bench` takes a list, `--seeds`; `merge` draws none and has no seed" in claim
    for name, p in _subcommands().items():
        flags = {o for a in p._actions for o in a.option_strings}
        assert {"--help", "--json", "--no-progress"} <= flags, name
        json_action = next(a for a in p._actions if "--json" in a.option_strings)
        assert json_action.nargs == 0, f"{name}: --json must be a switch"
        seed = {"bench": "--seeds", "merge": None, "calibrations": None}.get(name, "--seed")  # listings draw none
        if seed:
            assert seed in flags, name
        else:
            assert not {"--seed", "--seeds"} & flags, name


def test_readme_states_the_contract_and_the_digits_size():
    flat = re.sub(r"\s+", " ", TEXT)
    assert "`sigma`: a tensor of shape `(B,)`" in flat and "`extra_args`: a dict passed as keyword arguments" in flat
    assert "8x8-pixel" in flat
