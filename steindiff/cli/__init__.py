"""Command line: ``steindiff <command> [--json] ...``.

Exit codes: 0 success, 1 runtime failure, 2 usage (bad arguments or input detected before work).
Each command module defines ``add_parser(subparsers)``, which registers itself with ``func=run``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

from ..io import to_jsonable

__all__ = ["main", "UsageError", "emit"]

COMMANDS = ["sample", "train", "calibrate", "diagnose", "demo", "bench", "dist"]


class UsageError(Exception):
    """Bad arguments or input, detected before any work: exit code 2."""


def emit(args: argparse.Namespace, summary: dict[str, Any], text: str) -> None:
    """Print ``summary`` as JSON with ``--json``, else the human-readable ``text``."""
    if getattr(args, "json", False):
        print(json.dumps(to_jsonable(summary), indent=1))
    else:
        print(text)


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(prog="steindiff", description="Fast, stable few-step diffusion sampling with Stein stabilization.")
    parser.add_argument("--version", action="version", version=f"steindiff {__import__('steindiff').__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(f".{name}", __name__).add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UsageError as e:
        print(f"steindiff {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"steindiff {args.command}: interrupted", file=sys.stderr)
        return 1
    except Exception as e:  # runtime failure: one line, no traceback
        print(f"steindiff {args.command}: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
