"""Where every bench script writes: <out>/<date>-<subject>[-<kind>].json (and .md when it has a table)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def save(report: dict, out: str | Path, subject: str, kind: str = "", markdown: str | None = None) -> Path:
    """Write the report (and its table); `subject` is the device or machine, named as results files name it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    slug = subject.replace(" ", "-").lower()
    stem = f"{report.get('date', dt.date.today().isoformat())}-{slug}{f'-{kind}' if kind else ''}"
    path = out / f"{stem}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    if markdown is not None:
        (out / f"{stem}.md").write_text(markdown + "\n")
    return path
