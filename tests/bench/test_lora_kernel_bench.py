"""The LoRA kernel benchmark's CPU variant (tiny shapes, Triton interpreter) runs end to end, both modes; in
``--qkv`` mode the grouped launch must agree bit for bit with three separate calls and with the fp32
reference (the check the GPU run repeats at Llama shapes). Timings are not asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent.parent


def _run(tmp_path: Path, *args: str) -> dict:
    pytest.importorskip("triton")
    out_json = tmp_path / "out.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(REPO / "bench" / "lora_kernel_bench.py"), "--device", "cpu",
                          "--iters", "1", "--json-out", str(out_json), *args],
                         capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out_json.read_text())


def test_qkv_mode_grouped_equals_separate(tmp_path):
    results = _run(tmp_path, "--qkv", "64:96,32,32", "100:70,40", "--rows", "1,3")["results"]
    assert [(r["shape"], r["rows"]) for r in results] == [("64:96,32,32", 1), ("64:96,32,32", 3),
                                                          ("100:70,40", 1), ("100:70,40", 3)]
    for r in results:
        assert r["identical"], r
        assert r["separate"]["err"] == r["grouped"]["err"] < 0.05  # bf16 outputs of order one, one rounding


def test_single_layer_mode(tmp_path):
    results = _run(tmp_path, "--rows", "2")["results"]
    assert len(results) == 1 and {"base", "dense", "gathered", "kernel"} <= results[0].keys()
