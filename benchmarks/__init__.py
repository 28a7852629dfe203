"""Benchmarks: each prints a short summary and a JSON report (see the README's Benchmarks)."""

from __future__ import annotations

import json
from pathlib import Path


def emit(report: dict, path: str | None) -> None:
    """Print the JSON report, and write it to ``path`` when given."""
    text = json.dumps(report, indent=1)
    print(text)
    if path:
        Path(path).write_text(text + "\n")
