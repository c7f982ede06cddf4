"""The README and ``--help`` agree: every flag a documented command uses exists, and every flag has help text."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from slice2deploy.cli import build_parser

README = Path(__file__).resolve().parent.parent / "README.md"
COMMANDS = ("slice", "eval", "generate", "info", "recover", "export", "quantize", "build-engine", "pipeline")


def _subparser(words: list[str]) -> argparse.ArgumentParser:
    parser = build_parser(words[:1])
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    chosen = sub.choices[words[0]]
    if words[0] == "export":
        inner = next(a for a in chosen._actions if isinstance(a, argparse._SubParsersAction))
        chosen = inner.choices[words[1]]
    return chosen


def _documented_commands() -> list[list[str]]:
    """Every ``slice2deploy ...`` command in the README's code blocks, continuation lines joined, comments dropped."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                words = shlex.split(part.split(" #")[0])
                if words[:1] == ["slice2deploy"] and len(words) > 1:
                    commands.append(words[1:])
    return commands


def test_the_readme_documents_commands():
    assert len(_documented_commands()) >= 10


@pytest.mark.parametrize("words", _documented_commands(), ids=lambda words: " ".join(words[:2]))
def test_every_documented_flag_exists(words):
    parser = _subparser(words)
    known = {option for action in parser._actions for option in action.option_strings}
    flags = {word.split("=")[0] for word in words if word.startswith("-")}
    assert flags <= known, f"README uses {sorted(flags - known)} which `slice2deploy {' '.join(words[:2])}` lacks"


@pytest.mark.parametrize("command", COMMANDS)
def test_every_flag_has_help_text(command):
    parser = _subparser([command, "onnx"] if command == "export" else [command])
    missing = [action.option_strings[-1] for action in parser._actions
               if action.option_strings and not action.help and "-h" not in action.option_strings]
    assert not missing, f"{command}: flags without help text: {missing}"
