"""The benchmarks' subcommand: ``pipeline`` (a YAML recipe, slice to report).

:func:`add_commands` registers it on the ``slice2deploy`` parser that :mod:`slice2deploy.cli` composes.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_commands(subparsers) -> None:
    """Register ``pipeline``."""
    _pipeline_parser(subparsers)


def _pipeline_parser(sub) -> None:
    parser = sub.add_parser("pipeline", help="run a YAML recipe: slice, eval, export, quantize, bench, report",
                            description="Chain slice -> eval -> export -> quantize -> (engine) -> bench -> report "
                                        "as one YAML recipe says (see recipes/smollm2-cpu.yaml). Each step writes "
                                        "OUT/<step>/ atomically with a manifest of its config and input hashes; a "
                                        "rerun skips the steps that are finished and still match.")
    parser.add_argument("recipe", help="recipe file, e.g. recipes/smollm2-cpu.yaml")
    parser.add_argument("-o", "--output", required=True, help="output directory (created; reused on reruns)")
    parser.add_argument("--force", action="store_true", help="rerun every step even if it is finished")
    parser.add_argument("--build-only", action="store_true",
                        help="stop before the timing steps (build now, time later on a quiet machine)")
    parser.set_defaults(handler=_run_pipeline)


def _run_pipeline(args: argparse.Namespace) -> int:
    from .pipeline import run_pipeline  # its recipe checks import the exporters

    statuses = run_pipeline(args.recipe, args.output, force=args.force, build_only=args.build_only)
    ran = [s for s in statuses if s.status == "ran"]
    print(f"{len(ran)} step(s) ran, {len(statuses) - len(ran)} skipped as finished; report: "
          f"{Path(args.output) / 'report' / 'report.md'}")
    return 0
