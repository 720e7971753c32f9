"""The ``lwfc`` command line.

Each subcommand lives next to the code it drives: a module listed in ``COMMAND_MODULES`` exposes
``register(subparsers)``, which adds its subcommands and sets ``func`` on each parser. Registration
imports nothing heavy, so ``lwfc --help`` stays fast; the work functions import torch, constriction, ...
when they run.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = [
    "lwfc_host.cli.codec",
    "lwfc_host.cli.design",
    "lwfc_host.cli.serve",
    "lwfc_host.cli.evaluate",
    "lwfc_host.cli.convert",
]


class CommandError(Exception):
    """An error the command line reports as one line and exit status 2 (bad input, not a bug)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lwfc",
        description="Lightweight feature codec for split neural networks: edge encode, host decode.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:  # the module exists but one of its imports is missing: a real error
                raise
            continue
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


if __name__ == "__main__":
    sys.exit(main())
