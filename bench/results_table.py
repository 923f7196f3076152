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


def git_commit(*dirty_paths: str) -> str:
    """The short commit of this checkout, ``-dirty`` when any of ``dirty_paths`` has uncommitted changes.
    Where there is no git checkout (the device machine gets a copy of the tree), ``$ADAPTERD_COMMIT``."""
    import os
    import subprocess

    if os.environ.get("ADAPTERD_COMMIT"):  # set by whoever copied the tree (the device copy's .git may be stale)
        return os.environ["ADAPTERD_COMMIT"]
    repo = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = dirty_paths and subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--", *dirty_paths],
                                               capture_output=True, text=True).stdout.strip()
        return out + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("ADAPTERD_COMMIT", "unknown")
