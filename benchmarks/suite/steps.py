"""Resume-safe steps: each writes its directory atomically, with a manifest of its config and input hashes last.

A step is *finished* when ``OUT/<key>/step.json`` exists, its fingerprint (kind, config, the hashes of its
inputs) equals the one asked for now, and every output file still has the hash recorded in it. Finished steps are
skipped; anything else is rebuilt in a temporary sibling directory that replaces ``OUT/<key>`` only on success,
so an interrupted or failed step leaves nothing that looks finished.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from slice2deploy.utils import atomic_directory, sha256_file

STEP_MANIFEST = "step.json"
STEP_FORMAT = 1


@dataclass
class Step:
    """One unit of the pipeline. ``run(tmp, inputs)`` fills ``tmp`` and returns a JSON-able result, where
    ``inputs`` maps each upstream key to its finished manifest (``directory`` included)."""

    key: str
    kind: str
    config: dict[str, Any]
    run: Callable[[Path, dict[str, dict]], dict]
    inputs: list[str] = field(default_factory=list)
    external: dict[str, str] = field(default_factory=dict)  # name -> hash of something outside the pipeline


@dataclass
class StepStatus:
    key: str
    status: str  # "ran" or "skipped"
    seconds: float


def digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def output_hashes(directory: Path) -> dict[str, str]:
    """sha256 of every file under ``directory`` except the step manifest (relative POSIX paths)."""
    return {p.relative_to(directory).as_posix(): sha256_file(p) for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name != STEP_MANIFEST}


def input_hashes(step: Step, finished: dict[str, dict]) -> dict[str, str]:
    """Hash of each upstream step's outputs (from its manifest) plus the step's external inputs."""
    upstream = {key: finished[key]["outputs_sha256"] for key in step.inputs}
    return {**upstream, **step.external}


def fingerprint(step: Step, inputs: dict[str, str]) -> str:
    return digest({"format": STEP_FORMAT, "kind": step.kind, "config": step.config, "inputs": inputs})


def finished_manifest(directory: Path, wanted: str) -> dict | None:
    """The manifest of a finished step with fingerprint ``wanted`` whose outputs are intact, else None."""
    path = directory / STEP_MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("fingerprint") != wanted or manifest.get("status") != "finished":
        return None
    if output_hashes(directory) != manifest.get("outputs"):
        return None
    return manifest


def _write_manifest(tmp: Path, step: Step, inputs: dict[str, str], wanted: str, result: dict,
                    seconds: float) -> dict:
    outputs = output_hashes(tmp)
    manifest = {"format": STEP_FORMAT, "key": step.key, "kind": step.kind, "status": "finished",
                "fingerprint": wanted, "config": step.config, "inputs": inputs, "outputs": outputs,
                "outputs_sha256": digest(outputs), "result": result, "seconds": round(seconds, 2),
                "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    (tmp / STEP_MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True, default=str))
    return manifest


def run_step(step: Step, out: Path, finished: dict[str, dict], force: bool = False) -> tuple[dict, StepStatus]:
    """Skip ``step`` if it is finished with the same fingerprint, else run it atomically; return its manifest."""
    directory = out / step.key
    inputs = input_hashes(step, finished)
    wanted = fingerprint(step, inputs)
    manifest = None if force else finished_manifest(directory, wanted)
    if manifest is not None:
        return {**manifest, "directory": str(directory)}, StepStatus(step.key, "skipped", 0.0)
    started = time.perf_counter()
    upstream = {key: finished[key] for key in step.inputs}
    with atomic_directory(directory, overwrite=True) as tmp:
        result = step.run(tmp, upstream)
        manifest = _write_manifest(tmp, step, inputs, wanted, result, time.perf_counter() - started)
    return {**manifest, "directory": str(directory)}, StepStatus(step.key, "ran", time.perf_counter() - started)


def run_steps(steps: list[Step], out: Path, force: bool = False, log: bool = True) -> tuple[dict, list[StepStatus]]:
    """Run (or skip) ``steps`` in order; return every manifest by key and the status of each step."""
    finished: dict[str, dict] = {}
    statuses = []
    for index, step in enumerate(steps, 1):
        if log:
            print(f"[{index}/{len(steps)}] {step.key} ...", file=sys.stderr, flush=True)
        finished[step.key], status = run_step(step, out, finished, force)
        statuses.append(status)
        if log:
            what = "finished earlier, skipped" if status.status == "skipped" else f"done in {status.seconds:.1f} s"
            print(f"[{index}/{len(steps)}] {step.key}: {what}", file=sys.stderr, flush=True)
    return finished, statuses
