"""bench/grpc_floor.py as a user runs it: both servers answer, at once and after the wait, and the figures are
printed (timings are the bench's to report, not asserted)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent


def test_both_servers_answer_and_report():
    out = subprocess.run([sys.executable, str(REPO / "bench" / "grpc_floor.py"), "--calls", "20", "--wait", "2",
                          "--rounds", "1"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    for server in ("aio", "sync"):
        for when in ("at once", "after a 2 ms wait"):
            assert re.search(rf"^  {server}\s+{when}\s+p50\s+[\d.]+ ms  p90\s+[\d.]+ ms$", out.stdout, re.M), \
                out.stdout


def test_the_floor_part_of_gpu_core_sh(tmp_path):
    """``bash bench/gpu_core.sh floor`` as the device call runs it: the table lands in $OUT/grpc_floor.log."""
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "OUT": str(out), "FLOOR_ARGS": "--calls 10 --wait 1 --rounds 1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # python3 = this venv's
    done = subprocess.run(["bash", str(REPO / "bench" / "gpu_core.sh"), "floor"], capture_output=True, text=True,
                          timeout=300, env=env, cwd=REPO)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    log = (out / "grpc_floor.log").read_text()
    assert re.search(r"^  sync\s+after a 1 ms wait\s+p50", log, re.M), log
