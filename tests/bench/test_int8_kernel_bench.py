"""The int8 kernel benchmark's CPU variant (tiny shapes, Triton interpreter) runs end to end and prints its
tables; it never writes RESULTS.md on the CPU. Timings are not asserted; the library options' weight
convention (bitsandbytes' ``CB`` rows, ``SCB / 127`` scales) and their tolerance check are."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(REPO / "bench"))  # the bench's modules import each other as top-level modules

from int8_kernel_bench import within_tolerance  # noqa: E402
from int8_library import BUILDERS, TOLERANCE, Unavailable  # noqa: E402


def test_int8_kernel_bench_cpu(tmp_path):
    pytest.importorskip("triton")
    results = tmp_path / "RESULTS.md"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(REPO / "bench" / "int8_kernel_bench.py"), "--device", "cpu",
                          "--rows", "1,5", "--iters", "1", "--results", str(results)],
                         capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]  # 1 would mean a method OVER tolerance
    table = [line.split(" | ") for line in out.stdout.splitlines() if line.startswith("| ") and "cpu" in line]
    kernel, library = table[:4], table[4:]
    assert len(kernel) == 4 and len(library) == 4  # 2 shapes x 2 row counts, in each table
    for row in library:
        shape, int8pack_us, within = row[3], row[6], row[-1].rstrip(" |")
        # K = 64 runs; K = 100 is refused on the CPU (PyTorch's kernel reads past rows not a multiple of 16)
        assert (int8pack_us == "n/a") == (shape == "40x100"), row
        assert within == "yes", row
    assert "int8pack: n/a (torch._weight_int8pack_mm on the CPU needs K % 16 == 0 (K = 100))" in out.stdout
    assert not results.exists()


def bnb_like(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """bitsandbytes' layout for a random weight: CB int8 [n, k] (each row scaled to +-127), SCB float32 [n] (the
    row's absmax), and the dequantized weight CB * SCB / 127 in fp32."""
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(n + k)) * 0.02
    scb = w.abs().amax(1)
    cb = torch.round(w * (127 / scb[:, None])).to(torch.int8)
    return cb, scb, cb.float() * (scb[:, None] / 127)


@pytest.mark.parametrize("method", sorted(BUILDERS))
def test_library_method_computes_the_dequantized_product(method):
    """Each library option, fed bitsandbytes' CB and SCB as is, computes x @ (CB * SCB / 127)^T within the bench's
    stated tolerance (bf16 activations and outputs), at decode row counts."""
    cb, scb, w = bnb_like(48, 64)
    try:
        call = BUILDERS[method](cb, scb, torch.bfloat16, None)
    except Unavailable as exc:
        pytest.skip(str(exc))  # torchao is a bench-only import, absent from the CPU environment
    for m in (1, 8):
        x = torch.randn(m, 64, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16)
        ref = x.float() @ w.T
        y = call(x)
        assert y.dtype == torch.bfloat16 and y.shape == (m, 48)
        assert (y.float() - ref).abs().max() <= TOLERANCE * ref.abs().max()


def test_int8pack_is_refused_where_the_cpu_kernel_is_wrong():
    cb, scb, _ = bnb_like(40, 100)
    with pytest.raises(Unavailable, match="K % 16 == 0"):
        BUILDERS["int8pack"](cb, scb, torch.bfloat16, None)


def test_within_tolerance_flags_a_wrong_method():
    result = {"ref_max": 2.0, "ours": {"err": 0.01}, "int8pack": {"err": 0.5}, "torchao": {"na": "import torchao"},
              "bnb": {"err": 1.0}}  # bitsandbytes rounds activations: reported, never held to the tolerance
    assert within_tolerance(result) == {"ours": True, "int8pack": False}
