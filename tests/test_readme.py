"""README's "How it works" is the map a newcomer reads the tree with: every path it names exists, and every
module and folder of the daemon's package (server/) is on it, so that the map and the tree cannot drift."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _tree_block() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## How it works", 1)[1]
    return section.split("```", 2)[1].splitlines()


def _named_paths() -> set[str]:
    """The paths the tree block names: top-level entries at column 0, the daemon's files indented below
    ``server/``; continuation lines (only text, deeper) name nothing."""
    named, top = set(), ""
    for line in _tree_block():
        match = re.match(r"^( *)(\S+)", line)
        if not match or "/" not in match[2] and not match[2].endswith(".py"):
            continue
        indent, path = len(match[1]), match[2]
        if indent == 0:
            top = path
            named.add(path.rstrip("/"))
        elif indent == 2 and top:
            named.add(top + path.rstrip("/"))
    return named


def test_every_path_in_how_it_works_exists():
    missing = sorted(p for p in _named_paths() if not (REPO / p).exists())
    assert not missing, f"README's How it works names paths that do not exist: {missing}"


def test_every_part_of_the_daemon_is_on_the_map():
    named = _named_paths()
    parts = {f"server/{p.name}" for p in (REPO / "server").iterdir()
             if (p.suffix == ".py" and p.name != "__init__.py") or (p / "__init__.py").is_file()}
    # a sub-package is on the map by its folder, or by every one of its modules
    unmapped = sorted(p for p in parts if p not in named and not (
        (REPO / p).is_dir() and all(f"{p}/{m.name}" in named
                                    for m in (REPO / p).glob("*.py") if m.name != "__init__.py")))
    assert not unmapped, f"README's How it works leaves out: {unmapped}"
    assert {"proto/adapterd/v1", "cli", "common", "server", "trainer", "clients"} <= named
