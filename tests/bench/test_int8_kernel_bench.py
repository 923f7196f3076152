"""The int8 kernel benchmark's CPU variant (tiny shapes, Triton interpreter) runs end to end and prints its
table; it never writes RESULTS.md on the CPU. Timings are not asserted."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent.parent


def test_int8_kernel_bench_cpu(tmp_path):
    pytest.importorskip("triton")
    results = tmp_path / "RESULTS.md"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(REPO / "bench" / "int8_kernel_bench.py"), "--device", "cpu",
                          "--rows", "1,5", "--iters", "1", "--results", str(results)],
                         capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    table = [line for line in out.stdout.splitlines() if line.startswith("| ") and "cpu" in line]
    assert len(table) == 4  # 2 shapes x 2 row counts
    assert not results.exists()
