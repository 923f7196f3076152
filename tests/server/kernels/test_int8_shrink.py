"""The LoRA shrink in the int8 matmul's launch (``kernels/int8_shrink.py``): the matmul's output and the shrink's
partials from one launch, against the two launches it replaces and against torch (Triton's interpreter on the CPU;
``gpu``: compiled on CUDA; ``sm90``: compiled for the H200 here)."""

from __future__ import annotations

import pytest
import torch

km = pytest.importorskip("adapterd.server.kernels.int8_matmul", reason="needs triton (the dev extra, Linux)")
from adapterd.server.kernels import int8_shrink  # noqa: E402 (after the skip: it imports triton)
from adapterd.server.kernels.lora_bgmv import lora_expand_, lora_shrink  # noqa: E402

SLOTS = 5  # adapter slots in the tables; slot 0 is "no adapter" (all zeros, as the slot table keeps it)


def _case(rows: int, k: int, n: int, rank: int, members: int, dtype=torch.bfloat16, device: str = "cpu",
          seed: int = 0):
    """x, an int8 weight and its row scales, the members' A and B tables (slot 0 zeros) and each row's slot:
    row i on slot i % SLOTS, so that base rows (slot 0) sit between adapter rows."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g).to(dtype)
    cb = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    scb = torch.rand(n, generator=g) + 0.05
    a = torch.randn(members, rank + 3, SLOTS, k, generator=g).to(dtype) / k ** 0.5  # R = rank + 3 rows kept
    b = torch.randn(members, rank + 3, SLOTS, 24, generator=g).to(dtype)
    a[:, :, 0] = 0
    b[:, :, 0] = 0
    slots = torch.arange(rows) % SLOTS
    return [t.to(device) for t in (x, cb, scb, a, b, slots)]


def _deltas_by_torch(x, a, b, slots, rank) -> list[torch.Tensor]:
    """Each member's ``(x[i] @ A[:rank, slot_i].T) @ B[:rank, slot_i]`` in fp64 by torch alone (the oracle)."""
    out = []
    for a_g, b_g in zip(a, b, strict=True):
        xa = torch.einsum("mk,rmk->mr", x.double(), a_g[:rank, slots].double())
        out.append(torch.einsum("mr,rmn->mn", xa, b_g[:rank, slots].double()))
    return out


CONFIGS = {  # the matmul's tiles: tensor-core (one split, two), GEMV (one row), each a number of warps (LORA_U)
    "tc-1split-4warps": (5, {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 1, "num_warps": 4}),
    "tc-2splits-2warps": (17, {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "SPLIT_K": 2, "num_warps": 2}),
    "tc-8warps": (3, {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 32, "SPLIT_K": 4, "num_warps": 8}),
    "gemv-1warp": (1, {"BLOCK_M": 1, "BLOCK_N": 8, "BLOCK_K": 32, "SPLIT_K": 1, "num_warps": 1}),
    "gemv-4warps": (1, {"BLOCK_M": 1, "BLOCK_N": 16, "BLOCK_K": 64, "SPLIT_K": 1, "num_warps": 4}),
}
SHAPES = {  # (K, N, rank, members): lora_bgmv.plan's splits and tiles for each
    "k4096-r16-qkv": (4096, 48, 16, 3),  # 16 splits of one 256-column tile: 4 programs a (row, member) at 4 warps
    "k200-r8-one": (200, 70, 8, 1),  # K not a multiple of any tile: one split, masked past K
    "k4096-r64-pair": (4096, 40, 64, 2),  # rank 64: 32 splits of 2 tiles of 64 columns
}
CASES = [("tc-1split-4warps", "k4096-r16-qkv"), ("tc-2splits-2warps", "k4096-r64-pair"), ("tc-8warps", "k200-r8-one"),
         ("tc-8warps", "k4096-r16-qkv"), ("gemv-1warp", "k4096-r16-qkv"), ("gemv-4warps", "k4096-r64-pair"),
         ("gemv-4warps", "k200-r8-one")]  # each tile and each shape at least twice, both grid extensions


@pytest.mark.parametrize(("config", "shape"), CASES, ids=["-".join(case) for case in CASES])
def test_one_launch_gives_the_two_launches_values_bit_for_bit(config, shape):
    """The matmul's output equals the matmul launched alone with the same tiles, and every adapter row's partials
    equal ``lora_shrink``'s, bit for bit (the interpreter sums each tile as the shrink's kernel does); the
    expand of them gives torch's delta for every row, base rows (slot 0) none."""
    rows, tiles = CONFIGS[config]
    k, n, rank, members = SHAPES[shape]
    x, cb, scb, a, b, slots = _case(rows, k, n, rank, members)
    bias = torch.randn(n)
    y, partials = int8_shrink.matmul_and_shrink(x, cb, scb, bias, a, slots, rank, config=tiles)
    assert torch.equal(y, km._small_m(x, cb, scb, bias, True, config=tiles))
    alone = lora_shrink(x, a, slots, rank)
    live = slots != 0
    assert partials.p.shape == alone.p.shape and partials.rank == rank and partials.slots is slots
    assert torch.equal(partials.p[:, :, live], alone.p[:, :, live])
    ys = [torch.zeros(rows, b.shape[-1]) for _ in range(members)]
    lora_expand_(ys, partials, list(b))
    for got, want in zip(ys, _deltas_by_torch(x, a, b, slots, rank), strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
        assert not got[~live].any()


def test_leading_dimensions_and_the_tuned_config():
    """x as a decode step gives it (``[rows, 1, K]``): the output keeps x's leading dimensions, and without a
    config the interpreter's tiles run (on a GPU: the row bucket's tuned choice)."""
    x, cb, scb, a, _, slots = _case(6, 256, 48, 16, 3)
    y, partials = int8_shrink.matmul_and_shrink(x[:, None], cb, scb, None, a, slots, 16)
    assert y.shape == (6, 1, 48)
    assert torch.equal(y[:, 0], km.int8_weight_matmul(x, cb, scb))
    live = slots != 0
    assert torch.equal(partials.p[:, :, live], lora_shrink(x, a, slots, 16).p[:, :, live])


def test_none_where_it_does_not_run(monkeypatch):
    """Nothing launched (None) where the one launch cannot serve: no rank, more rows than the split-K kernel takes,
    slots that are not one a row, tables of another K; and off the GPU without the interpreter."""
    x, cb, scb, a, _, slots = _case(4, 256, 48, 16, 3)
    assert int8_shrink.matmul_and_shrink(x, cb, scb, None, a, slots, 0) is None
    many = x.repeat(17, 1)  # 68 rows
    assert int8_shrink.matmul_and_shrink(many, cb, scb, None, a, slots.repeat(17), 16) is None
    assert int8_shrink.matmul_and_shrink(x, cb, scb, None, a, slots[:3], 16) is None
    assert int8_shrink.matmul_and_shrink(x, cb, scb, None, a[..., :128], slots, 16) is None
    monkeypatch.delenv("TRITON_INTERPRET")
    assert int8_shrink.matmul_and_shrink(x, cb, scb, None, a, slots, 16) is None


def compile_for_hopper(c, weight: str = "*i8", **flags):
    """``_int8_mm`` compiled for sm_90 (Triton's own ptxas, no GPU) with tile config ``c``, as a launch specializes
    it: unit strides along K and N, 16-divisible pointers, sizes and other strides; bf16 x, a ``weight`` of that
    type (int8: fp32 row scales and bias), the shrink's arguments typed as the q/k/v shrink's (rank 16 at K 4096, a
    split a warp). ``flags``: the constexprs that differ from a PDL launch with the shrink (``SHRINK``,
    ``USE_PDL``; ``int8_expand.py``'s tests: ``EXPAND``, its B bf16 and its sums fp32). The caller clears
    TRITON_INTERPRET."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = triton.jit(km._int8_mm)
    side = "*fp32" if weight == "*i8" else weight
    pointers = {"x_ptr": "*bf16", "w_ptr": weight, "s_ptr": side, "b_ptr": side, "y_ptr": "*bf16",
                "p_ptr": "*fp32", "a_ptr": "*bf16", "slot_ptr": "*i64", "lp_ptr": "*fp32", "eb_ptr": "*bf16",
                "ed_ptr": "*fp32"}
    aligned = [*pointers, "N", "K", "stride_wn", "stride_xm", "stride_ym", "stride_ag", "stride_ar", "stride_as",
               "stride_pg", "stride_ps"]
    constexprs = {"HAS_BIAS": False, "DOT_F32": False, "EVEN_K": True, "INTERPRETED": False, "USE_PDL": True,
                  "GLU": False, "ROPE": False, "SHRINK": True, "LORA_EVEN_K": True, "BLOCK_R": 16, "LORA_K": 256,
                  "LORA_TILES": 1, "LORA_U": c.num_warps, "SCALED": weight == "*i8", "EXPAND": False, "E_BLOCK_S": 32,
                  "E_BLOCK_N": 256, **c.kwargs, "stride_xk": 1,
                  "stride_wk": 1, "stride_yn": 1, "stride_ak": 1, **flags}
    signature = {a: "constexpr" if a in constexprs else pointers.get(a, "i32") for a in kernel.arg_names}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs,
                       attrs={(kernel.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": c.num_warps, "num_stages": c.num_stages})


@pytest.mark.sm90
def test_every_decode_tile_compiles_with_the_shrink_for_hopper(monkeypatch, tmp_path):
    """No GPU here, but Triton's own ptxas: every tile of the decode buckets compiles for sm_90 with the shrink's
    programs (bf16, rank 16 at K 4096: the q/k/v shape's), with the unit strides and 16-divisible sizes Triton
    specializes at run time. Where the matmul's weight streams through ``cp.async`` (the tensor-core tiles), the
    only evict-first loads are A's, 16 bytes a load, 16 a thread (a warp's 4096 elements a split), and under PDL
    they are issued before ``griddepcontrol.wait`` (x, the kernel before's output, after it)."""
    import re

    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    for c in km._small_configs():
        gemv = c.kwargs["BLOCK_M"] == 1
        ptx = compile_for_hopper(c).asm["ptx"]
        loads = re.findall(r"ld\.global\.L1::evict_first[\w.:]*", ptx)
        assert loads and all(load.endswith(".v4.b32") for load in loads), (c, set(loads))
        if not gemv:  # A's loads alone, all 16 issued before the shrink's own wait (the matmul's has its own)
            assert "cp.async" in ptx and len(loads) == 16, (c, len(loads))
            first = ptx.index("ld.global.L1::evict_first")
            assert ptx[first:ptx.index("griddepcontrol.wait", first)].count("ld.global.L1::evict_first") == 16, c


@pytest.mark.sm90
def test_past_the_pdl_rows_only_the_shrinks_programs_let_the_next_kernel_start(monkeypatch, tmp_path):
    """Launched without PDL (the 32- and 64-row tiles), the matmul's programs neither wait nor trigger; with the
    shrink's programs, these (which start after every matmul program) trigger the next kernel's launch, and wait
    for none: the kernel after may start streaming its LoRA B tiles while the shrink runs (sm_90, Triton here)."""
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    wide = [c for c in km._small_configs() if c.kwargs["BLOCK_M"] == 32]
    for c, shrink in [(c, shrink) for c in wide[:2] for shrink in (False, True)]:
        ptx = compile_for_hopper(c, SHRINK=shrink, USE_PDL=False).asm["ptx"]
        assert "griddepcontrol.wait" not in ptx, c
        assert ptx.count("griddepcontrol.launch_dependents") == (1 if shrink else 0), (c, shrink)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 8, 32])
def test_gpu_at_the_llama_qkv_shape_against_the_two_launches_and_in_a_cuda_graph(rows):
    """On the GPU at Llama-2-7B's fused q/k/v (12288x4096, rank 16, three members, 32 adapters), with the row
    bucket's tuned tiles: the output equals the matmul alone bit for bit (the same tiles and sums), the partials
    ``lora_shrink``'s within fp32 summation order, and a CUDA graph replays the one launch with new inputs."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 4096, generator=g).to(torch.bfloat16).cuda()
    cb = torch.randint(-127, 128, (12288, 4096), generator=g, dtype=torch.int8).cuda()
    scb = (torch.rand(12288, generator=g) + 0.05).cuda()
    a = (torch.randn(3, 16, 33, 4096, generator=g) / 64).to(torch.bfloat16).cuda()
    a[:, :, 0] = 0
    slots = (torch.arange(rows) % 33).cuda()
    km.int8_weight_matmul(x, cb, scb)  # tunes the bucket first
    check_one_launch_on_the_gpu(x, cb, scb, a, slots, lambda x: km.int8_weight_matmul(x, cb, scb), g)


def check_one_launch_on_the_gpu(x, weight, scb, a, slots, alone, g) -> None:
    """``int8_shrink.matmul_and_shrink`` of x (rank 16) on CUDA: its output equals ``alone(x)`` (the matmul by
    itself, with the same tiles) bit for bit and its partials ``lora_shrink``'s within fp32 summation order; then
    captured in a CUDA graph and replayed on a new x (drawn from ``g``), the same again."""
    live = slots != 0

    def check(y, partials) -> None:
        assert torch.equal(y, alone(x))
        torch.testing.assert_close(partials.p[:, :, live], lora_shrink(x, a, slots, 16).p[:, :, live], rtol=1e-5,
                                   atol=1e-5)

    done = int8_shrink.matmul_and_shrink(x, weight, scb, None, a, slots, 16)
    assert done is not None
    check(*done)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y, partials = int8_shrink.matmul_and_shrink(x, weight, scb, None, a, slots, 16)
    x.copy_(torch.randn(x.shape, generator=g).to(x.dtype))
    graph.replay()
    torch.cuda.synchronize()
    check(y, partials)
