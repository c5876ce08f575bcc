"""Command line: ``steindiff <command> [--json] ...``.

Exit codes: 0 success, 1 runtime failure, 2 usage (bad arguments or input detected before work),
130 interrupted (Ctrl-C).
Each command module defines ``add_parser(subparsers)``, which registers itself with ``func=run``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
from typing import Any, Iterator, Sequence

from .._version import __version__
from ..io import to_jsonable

__all__ = ["main", "UsageError", "usage_errors", "emit"]

COMMANDS = ["sample", "train", "calibrate", "calibrations", "diagnose", "demo", "bench", "dist", "pipeline", "export"]


class UsageError(Exception):
    """Bad arguments or input, detected before any work: exit code 2."""


@contextlib.contextmanager
def usage_errors(*kinds: type[BaseException]) -> Iterator[None]:
    """The exceptions ``kinds`` raised in the block become a :class:`UsageError` with their message."""
    try:
        yield
    except kinds as e:
        raise UsageError(str(e)) from None


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the commands' hand-wrapped descriptions and appends ``(default: ...)`` to every option
    with a default, unless its help already says ``(default:``."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (action.option_strings and default is not None and default is not False and default != argparse.SUPPRESS
                and "(default:" not in text and not isinstance(action, argparse._StoreConstAction)):
            shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else "%(default)s"
            text = f"{text} (default: {shown})" if text else f"(default: {shown})"
        return text

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and action.option_strings:  # options without help still show their default
            action = copy.copy(action)
            action.help = self._get_help_string(action) or None
        return super()._format_action(action)


def emit(args: argparse.Namespace, summary: dict[str, Any], text: str) -> None:
    """Print ``summary`` as JSON with ``--json``, else the human-readable ``text``."""
    if getattr(args, "json", False):
        print(json.dumps(to_jsonable(summary), indent=1))
    else:
        print(text)


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(prog="steindiff",
                                     description="Fast, stable few-step diffusion sampling with Stein stabilization.")
    parser.add_argument("--version", action="version", version=f"steindiff {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(f".{name}", __name__).add_parser(sub)
    for p in sub.choices.values():
        p.formatter_class = HelpFormatter
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # reported by the command's own parser, so the message names the command (exits 2)
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        sub.choices[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.func(args) or 0)
    except UsageError as e:
        print(f"steindiff {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C: the conventional 128 + SIGINT; a command may say what it kept
        print(f"steindiff {args.command}: interrupted" + (f"; {e}" if str(e) else ""), file=sys.stderr)
        return 130
    except Exception as e:  # runtime failure: one line, no traceback
        print(f"steindiff {args.command}: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
