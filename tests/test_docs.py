"""The documentation site: every page is in the navigation or explicitly left out of it, every result file is
in the results index, and the command-line page is made from the parsers (so it cannot drift from --help).
CI builds the site itself with `mkdocs build --strict` (broken links and references fail there)."""

from __future__ import annotations

import fnmatch
import importlib.util
import re
from pathlib import Path

import pytest

from steindiff.cli.reference import markdown, subcommands

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
CONFIG = yaml.safe_load((ROOT / "mkdocs.yml").read_text())


def _nav_pages(nav) -> list[str]:
    out = []
    for entry in nav:
        for v in (entry.values() if isinstance(entry, dict) else [entry]):
            out += _nav_pages(v) if isinstance(v, list) else [v]
    return out


def _matches(path: str, patterns: str) -> bool:
    """``path`` (relative to docs/) matches one of the gitignore-style lines of a mkdocs setting."""
    for pat in filter(None, (p.strip() for p in (patterns or "").splitlines())):
        pat = pat.lstrip("/")
        if pat.endswith("/") and (path + "/").startswith(pat) or fnmatch.fnmatch(path, pat):
            return True
    return False


def test_every_page_is_in_the_navigation_or_left_out_on_purpose():
    nav = _nav_pages(CONFIG["nav"])
    assert len(nav) == len(set(nav))
    missing = [p for p in nav if not (DOCS / p).is_file()]
    assert not missing, f"the navigation names pages that do not exist: {missing}"
    pages = [p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")]
    stray = [p for p in pages if p not in nav and not _matches(p, CONFIG.get("not_in_nav"))
             and not _matches(p, CONFIG.get("exclude_docs"))]
    assert not stray, f"pages neither in mkdocs.yml's nav nor in its not_in_nav: {stray}"


def test_not_in_nav_leaves_out_only_result_reports():
    nav = set(_nav_pages(CONFIG["nav"]))
    left_out = [p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")
                if p.relative_to(DOCS).as_posix() not in nav and _matches(p.relative_to(DOCS).as_posix(),
                                                                          CONFIG["not_in_nav"])]
    assert left_out and all(p.startswith("results/") for p in left_out)


def _expand(name: str) -> list[str]:
    """Shell brace expansion of one name: ``a.{json,md}`` -> ``a.json``, ``a.md``."""
    m = re.search(r"\{([^{}]*)\}", name)
    if not m:
        return [name]
    return [x for part in m.group(1).split(",") for x in _expand(name[:m.start()] + part + name[m.end():])]


def test_every_result_file_is_in_the_results_index():
    index = (DOCS / "results" / "README.md").read_text()
    named = {x.rstrip("/") for span in re.findall(r"`([^`\s]+)`", index) for x in _expand(span)}
    for entry in sorted((DOCS / "results").iterdir()):
        if entry.name != "README.md" and entry.name != "plots":
            assert entry.name in named, f"docs/results/{entry.name} is not in docs/results/README.md"
    for entry in sorted((DOCS / "results" / "plots").iterdir()):
        assert f"plots/{entry.name}" in named, f"docs/results/plots/{entry.name} is not in docs/results/README.md"


def test_cli_page_is_every_commands_help():
    text = markdown()
    for name, parser in subcommands().items():
        parser.prog = f"steindiff {name}"
        assert f"## steindiff {name}\n" in text
        for action in parser._actions:
            for flag in action.option_strings:
                assert flag in text, (name, flag)
    hook = importlib.util.spec_from_file_location("cli_reference", DOCS / "_hooks" / "cli_reference.py")
    module = importlib.util.module_from_spec(hook)
    hook.loader.exec_module(module)
    page = (DOCS / "cli.md").read_text()
    assert module.MARKER in page

    class Page:
        class file:
            src_uri = "cli.md"

    filled = module.on_page_markdown(page, Page)
    assert module.MARKER not in filled and text in filled


def test_docs_extra_and_ci_build_the_site():
    pyproject = (ROOT / "pyproject.toml").read_text()
    for package in ("mkdocs==", "mkdocs-material==", "mkdocstrings[python]=="):
        assert package in pyproject
    assert "mkdocs build --strict" in (ROOT / ".ci" / "run").read_text()
