"""Compatibility path for ``slice2deploy.cli``: the build-engine command now lives in :mod:`exporters.tensorrt.cli`."""

from .tensorrt.cli import EXIT_NO_TENSORRT, add_build_engine_parser, add_commands, run_build_engine

__all__ = ["EXIT_NO_TENSORRT", "add_build_engine_parser", "add_commands", "run_build_engine"]
