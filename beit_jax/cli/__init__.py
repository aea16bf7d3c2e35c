"""The `beit-jax` command: classify | extract | segment | convert | finetune | finetune-seg | push | bench.

One command layer: each sub-command is a module here with `register(subparsers)` (its flags, built
from the shared helpers in `options.py`) and a `run(args)`. Errors a user can act on print one
`error: ...` line and exit 2. Nothing in the library imports this package.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from typing import List, Optional

from . import bench, classify, convert, extract, finetune, finetune_seg, push, segment
from .options import report_errors, to_cli

COMMANDS = (classify, extract, segment, convert, finetune, finetune_seg, push, bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="beit-jax", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Library warnings as the command's own `warning: ...` lines (no source file and line)."""
    print(f"warning: {to_cli(message)}", file=sys.stderr, flush=True)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        return report_errors(args.run, args)
