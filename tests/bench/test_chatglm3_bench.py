"""The ChatGLM3 benchmark's CPU path on a tiny shape: it writes THUDM's layout, converts in a measured process
(peak growth reported beside the largest tensor), converts both finetune_demo adapters and serves them mixed.
The 6B-shape int8 run is for the GPU machine; no absolute number is asserted here."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent


def test_chatglm3_bench_tiny(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(REPO / "bench" / "chatglm3_bench.py"), "--shape", "tiny",
                          "--quantizations", "none", "--ctx", "32", "--new", "6", "--batch", "6",
                          "--work", str(tmp_path), "--no-record"], capture_output=True, text=True, timeout=600,
                         env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    growth = re.search(r"peak RSS growth (\d+) MB \(largest tensor (\d+) MB\)", text)
    assert growth, text
    assert int(growth[1]) < 100, "converting a 3 MB model must not hold much more than a tensor"
    assert "adapter ptuning: PREFIX_TUNING, 128 virtual tokens" in text
    assert "adapter lora: LORA, r 8" in text
    assert re.search(r"none: batch-1 [\d.]+ ms/token at ctx 32; batch-6 base [\d.]+ tok/s, base\+prefix\+LoRA "
                     r"[\d.]+ tok/s; TTFT [\d.]+ ms", text), text
