"""The decode-attention evaluation (bench/attention_bench.py) on the CPU: every variant agrees with the fp32
reference written out in the bench, and a wrong attention does not."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))  # the bench's modules import each other as top-level modules

from attention_bench import SHAPES, Inputs, eager, within_tolerance  # noqa: E402


def test_every_variant_matches_the_reference_from_the_command_line():
    out = subprocess.run([sys.executable, str(REPO / "bench" / "attention_bench.py"), "--device", "cpu", "--shape",
                          "tiny", "--rows", "1,3", "--ctx", "40", "--bucket", "64"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    lines = re.findall(r"^tiny +rows=(\d) +(\w+) .* (ok|OVER TOLERANCE)$", out.stdout, re.M)
    assert sorted(lines) == sorted((r, v, "ok") for r in "13" for v in ("eager", "compiled", "flex")), out.stdout
    # liger-kernel's rotary is Triton: on this machine it is skipped, saying why, and the run still passes
    assert len(re.findall(r"^tiny +rows=\d +liger +skipped: .+$", out.stdout, re.M)) == 2, out.stdout


def test_the_reference_rejects_a_row_that_attends_past_its_length():
    x = Inputs(SHAPES["tiny"], rows=3, ctx=40, bucket=64, device="cpu", dtype=torch.float32)
    ref = x.reference()
    assert within_tolerance(eager(x, x.keys.clone(), x.values.clone()), ref)[0]
    x.mask.zero_()  # every entry visible, the padding past each row's position included
    assert not within_tolerance(eager(x, x.keys.clone(), x.values.clone()), ref)[0]


def test_split_variants_from_the_command_line():
    """``--variants ... split<N> fused<N> --chunks``: the engine's split-K attention (after the rotary + append
    kernel) at two chunk sizes, with the merge fused, and with ``fresh`` (the chunk read before the PDL wait), in
    Triton's interpreter, within tolerance of the
    reference; a split<N> whose N is not among --chunks is refused by name."""
    pytest.importorskip("triton")
    bench = [sys.executable, str(REPO / "bench" / "attention_bench.py"), "--device", "cpu", "--shape", "tiny",
             "--rows", "1,3", "--ctx", "40", "--bucket", "64"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}
    out = subprocess.run([*bench, "--variants", "eager,split16,split64,fused64,fresh64", "--chunks", "16,64"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    lines = re.findall(r"^tiny +rows=(\d) +(\w+) .* (ok|OVER TOLERANCE)$", out.stdout, re.M)
    variants = ("eager", "split16", "split64", "fused64", "fresh64")
    assert sorted(lines) == sorted((r, v, "ok") for r in "13" for v in variants), out.stdout
    bad = subprocess.run([*bench, "--variants", "split32", "--chunks", "64"], capture_output=True, text=True,
                         timeout=120, env=env)
    assert bad.returncode == 2 and "unknown split32" in bad.stderr
