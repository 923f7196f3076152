"""bench/ipc_latency.py as a user runs it: both ways deliver every frame and the figures are printed (timings are
not asserted: they are the bench's to report, on the machine it runs on)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent


def test_both_ways_run_and_report():
    out = subprocess.run([sys.executable, str(REPO / "bench" / "ipc_latency.py"), "--frames", "60", "--gap", "1",
                          "--rounds", "1"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    assert re.search(r"zmq PUSH/PULL \(ipc://\)\s+p50\s+\d+ us", out.stdout), out.stdout
    assert re.search(r"core/frames.py \(Unix socket\)\s+p50\s+\d+ us", out.stdout), out.stdout
    assert "saved per crossing" in out.stdout
