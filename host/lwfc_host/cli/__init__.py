"""The ``lwfc`` command line.

Each subcommand module of this package (codec, design, serve, evaluate, convert) exposes
``register(subparsers)``, which adds its subcommands and sets ``func`` on each parser. Those modules
import nothing heavy at module level, so ``lwfc --help`` stays fast; the work functions import torch,
constriction, ... when they run. Bad input raises ``CommandError`` (``lwfc_host.cli.errors``).
"""

from __future__ import annotations

import argparse
import sys

from lwfc_host.cli.errors import CommandError

__all__ = ["CommandError", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    # imported here, not at the top: the subcommand modules import CommandError while this package is
    # still initialising otherwise
    from lwfc_host.cli import codec, convert, design, evaluate, serve

    parser = argparse.ArgumentParser(
        prog="lwfc",
        description="Lightweight feature codec for split neural networks: edge encode, host decode.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for module in (codec, design, serve, evaluate, convert):
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except CommandError as exc:
        print(f"lwfc {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return int(result or 0)
