"""Appending rows to a section of bench/RESULTS.md (shared by the benchmarks; run them as ``python bench/X.py``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def append_to_section(results: Path, section: str, intro: str, columns: Sequence[str],
                      rows: Sequence[dict[str, str]]) -> list[str]:
    """Add ``rows`` at the end of ``section``'s table, creating the section (heading, ``intro``, table
    header) at the end of the file when it is not there yet. Returns the lines added."""
    lines = results.read_text().splitlines() if results.exists() else ["# Benchmark results", ""]
    if section not in lines:
        lines += ([""] if lines and lines[-1] else []) + [
            section, "", intro, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    at = lines.index(section) + 1
    while at < len(lines) and not lines[at].startswith("|"):
        at += 1
    while at < len(lines) and lines[at].startswith("|"):
        at += 1
    new = ["| " + " | ".join(row[c] for c in columns) + " |" for row in rows]
    lines[at:at] = new
    results.write_text("\n".join(lines).strip("\n") + "\n")
    return new
