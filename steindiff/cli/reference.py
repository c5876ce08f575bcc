"""The command-line reference as Markdown, from the parsers themselves (so it cannot drift from ``--help``).

    python -m steindiff.cli.reference > cli.md

The documentation site fills its CLI page with :func:`markdown` when it is built (``docs/_hooks/cli_reference.py``).
"""

from __future__ import annotations

import argparse
import os

from . import build_parser

__all__ = ["markdown", "subcommands"]


def subcommands(parser: argparse.ArgumentParser | None = None) -> dict[str, argparse.ArgumentParser]:
    """Every ``steindiff`` command's parser, by name, in the order ``steindiff --help`` lists them."""
    parser = parser or build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def markdown(width: int = 100) -> str:
    """One section per command: its one-line summary and its full ``--help`` text (``width`` columns)."""
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(width)  # argparse wraps to the terminal's width: fixed here
    try:
        parser = build_parser()
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        summary = {a.dest: a.help for a in sub._choices_actions}
        parts = []
        for name, p in subcommands(parser).items():
            p.prog = f"steindiff {name}"
            parts += [f"## steindiff {name}", "", f"{summary.get(name, '').capitalize()}.", "",
                      "```text", p.format_help().rstrip(), "```", ""]
        return "\n".join(parts)
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old


if __name__ == "__main__":  # pragma: no cover
    print(markdown())
