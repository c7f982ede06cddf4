"""Where the one-off benchmark scripts (``python -m benchmarks.X``) write their results: ``benchmarks/results/``."""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent.parent / "results"


def write_results(name: str, records: list[dict], report: str) -> None:
    """``results/<name>.jsonl`` (one record per line) and ``results/<name>.md``, each written atomically."""
    from slice2deploy.utils import atomic_write_text

    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_text(RESULTS / f"{name}.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    atomic_write_text(RESULTS / f"{name}.md", report)
    print(report)
