"""The int8 GEMV with the MLP's ``silu(gate) * up`` fused into its x loads (``server/kernels/int8_gemv.py``), in
Triton's interpreter: bit for bit what ``silu_mul`` then the plain GEMV tiles give; its PTX for the H200
compiled here (no GPU needed)."""

from __future__ import annotations

import pytest
import torch

from adapterd.server.kernels.silu_mul import silu_mul

km = pytest.importorskip("adapterd.server.kernels.int8_matmul", reason="needs triton (the dev extra, Linux)")
ig = pytest.importorskip("adapterd.server.kernels.int8_gemv")

GEMV = [{"BLOCK_M": 1, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": s} for bn, bk, s in
        ((8, 32, 1), (16, 64, 1), (32, 32, 2), (16, 16, 16))]


def _case(n: int, k: int, dtype: torch.dtype, seed: int = 0):
    """gate and up as the two halves of one fused gate/up output row ``[1, 1, 2K]`` (views, as the decoder has
    them), an int8 weight ``[N, K]`` with its row scales, a bias."""
    g = torch.Generator().manual_seed(seed)
    gate_up = (torch.randn(1, 1, 2 * k, generator=g) * 3).to(dtype)
    cb = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    scb = torch.rand(n, generator=g) * 2.0 + 0.05
    return gate_up[..., :k], gate_up[..., k:], cb, scb, torch.randn(n, generator=g)


@pytest.mark.parametrize("config", GEMV, ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n, k", [(70, 100), (48, 64), (33, 260)])  # K = 100, 260: not multiples of the tiles
def test_gated_equals_silu_mul_then_the_gemv_bit_for_bit(config, dtype, n, k):
    """With the same GEMV tiles (split K or not), the fused kernel's output and the product row it stores equal
    ``silu_mul`` followed by the plain kernel exactly; without ``store_act`` nothing else changes."""
    gate, up, cb, scb, bias = _case(n, k, dtype, seed=n + k)
    act = silu_mul(gate, up)
    want = km._small_m(act.view(1, k), cb, scb, bias, True, config=config).view(1, 1, n)
    y, stored = ig.gated_matmul(gate, up, cb, scb, bias, store_act=True, config=config)
    assert y.shape == (1, 1, n) and y.dtype == dtype and stored.shape == gate.shape
    assert torch.equal(y, want) and torch.equal(stored, act)
    y, stored = ig.gated_matmul(gate, up, cb, scb, None, config=config)
    assert stored is None and torch.equal(y, km._small_m(act.view(1, k), cb, scb, None, True, config=config)
                                          .view(1, 1, n))


def test_gated_config_follows_the_plain_kernels_tiles(monkeypatch):
    """``gated_config`` gives the tiles the plain kernel launches at one row for the weight, and only GEMV ones:
    the interpreter's default (a tensor-core tile) gives None, a GEMV choice gives it; odd operands give None."""
    gate, up, cb, scb, bias = _case(70, 100, torch.bfloat16)
    assert km._INTERPRET_SMALL["BLOCK_M"] != 1 and ig.gated_config(gate, up, cb, scb, bias) is None
    with pytest.raises(ValueError, match="no GEMV tiles"):
        ig.gated_matmul(gate, up, cb, scb, bias)
    monkeypatch.setattr(km, "_INTERPRET_SMALL", GEMV[0])
    assert ig.gated_config(gate, up, cb, scb, bias) == GEMV[0]
    y, _ = ig.gated_matmul(gate, up, cb, scb, bias)  # its own choice
    assert torch.equal(y, km.int8_weight_matmul(silu_mul(gate, up), cb, scb, bias))
    odd_k = _case(70, 102, torch.bfloat16)
    assert ig.gated_config(*odd_k[:4]) is None  # the GEMV reads words: K a multiple of 4
    assert ig.gated_config(gate, up[..., :96], cb, scb) is None and ig.gated_config(gate, up.half(), cb, scb) is None
    two = torch.randn(2, 100, dtype=torch.bfloat16)
    assert ig.gated_config(two, two, cb, scb) is None  # one row only
    monkeypatch.delenv("TRITON_INTERPRET")
    assert ig.gated_config(gate, up, cb, scb) is None  # the CPU without the interpreter: no kernel


def test_gated_gemv_compiles_for_hopper_with_the_weight_requested_before_the_wait(monkeypatch, tmp_path):
    """Each GEMV config of the 1-row bucket compiles gated (bf16, with a bias, storing the product row) for sm_90,
    and under PDL the first weight tile is still requested before ``griddepcontrol.wait``, gate and up read
    after it (they are the previous kernels' outputs)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    kernel = triton.jit(km._int8_mm)
    pointers = dict(zip(("x_ptr", "w_ptr", "s_ptr", "b_ptr", "y_ptr", "p_ptr", "u_ptr", "a_ptr"),
                        ("*bf16", "*i8", "*fp32", "*fp32", "*bf16", "*fp32", "*bf16", "*bf16"), strict=True))
    flags = ("HAS_BIAS", "DOT_F32", "EVEN_K", "INTERPRETED", "USE_PDL", "GATED", "STORE_ACT", "ACT_ROUND_BF16",
             *km._INTERPRET_SMALL)
    unit = ("stride_xk", "stride_wk", "stride_yn")
    aligned = [*pointers, "N", "K", "stride_wn", "stride_xm", "stride_ym"]
    for c in (c for c in km._small_configs() if c.kwargs["BLOCK_M"] == 1):
        signature = {a: "constexpr" if a in flags or a in unit else pointers.get(a, "i32") for a in kernel.arg_names}
        source = ASTSource(fn=kernel, signature=signature,
                           constexprs={"HAS_BIAS": True, "DOT_F32": False, "EVEN_K": True, "INTERPRETED": False,
                                       "USE_PDL": True, "GATED": True, "STORE_ACT": True, "ACT_ROUND_BF16": False,
                                       **c.kwargs, **dict.fromkeys(unit, 1)},
                           attrs={(kernel.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned})
        ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                             options={"num_warps": c.num_warps, "num_stages": c.num_stages}).asm["ptx"]
        wait = ptx.index("griddepcontrol.wait")
        assert ptx.index("ld.global.L1::evict_first") < wait < ptx.index("griddepcontrol.launch_dependents"), c
        loads = [ln for ln in ptx[:wait].splitlines() if "ld.global" in ln]
        assert loads and all("evict_first" in ln for ln in loads), c  # only weight before the wait
        assert "div.rn.f32" in ptx and "st.global" in ptx, c  # the IEEE division of silu_mul; the product row


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_gated_equals_silu_mul_then_the_gemv_bit_for_bit(dtype):
    """Compiled for the GPU, every GEMV config of the one-row bucket: the fused output and stored product row
    equal ``silu_mul`` then the plain kernel exactly (Llama-2-7B's down projection)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    n, k = 4096, 11008
    gate, up, cb, scb, bias = (t.cuda() for t in _case(n, k, dtype, seed=11))
    act = silu_mul(gate, up)
    for config in (c.all_kwargs() for c in km._small_configs() if c.kwargs["BLOCK_M"] == 1):
        want = km._small_m(act.view(1, k), cb, scb, bias, False, config=config).view(1, 1, n)
        y, stored = ig.gated_matmul(gate, up, cb, scb, bias, store_act=True, config=config)
        assert torch.equal(stored, act) and torch.equal(y, want), config
