"""Where the one-off benchmark scripts (``python -m benchmarks.X``) write their results: ``benchmarks/results/``."""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent.parent / "results"


NOTES_HEADING = "## Notes"  # sections of a results file written by hand start with this and survive a rewrite


def with_hand_notes(path: Path, report: str) -> str:
    """``report`` followed by the hand-written ``## Notes...`` sections of the existing file at ``path`` (if any)."""
    if not path.is_file():
        return report
    text = path.read_text()
    start = text.find("\n" + NOTES_HEADING)
    return report if start < 0 else report.rstrip("\n") + "\n" + text[start:]


def write_results(name: str, records: list[dict], report: str) -> None:
    """``results/<name>.jsonl`` (one record per line) and ``results/<name>.md``, each written atomically; the
    hand-written notes of an existing ``.md`` are kept after the new table."""
    from slice2deploy.utils import atomic_write_text

    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_text(RESULTS / f"{name}.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    atomic_write_text(RESULTS / f"{name}.md", with_hand_notes(RESULTS / f"{name}.md", report))
    print(report)
