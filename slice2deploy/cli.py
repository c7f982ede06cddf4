"""``slice2deploy`` command line: the one place that composes the layers.

The core (:mod:`slice2deploy.commands`), the exporters (:mod:`exporters.cli`) and the benchmarks
(:mod:`benchmarks.cli`) each register their own subcommands; each subcommand builds a config and calls one library
function. This is the only module of ``slice2deploy`` that imports the layers above it.
"""

from __future__ import annotations

import argparse
import sys

from benchmarks import cli as benchmarks_cli
from exporters import cli as exporters_cli

from . import commands
from .utils import Slice2DeployError, missing_dependency_message


def _command(argv: list[str]) -> str | None:
    """The subcommand named in ``argv`` (the top-level parser has no options but --help)."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The full parser; ``argv`` (default: this process's) decides which lazily built subcommands are built."""
    parser = argparse.ArgumentParser(prog="slice2deploy", description="Slice LLMs (SliceGPT) and deploy them.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_commands(sub)
    exporters_cli.add_commands(sub, selected=_command(sys.argv[1:] if argv is None else argv))
    benchmarks_cli.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser(argv).parse_args(argv)
    try:
        return args.handler(args)
    except Slice2DeployError as error:
        print(f"slice2deploy {args.command}: error: {error}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as error:  # an optional dependency imported lazily deep inside a command
        message = missing_dependency_message(error.name or "")
        if message is None:
            raise
        print(f"slice2deploy {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
