"""``silu(gate) * up`` in one launch (server/kernels/silu_mul.py) against torch's ``F.silu(gate) * up``: within
one rounding in Triton's interpreter on the CPU (numpy's exp), bit for bit compiled on a GPU (``gpu`` tests)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

sm = pytest.importorskip("adapterd.server.kernels.silu_mul", reason="needs triton (the dev extra, Linux)")

# One unit in the last place, relative (bf16 keeps 8 significant bits, fp16 11); fp32: numpy's exp and torch's
ULP = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-22}


def _gate_up(rows: int, n: int, dtype: torch.dtype, device: str = "cpu", seed: int = 0):
    """gate and up as the two halves of one fused gate/up output ``[rows, 1, 2n]`` (strided views, as the
    decoder has them), values spread over [-12, 12] where silu bends and saturates."""
    g = torch.Generator().manual_seed(seed)
    fused = (torch.randn(rows, 1, 2 * n, generator=g) * 4).clamp(-12, 12).to(dtype).to(device)
    return fused[..., :n], fused[..., n:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows, n", [(2, 64), (3, 2500)])  # 2500: 3 column blocks, the last one partial
def test_matches_torch_within_one_rounding(dtype, rows, n):
    gate, up = _gate_up(rows, n, dtype, seed=rows)
    assert sm.fits(gate, up) and not gate.is_contiguous()
    out = sm.silu_mul(gate, up)
    ref = F.silu(gate) * up
    assert out.shape == ref.shape and out.dtype == dtype and out.is_contiguous()
    # two roundings (silu's, the product's), each of at most an ulp where numpy's exp differs from torch's
    tol = 2 * ULP[dtype] * ref.float().abs() + 1e-30
    assert ((out.float() - ref.float()).abs() <= tol).all(), (out.float() - ref.float()).abs().max()
    if dtype != torch.float32:  # and in half precision nearly all equal outright (fp32 shows the exp's ulps)
        assert (out == ref).float().mean() > 0.95


def test_fits_and_is_silu():
    gate, up = _gate_up(2, 64, torch.bfloat16)
    assert sm.fits(gate, up)
    assert not sm.fits(gate, up[..., :32])  # shapes differ
    assert not sm.fits(gate, up.float())  # dtypes differ
    assert not sm.fits(gate.int(), up.int())
    assert not sm.fits(gate[..., ::2], up[..., ::2])  # a column stride
    assert not sm.fits(gate.transpose(0, 1).expand(3, 2, 64), up.transpose(0, 1).expand(3, 2, 64))  # no row view
    from transformers.activations import ACT2FN

    assert sm.is_silu(ACT2FN["silu"]) and sm.is_silu(nn.SiLU()) and not sm.is_silu(ACT2FN["gelu"])


def test_empty_rows():
    gate, up = _gate_up(0, 64, torch.bfloat16)
    assert sm.silu_mul(gate, up).shape == (0, 1, 64)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gpu_bit_for_bit_with_torch(dtype):
    """Compiled: libdevice's expf and the IEEE division are torch's own, so every output is identical, at 1 and
    32 rows of a 7B model's MLP width, with infinities and a NaN among the inputs."""
    for rows in (1, 32):
        gate, up = _gate_up(rows, 11008, dtype, device="cuda", seed=rows)
        gate[0, 0, :4] = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0], dtype=dtype)
        out = sm.silu_mul(gate, up)
        torch.testing.assert_close(out, F.silu(gate) * up, rtol=0, atol=0, equal_nan=True)
