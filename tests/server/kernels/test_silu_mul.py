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


def _glu_deltas(rows: int, n: int, slots: list[int], dtype: torch.dtype, device: str = "cpu", rank: int = 3,
                splits: int = 4) -> sm.GluDeltas:
    """Gate's and up's pending LoRA deltas: B tables [32, 3 slots, n] each (slot 0 all zeros, as the slot table
    keeps it), one shrink's partials [2, splits, rows, 16] (NaN on slot-0 rows: never written there)."""
    from adapterd.server.kernels.lora_bgmv import LoraPartials

    g = torch.Generator().manual_seed(7)
    gate_b, up_b = ((torch.randn(32, 3, n, generator=g) * 0.3).to(dtype) for _ in range(2))
    gate_b[:, 0] = up_b[:, 0] = 0
    p = torch.randn(2, splits, rows, 16, generator=g) * 0.3  # deltas of about the activations' size
    slot_t = torch.tensor(slots)
    p[:, :, slot_t == 0] = float("nan")
    return sm.GluDeltas(LoraPartials(p.to(device), slot_t.to(device), rank), gate_b.to(device), up_b.to(device))


def _with_deltas_by_hand(gate: torch.Tensor, up: torch.Tensor, deltas: sm.GluDeltas):
    """gate and up plus each row's delta in fp32, each rounded once to the dtype (rows on slot 0 untouched)."""
    p, rank = deltas.partials.p, deltas.partials.rank
    gate, up = gate.clone(), up.clone()
    for i, slot in enumerate(deltas.partials.slots.tolist()):
        if slot:
            for t, member, b in ((gate, 0, deltas.gate_b), (up, 1, deltas.up_b)):
                t[i] = (t[i].float() + p[member, :, i, :rank].sum(0) @ b[:rank, slot].float()).to(t.dtype)
    return gate, up


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adds_gate_and_ups_lora_deltas_first(dtype):
    """With ``GluDeltas`` (gate and up's one shrink done): each row's deltas added to gate and up as the expand adds
    them, then the SiLU product, in one launch, over several column blocks (the last partial); base rows (slot 0)
    get none and their unwritten partials (NaN here) reach nothing; gate and up are left as they were. In fp32 it
    equals the expand's own launch followed by the plain kernel bit for bit (the interpreter sums both alike)."""
    from adapterd.server.kernels.lora_bgmv import lora_expand_

    rows, n = 4, 600
    gate, up = _gate_up(rows, n, dtype, seed=3)
    deltas = _glu_deltas(rows, n, [1, 0, 2, 1], dtype)
    before = gate.clone(), up.clone()
    assert sm.fits(gate, up) and deltas.fits(gate, up)
    out = sm.silu_mul(gate, up, deltas)
    assert torch.equal(gate, before[0]) and torch.equal(up, before[1]) and torch.isfinite(out).all()
    want = sm.silu_mul(*_with_deltas_by_hand(gate, up, deltas))
    if dtype == torch.float32:
        g2, u2 = gate.clone(), up.clone()
        lora_expand_([g2.view(rows, n), u2.view(rows, n)], deltas.partials, [deltas.gate_b, deltas.up_b])
        assert torch.equal(out, sm.silu_mul(g2, u2))
        torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)  # another summation order: fp32 ulps
    else:  # one rounding of each delta's fp32 sum may land an ulp away, and the product moves with it
        torch.testing.assert_close(out.float(), want.float(), rtol=4 * ULP[dtype], atol=1e-6)
        assert (out == want).float().mean() > 0.95
    assert torch.equal(out[1], sm.silu_mul(gate[1:2], up[1:2])[0])  # the base row: the plain product


def test_deltas_that_do_not_fit():
    gate, up = _gate_up(3, 64, torch.float32)
    assert _glu_deltas(3, 64, [1, 0, 2], torch.float32).fits(gate, up)
    assert not _glu_deltas(3, 96, [1, 0, 2], torch.float32).fits(gate, up)  # another width
    assert not _glu_deltas(2, 64, [1, 0], torch.float32).fits(gate, up)  # other rows
    one = _glu_deltas(3, 64, [1, 0, 2], torch.float32)
    assert not sm.GluDeltas(type(one.partials)(one.partials.p[:1].contiguous(), one.partials.slots, 3), one.gate_b,
                            one.up_b).fits(gate, up)  # one member only


@pytest.mark.sm90
def test_compiles_for_hopper_with_lora(monkeypatch, tmp_path):
    """No GPU here, but Triton's own ptxas: with the deltas (rank 16, a 7B MLP's split count), bf16, under PDL, the
    kernel compiles for sm_90 with B's tiles loaded before the wait, 16 bytes a load, no register spilled and no
    barrier for the sums over the rank."""
    import re
    import subprocess
    from pathlib import Path

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    sm._triton()
    signature = {**dict.fromkeys(("g_ptr", "u_ptr", "o_ptr", "bg_ptr", "bu_ptr"), "*bf16"), "p_ptr": "*fp32",
                 "slot_ptr": "*i64", **dict.fromkeys(("N", "stride_gr", "stride_ur", "stride_or", "rank", "splits",
                                                      "stride_pg", "stride_ps", "stride_bgr", "stride_bgs",
                                                      "stride_bur", "stride_bus"), "i32"),
                 **dict.fromkeys(("BLOCK", "INTERPRETED", "ROUND_BF16", "USE_PDL", "LORA", "BLOCK_R", "BLOCK_S"),
                                 "constexpr")}
    constexprs = {"BLOCK": sm.LORA_BLOCK, "INTERPRETED": False, "ROUND_BF16": False, "USE_PDL": True, "LORA": True,
                  "BLOCK_R": 16, "BLOCK_S": 64}
    kernel = triton.jit(sm._silu_mul)
    aligned = ("g_ptr", "u_ptr", "o_ptr", "bg_ptr", "bu_ptr", "p_ptr", "slot_ptr", "N", "stride_gr", "stride_ur",
               "stride_or", "stride_pg", "stride_ps", "stride_bgr", "stride_bgs", "stride_bur", "stride_bus")
    attrs = {(kernel.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned}  # as specialized at run time
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": sm.LORA_WARPS})
    ptx = compiled.asm["ptx"]
    assert ptx.index("ld.global") < ptx.index("griddepcontrol.wait") and "ld.local" not in ptx
    # B 16 bytes a load, and each column's sums over the rank within its thread (rank rows over warps: dozens)
    assert "evict_first.L2::cache_hint.v4" in ptx and ptx.count("bar.sync") <= 2, ptx.count("bar.sync")
    cubin = tmp_path / "glu.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    usage = subprocess.run([str(cuobjdump), "-res-usage", str(cubin)], capture_output=True, text=True,
                           check=True).stdout
    assert re.search(r"STACK:0\b", usage), usage


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_adds_gate_and_ups_lora_deltas_first(dtype):
    """Compiled at a 7B MLP's width (32 rows, 11008, rank 16, 43 splits): against the deltas added by hand (fp32:
    fp32's last bits; bf16: an ulp on a few elements), base rows the plain product bit for bit, and inside a CUDA
    graph the same as eagerly."""
    rows, n = 32, 11008
    slots = [i % 3 for i in range(rows)]
    gate, up = _gate_up(rows, n, dtype, device="cuda", seed=5)
    deltas = _glu_deltas(rows, n, slots, dtype, device="cuda", rank=16, splits=43)
    out = sm.silu_mul(gate, up, deltas)
    gate2, up2 = _with_deltas_by_hand(gate, up, deltas)
    want = sm.silu_mul(gate2, up2)
    # The kernel and the hand sum each pre-activation (gate or up plus its delta over 43 splits) in another order,
    # compiled with fused multiply-adds: they may round it a unit apart (fp32: some units), which silu(g) * u
    # carries to an element near zero. Each element is bounded by that, and in bf16 almost all agree to the bit.
    unit = ULP[dtype] * (64 if dtype == torch.float32 else 2)
    g, u, dg, du = (t.float().abs() for t in (gate2, up2, gate2.float() - gate.float(), up2.float() - up.float()))
    bound = unit * (g + dg + 1) * (u + du + 1) + 4 * ULP[dtype] * want.float().abs()
    assert ((out.float() - want.float()).abs() <= bound).all()
    if dtype != torch.float32:
        assert (out == want).float().mean() > 0.99
    base = [i for i, s in enumerate(slots) if s == 0]
    assert torch.equal(out[base], sm.silu_mul(gate[base], up[base]))
    from tests.server.kernels.launched import launched_ptx, narrow_global_accesses

    folds = [ptx for ptx in launched_ptx(sm._kernel(False)) if "evict_first" in ptx]  # B's loads: the LoRA variants
    assert folds and not any(narrow_global_accesses(ptx) for ptx in folds)  # as launched, no tile 2 bytes a time
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = sm.silu_mul(gate, up, deltas)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(replayed, out)
