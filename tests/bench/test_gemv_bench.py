"""The one-row matmul bench (bench/gemv_bench.py) on the CPU, from the command line: every method's output is
checked against the fp64 product of its weights before it is timed, and a wrong product fails the run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = [sys.executable, str(REPO / "bench" / "gemv_bench.py"), "--device", "cpu", "--no-record"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}


def test_every_method_within_tolerance_from_the_command_line():
    pytest.importorskip("triton")
    out = subprocess.run([*BENCH, "--methods", "cublas,gemv+pdl,int8"], capture_output=True, text=True,
                         timeout=600, env=ENV)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    lines = re.findall(r"^(\d+x\d+) (\S+) +alone .* cpu$", out.stdout, re.M)
    assert sorted(lines) == sorted((s, m) for s in ("48x64", "40x96") for m in ("cublas", "gemv+pdl", "int8"))


def test_unknown_method_is_refused_by_name():
    bad = subprocess.run([*BENCH, "--methods", "gemv,cutlass"], capture_output=True, text=True, timeout=120, env=ENV)
    assert bad.returncode == 2 and "unknown --methods cutlass" in bad.stderr


def test_a_wrong_product_fails_the_run(monkeypatch):
    """The check is not vacuous: a GEMV that drops the last weight column is over the tolerance."""
    pytest.importorskip("triton")
    sys.path.insert(0, str(REPO / "bench"))
    import gemv_bench

    from adapterd.server.kernels import dense_gemv

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    real = dense_gemv.gemv
    monkeypatch.setattr(dense_gemv, "gemv", lambda x, w, b=None, config=None: real(x[..., :-8], w[:, :-8], b))
    assert gemv_bench.main(["--device", "cpu", "--no-record", "--methods", "gemv"]) == 1
