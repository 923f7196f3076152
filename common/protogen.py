"""Generate the Python stubs from ``proto/``: ``python -m adapterd.common.protogen [--check]``.

The stubs live beside the contract in ``proto/adapterd/v1`` and are installed as ``adapterd.v1``.
``--check`` regenerates into a temporary folder and exits 1 when the committed stubs differ (CI runs it).
"""

from __future__ import annotations

import argparse
import difflib
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO / "proto"
PROTO_FILES = ["adapterd/v1/adapterd.proto"]
GENERATED = ["adapterd_pb2.py", "adapterd_pb2.pyi", "adapterd_pb2_grpc.py"]


def generate(out_root: Path) -> None:
    from grpc_tools import protoc

    include = str(Path(protoc.__file__).parent / "_proto")
    for proto in PROTO_FILES:
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={out_root}",
            f"--pyi_out={out_root}",
            f"--grpc_python_out={out_root}",
            str(PROTO_ROOT / proto),
        ]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed on {proto}")


def _print_diff(committed: Path, fresh: Path, max_lines: int = 40) -> None:
    """The first lines of what regenerating would change: a generator release shows up as its version line."""
    old = committed.read_text().splitlines(keepends=True) if committed.exists() else []
    diff = list(difflib.unified_diff(old, fresh.read_text().splitlines(keepends=True), str(committed), "regenerated"))
    sys.stdout.writelines(diff[:max_lines])
    if len(diff) > max_lines:
        print(f"... {len(diff) - max_lines} more diff lines")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the committed stubs are stale")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        stale = []
        for name in GENERATED:
            fresh = Path(tmp) / "adapterd" / "v1" / name
            committed = PROTO_ROOT / "adapterd" / "v1" / name
            if args.check:
                if not committed.exists() or not filecmp.cmp(fresh, committed, shallow=False):
                    stale.append(str(committed.relative_to(REPO)))
                    _print_diff(committed, fresh)
            else:
                shutil.copyfile(fresh, committed)
    if stale:
        print("stale generated stubs (run `python -m adapterd.common.protogen`):", *stale, sep="\n  ")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
