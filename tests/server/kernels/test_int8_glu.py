"""The int8 one-row GEMV's SiLU-product epilogue (``int8_epilogues.silu_glu``): an MLP's fused gate/up weight in,
``silu(gate) * up`` out, in one launch. Judged against ``silu_mul`` of the plain kernel's output with the same
tiles (bit for bit) and against torch's SiLU product of an fp32 dequantized reference; in Triton's interpreter
here (conftest.py switches it on per test), on CUDA in the ``gpu`` tests."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

km = pytest.importorskip("adapterd.server.kernels.int8_matmul", reason="needs triton (the dev extra, Linux)")
ke = pytest.importorskip("adapterd.server.kernels.int8_epilogues")

ULP = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10, torch.float32: 1e-5}
GLU_TILES = [{"BLOCK_M": 1, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": 1} for bn, bk in ((4, 32), (8, 64), (16, 16))]


def _case(n: int, k: int, dtype: torch.dtype, seed: int = 0, device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    cb = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    scb = torch.rand(n, generator=g) * 0.2 + 0.01
    x = torch.randn(1, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g) * 0.1
    return x.to(device), cb.to(device), scb.to(device), bias.to(device)


def _reference(x, cb, scb, bias, dtype):
    """torch's MLP math on an fp32 product with the dequantized weight (independent of the kernels): gate and
    up rounded to ``dtype``, then ``F.silu(gate) * up``."""
    y = x.double() @ (cb.double() * scb.double()[:, None] / 127.0).T
    y = y if bias is None else y + bias.double()
    gate, up = y.to(dtype).chunk(2, dim=-1)
    return (F.silu(gate) * up).float()


@pytest.mark.parametrize("config", GLU_TILES, ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("with_bias", [True, False])
def test_silu_glu_is_silu_mul_of_the_one_row_kernel_bit_for_bit(config, dtype, with_bias):
    """70 weight rows (35 outputs, not a multiple of the tiles' halves) and K = 100 (uneven tiles): the same
    bits as ``silu_mul`` on the plain GEMV's output with these tiles, and torch's SiLU product of the
    reference within a few roundings."""
    from adapterd.server.kernels.silu_mul import silu_mul

    x, cb, scb, bias = _case(70, 100, dtype, seed=3)
    bias = bias if with_bias else None
    y = ke.silu_glu(x, cb, scb, bias, config=config)
    gate, up = km._small_m(x, cb, scb, bias, True, config=config).chunk(2, dim=-1)
    assert y.shape == (1, 35) and y.dtype == dtype
    assert torch.equal(y, silu_mul(gate, up))
    ref = _reference(x, cb, scb, bias, dtype)
    assert ((y.float() - ref).abs() <= 4 * ULP[dtype] * ref.abs() + 1e-4).all(), (y.float() - ref).abs().max()


def test_glu_fits_one_row_paired_rows_and_gemv_tiles_of_one_split(monkeypatch):
    """``glu_fits``: one row, an even number of rows, whole 4-byte words a row; on a GPU also the one-row key's
    tuned choice being GEMV tiles of one split (a tensor-core tile or a split GEMV: the SiLU stays its own
    launch). ``silu_glu`` refuses other tiles by name."""
    x, cb, scb, bias = _case(70, 100, torch.bfloat16)
    assert ke.glu_fits(x, cb, scb, bias) and ke.glu_fits(x.view(1, 1, 100), cb, scb)
    assert ke.silu_glu(x.view(1, 1, 100), cb, scb).shape == (1, 1, 35)
    assert not ke.glu_fits(torch.cat([x, x]), cb, scb)  # two rows
    assert not ke.glu_fits(x, cb[:69], scb[:69])  # odd rows
    assert not ke.glu_fits(x[:, :98], cb[:, :98], scb)  # K not whole words
    with pytest.raises(ValueError, match="GEMV tiles of one split"):
        ke.silu_glu(x, cb, scb, config={"BLOCK_M": 1, "BLOCK_N": 8, "BLOCK_K": 32, "SPLIT_K": 2})
    key = km._small_key(False, 1, x, cb, scb, None)  # the one-row key as the GPU tunes it (not interpreted)
    for chosen, fits in ((None, False), ({"BLOCK_M": 16, "BLOCK_N": 128, "SPLIT_K": 1}, False),
                         ({"BLOCK_M": 1, "BLOCK_N": 8, "SPLIT_K": 2}, False), ({"BLOCK_M": 1, "BLOCK_N": 8,
                                                                                 "SPLIT_K": 1}, True)):
        monkeypatch.setitem(km._CHOSEN, key, chosen) if chosen else km._CHOSEN.pop(key, None)
        assert (ke._one_split_tiles(x, cb, scb, None, False) is not None) is fits, chosen


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_silu_glu_is_silu_mul_of_the_tuned_kernel_bit_for_bit(dtype):
    """On the GPU, Llama-2-7B's fused gate/up (22016 x 4096) tuned at one row as warm-up tunes it: where the
    choice is GEMV tiles of one split, ``silu_glu`` equals ``silu_mul`` of the plain kernel's output bit for bit
    (libdevice's expf and the IEEE division in both) and replays the same bits from a CUDA graph."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from adapterd.server.kernels.silu_mul import silu_mul

    x, cb, scb, _ = _case(22016, 4096, dtype, seed=9, device="cuda")
    gate, up = km.int8_weight_matmul(x, cb, scb).chunk(2, dim=-1)  # tunes the one-row key
    if not ke.glu_fits(x, cb, scb):
        pytest.skip("the tuned one-row tiles are not GEMV tiles of one split on this GPU")
    y = ke.silu_glu(x, cb, scb)
    assert torch.equal(y, silu_mul(gate, up))
    torch.testing.assert_close(y.float(), _reference(x, cb, scb, None, dtype), rtol=4 * ULP[dtype], atol=1e-3)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        z = ke.silu_glu(x, cb, scb)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(z, y)



@pytest.mark.gpu
def test_gpu_silu_glu_bit_for_bit_at_every_one_row_tile():
    """On the GPU, every GEMV tile of one split the one-row key may tune to, not only this machine's pick:
    ``silu_glu`` equals ``silu_mul`` of the plain kernel's output with the same tiles, bit for bit."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from adapterd.server.kernels.silu_mul import silu_mul

    x, cb, scb, bias = _case(22016, 4096, torch.bfloat16, seed=10, device="cuda")
    from adapterd.server.kernels.int8_configs import one_row_tiles

    tiles = one_row_tiles()
    assert tiles
    wrong = []
    for config in tiles:
        y = ke.silu_glu(x, cb, scb, bias, config=config)
        gate, up = km._small_m(x, cb, scb, bias, True, config=config).chunk(2, dim=-1)
        if not torch.equal(y, silu_mul(gate, up)):
            wrong.append(str(config))
    assert not wrong, wrong

@pytest.mark.sm90
def test_glu_gemv_tiles_compile_for_hopper(monkeypatch, tmp_path):
    """No GPU here, but Triton's own ptxas: with ``GLU`` each one-split GEMV tile of the one-row bucket compiles
    for sm_90 (bf16 with a bias), and the epilogue's division is the IEEE one (``div.rn.f32``, as torch's SiLU);
    the plain dense GEMV's ``GLU`` variant compiles likewise."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from adapterd.server.kernels import dense_gemv

    monkeypatch.delenv("TRITON_INTERPRET")  # triton.jit below must build a compiled kernel, not the interpreter's
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))

    def compile_(fn, pointers: dict, constexprs: dict, num_warps: int):
        kernel = triton.jit(fn)
        signature = {name: "constexpr" if name in constexprs else pointers.get(name, "i32")
                     for name in kernel.arg_names}
        source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
        return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})

    int8_pointers = dict(zip(("x_ptr", "w_ptr", "s_ptr", "b_ptr", "y_ptr", "p_ptr"),
                             ("*bf16", "*i8", "*fp32", "*fp32", "*bf16", "*fp32"), strict=True))
    tiles = [c for c in km._small_configs() if c.kwargs["BLOCK_M"] == 1 and c.kwargs["SPLIT_K"] == 1]
    assert tiles
    for c in tiles:
        flags = {"HAS_BIAS": True, "DOT_F32": False, "EVEN_K": True, "INTERPRETED": False, "USE_PDL": True,
                 "GLU": True, "ROPE": False, "ROUND_BF16": False, "SHRINK": False, "EXPAND": False,
                 **c.kwargs}
        ptx = compile_(km._int8_mm, int8_pointers, flags, c.num_warps).asm["ptx"]
        assert "div.rn.f32" in ptx and "griddepcontrol.wait" in ptx, c.kwargs
    dense_gemv._triton()  # binds tl and libdevice in its module
    dense_pointers = {"x_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "y_ptr": "*bf16"}
    for bn, bk, warps in dense_gemv._CONFIGS:
        flags = {"HAS_BIAS": True, "BLOCK_N": bn, "BLOCK_K": bk, "K_TILES": 4, "ROUND_BF16": False,
                 "USE_PDL": True, "GLU": True, "INTERPRETED": False}
        assert "div.rn.f32" in compile_(dense_gemv._gemv, dense_pointers, flags, warps).asm["ptx"], (bn, bk)
