"""The batched LoRA decode kernels (BGMV), run by Triton's interpreter on the CPU (conftest.py switches it on
per test), and compiled on a GPU by the ``gpu`` tests. Shapes are small on the CPU: the interpreter runs each
program in numpy."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from adapterd.server.adapters.lora_slots import LoraSlotTable
from adapterd.server.adapters.lora_weights import LoraModule, LoraWeights
from adapterd.server.engine.step_context import StepContext, step_context
from adapterd.server.kernels import lora_kernel_available

kb = pytest.importorskip("adapterd.server.kernels.lora_bgmv", reason="needs triton (the dev extra, Linux)")

# One unit in the last place, relative (bf16 keeps 8 significant bits, fp16 11); the interpreter rounds
# fp32 -> bf16 toward zero (up to one ulp), a GPU to nearest (half an ulp).
ULP = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10, torch.float32: 1e-5}


def _tables(r: int, s: int, in_f: int, out_f: int, dtype=torch.float32, device="cpu", seed=0):
    """Rank-major tables ``A [r, s, in]``, ``B [r, s, out]`` with slot 0 all zeros, as BatchedLoraLinear keeps
    them; values of LoRA-like size (deltas of order one)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(r, s, in_f, generator=g) / in_f**0.5
    b = torch.randn(r, s, out_f, generator=g) / r**0.5
    a[:, 0], b[:, 0] = 0.0, 0.0
    return a.to(device, dtype), b.to(device, dtype)


def _run(y0, x, a, b, slots, rank):
    y = y0.clone()
    kb.lora_delta_(y, x, a, b, slots, rank)
    return y


# ------------------------------------------------------------------------------------ kernel vs reference


@pytest.mark.parametrize("rows", [1, 2, 7])
@pytest.mark.parametrize("rank", [8, 5])  # all of R, and fewer ranks than the table holds (masked)
def test_fp32_matches_torch(rows, rank):
    a, b = _tables(8, 5, 64, 96, seed=rows)
    g = torch.Generator().manual_seed(rows + 10)
    x, y0 = torch.randn(rows, 64, generator=g), torch.randn(rows, 96, generator=g)
    slots = torch.tensor([0, 3, 1, 4, 3, 0, 2][:rows]) if rows > 1 else torch.tensor([2])
    y = _run(y0, x, a, b, slots, rank)
    torch.testing.assert_close(y, y0 + kb.reference_delta(x, a, b, slots, rank), rtol=1e-5, atol=1e-5)
    base = slots == 0
    assert torch.equal(y[base], y0[base])  # rows on slot 0 are not touched


def test_rank_above_a_power_of_two_and_only_rank_rows_read():
    """Rank 20 of R = 32 (BLOCK_R 32, masked): ranks past 20 hold garbage that must not be read."""
    a, b = _tables(32, 4, 64, 96, seed=3)
    a[20:], b[20:] = float("nan"), float("nan")
    x, y0 = torch.randn(3, 64), torch.randn(3, 96)
    slots = torch.tensor([1, 3, 2])
    y = _run(y0, x, a, b, slots, 20)
    torch.testing.assert_close(y, y0 + kb.reference_delta(x, a, b, slots, 20), rtol=1e-5, atol=1e-5)


# K, N block multiples (4 K tiles); neither (4 tiles, the last partial); 3 K tiles (a last split of one tile)
@pytest.mark.parametrize("in_f, out_f", [(128, 96), (100, 70), (70, 100)])
def test_splits_and_tiles(monkeypatch, in_f, out_f):
    """Small tiles force the GPU's shapes: several K splits (summed by expand), several tiles a split, a last
    split shorter than the others, several N blocks, masked K and N edges."""
    monkeypatch.setattr(kb, "TILE_ELEMS", 16 * 16)  # BLOCK_K = BLOCK_N = 32 at rank <= 16
    monkeypatch.setattr(kb, "MAX_PARTIALS", 16 * 2)  # at most 2 splits
    cfg = kb.plan(in_f, out_f, 8)
    assert cfg["BLOCK_K"] == 32 and cfg["splits"] == 2 and cfg["tiles"] == 2 and cfg["BLOCK_N"] == 32
    a, b = _tables(8, 5, in_f, out_f, seed=in_f)
    x, y0 = torch.randn(5, in_f), torch.randn(5, out_f)
    slots = torch.tensor([4, 0, 1, 4, 2])
    y = _run(y0, x, a, b, slots, 8)
    torch.testing.assert_close(y, y0 + kb.reference_delta(x, a, b, slots, 8), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("act, table", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                        (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])
def test_half_dtypes_and_mixed_dtypes(act, table):
    """x/y in one dtype, the tables in the same or another: widened on load, fp32 sums, one rounding to y's
    dtype at the end (within an ulp of y's dtype of the fp32 result)."""
    a, b = _tables(8, 5, 64, 96, dtype=table, seed=7)
    x, y0 = torch.randn(4, 64).to(act), torch.randn(4, 96).to(act)
    slots = torch.tensor([1, 2, 0, 4])
    y = _run(y0, x, a, b, slots, 8)
    assert y.dtype == act
    ref = y0.float() + kb.reference_delta(x, a, b, slots, 8)
    assert ((y.float() - ref).abs() <= ULP[act] * ref.abs() + 1e-5).all()


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_strided_x_and_slots(dtype):
    a, b = _tables(8, 5, 64, 96, seed=9)
    x = torch.randn(3, 128)[:, ::2]  # row stride 128, element stride 2
    y0 = torch.randn(3, 96)
    slots = torch.tensor([[3, 9], [1, 9], [0, 9]], dtype=dtype)[:, 0]  # stride 2, as a column of a buffer
    y = _run(y0, x, a, b, slots, 6)
    torch.testing.assert_close(y, y0 + kb.reference_delta(x, a, b, slots.long(), 6), rtol=1e-5, atol=1e-5)


def _group(widths: tuple[int, ...], in_f: int, r: int = 8, s: int = 5, dtype=torch.float32, device="cpu", seed=0):
    """G members' tables as a LoraGroup keeps them: A stacked ``[G, r, s, in]``, one B a member."""
    tables = [_tables(r, s, in_f, out_f, dtype, device, seed + g) for g, out_f in enumerate(widths)]
    return torch.stack([a for a, _ in tables]), [b for _, b in tables]


@pytest.mark.parametrize("fused", [False, True], ids=["outputs", "fused-output-splits"])
@pytest.mark.parametrize("in_f, widths, tile", [(64, (96, 32, 32), None), (100, (70, 40, 40), 16 * 16),
                                                (64, (96, 32), None), (64, (32, 32, 32, 32, 16), None)])
def test_group_equals_separate_calls_bit_for_bit(monkeypatch, in_f, widths, tile, fused):
    """q, k, v (k and v narrower: grouped key/value heads) in one shrink launch and one expand launch: each
    member's output is bit-identical to its own ``lora_delta_`` call and matches the fp32 reference; rows on
    slot 0 untouched. With small tiles: several splits and tiles, masked K and N edges; a group of two; one
    of five (two expand launches); and the members' outputs as the column splits of one fused output (row
    stride the fused width), as the own decoder's fused q/k/v matmul hands them over."""
    if tile:
        monkeypatch.setattr(kb, "TILE_ELEMS", tile)
        monkeypatch.setattr(kb, "MAX_PARTIALS", 16 * 2)
        assert kb.plan(in_f, widths[0], 6)["splits"] == 2
    a, bs = _group(widths, in_f, seed=in_f)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 2 * in_f, generator=g)[:, ::2]  # strided, as a view of a wider buffer
    y0s = [torch.randn(5, w, generator=g) for w in widths]
    slots = torch.tensor([4, 0, 1, 4, 2])
    ys = list(torch.cat(y0s, 1).split(widths, 1)) if fused else [y.clone() for y in y0s]
    kb.lora_group_delta_(ys, x, a, bs, slots, 6)
    for member, (y, y0, b) in enumerate(zip(ys, y0s, bs, strict=True)):
        assert torch.equal(y, _run(y0, x, a[member], b, slots, 6)), member
        torch.testing.assert_close(y, y0 + kb.reference_delta(x, a[member], b, slots, 6), rtol=1e-5, atol=1e-5)
        assert torch.equal(y[1], y0[1])


def test_group_bad_arguments():
    a, bs = _group((96, 32, 32), 64)
    ys, x, slots = [torch.randn(2, w) for w in (96, 32, 32)], torch.randn(2, 64), torch.tensor([1, 2])
    with pytest.raises(ValueError, match="group"):
        kb.lora_group_delta_(ys[:2], x, a, bs, slots, 8)
    with pytest.raises(ValueError, match="group"):
        kb.lora_group_delta_(ys, x, a[0], bs, slots, 8)
    with pytest.raises(ValueError, match="do not fit"):
        kb.lora_group_delta_(ys[::-1], x, a, bs, slots, 8)


def test_nothing_to_do_and_bad_arguments():
    a, b = _tables(8, 5, 64, 96)
    y0 = torch.randn(2, 96)
    assert torch.equal(_run(y0, torch.randn(2, 64), a, b, torch.tensor([1, 2]), 0), y0)  # rank 0
    kb.lora_delta_(torch.empty(0, 96), torch.empty(0, 64), a, b, torch.empty(0, dtype=torch.long), 8)
    with pytest.raises(ValueError, match="rank"):
        kb.lora_delta_(y0.clone(), torch.randn(2, 64), a, b, torch.tensor([1, 2]), 9)
    with pytest.raises(ValueError, match="slots"):
        kb.lora_delta_(y0.clone(), torch.randn(2, 64), a, b, torch.tensor([1, 2, 3]), 8)
    with pytest.raises(ValueError, match="do not fit"):
        kb.lora_delta_(y0.clone(), torch.randn(2, 65), a, b, torch.tensor([1, 2]), 8)
    with pytest.raises(TypeError):
        kb.lora_delta_(y0.double(), torch.randn(2, 64).double(), a, b, torch.tensor([1, 2]), 8)


def test_plan_for_llama_shapes():
    """The fixed heuristics at real shapes: every program a 4096-element tile, enough programs for one row."""
    assert kb.plan(4096, 4096, 16) == {"BLOCK_R": 16, "BLOCK_K": 256, "tiles": 1, "splits": 16, "BLOCK_N": 256,
                                       "BLOCK_S": 16}
    assert kb.plan(14336, 4096, 16)["splits"] == 56
    big = kb.plan(4096, 14336, 64)
    assert (big["BLOCK_R"], big["BLOCK_K"], big["tiles"], big["splits"], big["BLOCK_N"]) == (64, 64, 2, 32, 64)
    for in_f in (64, 4096, 11008, 14336, 100000):
        for rank in (1, 8, 16, 20, 48, 64, 128):
            cfg = kb.plan(in_f, 4096, rank)
            assert cfg["BLOCK_S"] * cfg["BLOCK_R"] <= 2 * kb.MAX_PARTIALS
            assert cfg["splits"] * cfg["tiles"] * cfg["BLOCK_K"] >= in_f
            assert (cfg["splits"] - 1) * cfg["tiles"] * cfg["BLOCK_K"] < in_f  # no split starts past the end


@pytest.mark.sm90
@pytest.mark.parametrize("name", ["_shrink", "_expand"])
def test_compiles_for_hopper_with_the_weight_requested_before_the_wait(monkeypatch, tmp_path, name):
    """Compiled for sm_90 under PDL (no GPU needed), each kernel requests its A or B tile (the evict-first loads,
    16 bytes each) before ``griddepcontrol.wait``, and reads what an earlier kernel wrote (x; the partials and
    y) only after it: the prefetch that PDL overlaps with the kernel before, and nothing read too early. The
    expand compiles a group's three members (each its own pointers and strides), as a launch does."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    kernel = triton.jit(getattr(kb, name))
    cfg = kb.plan(4096, 4096, 16)
    constexprs = {"USE_PDL": True, "BLOCK_R": cfg["BLOCK_R"]}
    if name == "_shrink":
        constexprs |= {"EVEN_K": True, "BLOCK_K": cfg["BLOCK_K"], "TILES": cfg["tiles"]}
    else:
        constexprs |= {"EVEN_N": True, "BLOCK_N": cfg["BLOCK_N"], "BLOCK_S": cfg["BLOCK_S"]}
    pointers = [a for a in kernel.arg_names if a.endswith("_ptr")]
    dtypes = {"slot_ptr": "*i64", "p_ptr": "*fp32"}
    signature = {a: "constexpr" if a in constexprs else dtypes.get(a, "*bf16") if a in pointers else "i32"
                 for a in kernel.arg_names}
    unit = [a for a in kernel.arg_names if a in ("stride_xk", "stride_ak", "stride_yn", "stride_bn", "stride_slot")]
    aligned = [a for a in kernel.arg_names if a in pointers or (a.startswith("stride_") and a not in unit)]
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs | {a: 1 for a in unit},
                       attrs={(kernel.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned})
    ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": kb.NUM_WARPS}).asm["ptx"]
    wait = ptx.index("griddepcontrol.wait")
    weight = [m.start() for m in re.finditer(r"ld\.global\.L1::evict_first[\w.:]*\.v4\.b32", ptx)]
    others = [m.start() for m in re.finditer(r"ld\.global(?!\.L1::evict_first)[\w.:]*", ptx)]
    assert weight and max(weight) < wait, name  # the whole tile in flight before the wait (one tile at 4096)
    assert len([o for o in others if o < wait]) == 1, name  # only the slot before it (x, partials, y after)
    # every bf16 read and write 16 bytes wide: none 2 bytes at a time (Triton 3.6 read the expand's B and y so
    # when a branch picked the member's pointer: test_gpu_image_triton.py runs this under it)
    assert not re.search(r"(ld|st)\.global[\w.:]*\.b16\b", ptx), name
    assert re.search(r"st\.global[\w.:]*\.v4\.b32", ptx) or name == "_shrink", name


def test_lora_kernel_available(monkeypatch):
    assert lora_kernel_available("cpu")  # the interpreter (conftest)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not lora_kernel_available("cpu")


# ------------------------------------------------------------------------------------ the batched layer


def _forward(model: nn.Module, table: LoraSlotTable, slots: list[int], x: torch.Tensor, phase: str):
    with step_context(StepContext(phase, table.rows_of(slots, phase))):
        return model(x)


def _adapter(name: str, r: int, in_f: int, out_f: int, scaling: float, seed: int) -> LoraWeights:
    g = torch.Generator().manual_seed(seed)
    module = LoraModule(a=torch.randn(r, in_f, generator=g) * 0.1, b=torch.randn(out_f, r, generator=g) * 0.1,
                        scaling=scaling)
    return LoraWeights(modules={name: module}, rank=r, target_modules=[name])


@pytest.mark.parametrize("num_slots", [3, 20])  # the dense torch path, the gathered one
@pytest.mark.parametrize("shape", [(4, 1, 48), (4, 48)])  # decode steps: [rows, 1, in] and [rows, in]
def test_batched_layer_kernel_equals_torch_paths(monkeypatch, num_slots, shape):
    """A decode step through BatchedLoraLinear: the kernel (interpreter) gives the torch paths' output."""
    calls = []
    real = kb.lora_delta_
    monkeypatch.setattr(kb, "lora_delta_", lambda *args: calls.append(args[-1]) or real(*args))
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(48, 40))
    table = LoraSlotTable(model, num_slots=num_slots, max_rank=16, dtype=torch.float32, device=torch.device("cpu"))
    s1 = table.acquire("a", _adapter("proj", 4, 48, 40, 2.0, 1))
    s2 = table.acquire("b", _adapter("proj", 8, 48, 40, 0.5, 2))
    x = torch.randn(*shape)
    with torch.no_grad():
        out = _forward(model, table, [s1, 0, s2, s1], x, "decode")
        assert calls == [8]  # the kernel ran, over the batch's largest rank
        expected = _forward(model, table, [s1, 0, s2, s1], x, "prefill")
    assert calls == [8]  # a prefill: the torch path
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(out.reshape(4, -1)[1], model.proj.base_layer(x).reshape(4, -1)[1])  # a base row


@pytest.mark.parametrize("num_slots", [3, 20])  # the dense torch path, the gathered one
def test_qkv_group_decode_kernel_equals_torch_paths(monkeypatch, num_slots):
    """An attention's q, k, v grouped (LoRA on all three for one adapter, on q and v for another, ranks and
    scalings differing): a decode step through ``project_qkv`` launches the grouped kernel once, and gives
    what the torch paths give and what each projection gives alone through the per-layer kernel."""
    from adapterd.server.adapters.lora import project_qkv

    group_calls = []
    real = kb.lora_group_delta_
    monkeypatch.setattr(kb, "lora_group_delta_", lambda *args: group_calls.append(len(args[0])) or real(*args))
    torch.manual_seed(0)
    model = nn.Module()
    model.add_module("attn", nn.Module())
    for name, out in (("q_proj", 40), ("k_proj", 16), ("v_proj", 16)):
        model.attn.add_module(name, nn.Linear(48, out))
    table = LoraSlotTable(model, num_slots=num_slots, max_rank=16, dtype=torch.float32, device=torch.device("cpu"))
    qkv = LoraWeights(modules={**_adapter("attn.q_proj", 4, 48, 40, 2.0, 1).modules,
                               **_adapter("attn.k_proj", 4, 48, 16, 1.0, 2).modules,
                               **_adapter("attn.v_proj", 4, 48, 16, 0.5, 3).modules}, rank=4, target_modules=[])
    qv = LoraWeights(modules={**_adapter("attn.q_proj", 8, 48, 40, 1.5, 4).modules,
                              **_adapter("attn.v_proj", 2, 48, 16, 4.0, 5).modules}, rank=8, target_modules=[])
    slots = [table.acquire("qkv", qkv), 0, table.acquire("qv", qv), 1]
    x = torch.randn(4, 1, 48)
    layers = (model.attn.q_proj, model.attn.k_proj, model.attn.v_proj)
    with torch.no_grad():
        with step_context(StepContext("decode", table.rows_of(slots, "decode"))):
            grouped = project_qkv(model.attn, x)
            alone = [layer(x) for layer in layers]  # the per-layer kernel
        assert group_calls == [3, 1, 1, 1]  # one shrink for the group; each layer alone is a group of one
        with step_context(StepContext("prefill", table.rows_of(slots, "prefill"))):
            torch_paths = project_qkv(model.attn, x)
    assert group_calls == [3, 1, 1, 1]  # a prefill: the torch paths
    for layer, g, a, t in zip(layers, grouped, alone, torch_paths, strict=True):
        assert torch.equal(g, a)  # bit for bit: the same partials, summed in the same order
        torch.testing.assert_close(g, t, rtol=1e-5, atol=1e-5)
        assert torch.equal(g[1], layer.base_layer(x)[1])


def test_batched_layer_prefill_and_autograd_keep_the_torch_paths(monkeypatch):
    monkeypatch.setattr(kb, "lora_delta_", lambda *args: pytest.fail("the kernel ran"))
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(48, 40))
    table = LoraSlotTable(model, num_slots=4, max_rank=16, dtype=torch.float32, device=torch.device("cpu"))
    slots = [table.acquire("a", _adapter("proj", 4, 48, 40, 2.0, 1)), 0]
    with torch.no_grad():
        _forward(model, table, slots, torch.randn(2, 3, 48), "prefill")  # 3 tokens a row
        _forward(model, table, slots, torch.randn(2, 1, 48), "prefill")  # one-token prompts: still a prefill
    _forward(model, table, slots, torch.randn(2, 1, 48), "decode")  # grad enabled: y is tracked


# ------------------------------------------------------------------------------------ GPU


def _assert_close_bf16(y: torch.Tensor, ref: torch.Tensor, what: object = "") -> None:
    bad = (y.float() - ref).abs() > ULP[y.dtype] * ref.abs() + 1e-2
    assert not bad.any(), f"{what}: {int(bad.sum())} of {bad.numel()} outputs off"


@pytest.mark.gpu
@pytest.mark.parametrize("in_f, out_f", [(4096, 4096), (4096, 14336), (14336, 4096)])
@pytest.mark.parametrize("rows", [1, 32])
def test_gpu_llama_shapes_bf16(in_f, out_f, rows):
    """Llama shapes, bf16, rank 16 of R = 64, 33 slots: row i on slot i + 1 (every row its own adapter),
    or one row on slot 5."""
    a, b = _tables(64, 33, in_f, out_f, dtype=torch.bfloat16, device="cuda", seed=in_f + out_f)
    x = torch.randn(rows, in_f, device="cuda").to(torch.bfloat16)
    y0 = torch.randn(rows, out_f, device="cuda").to(torch.bfloat16)
    slots = torch.arange(1, rows + 1, device="cuda") if rows > 1 else torch.tensor([5], device="cuda")
    y = _run(y0, x, a, b, slots, 16)
    _assert_close_bf16(y, y0.float() + kb.reference_delta(x, a, b, slots, 16), (in_f, out_f, rows))


@pytest.mark.gpu
def test_gpu_launched_kernels_read_and_write_16_bytes_a_time():
    """As launched at Llama-2-7B's q/k/v widths (a group of three, and one member alone), neither kernel reads
    its table or y 2 bytes at a time: the compile tests' assumption about what a launch specializes, checked
    against the PTX Triton built for the launch itself."""
    from tests.server.kernels.launched import launched_ptx, narrow_global_accesses

    a, bs = _group((4096, 4096, 4096), 4096, r=16, s=5, dtype=torch.bfloat16, device="cuda", seed=7)
    for rows in (1, 32):
        x = torch.randn(rows, 4096, device="cuda").to(torch.bfloat16)
        ys = [torch.zeros(rows, 4096, device="cuda", dtype=torch.bfloat16) for _ in bs]
        slots = torch.arange(1, rows + 1, device="cuda") % 4
        kb.lora_group_delta_(ys, x, a, bs, slots, 16)
        kb.lora_delta_(ys[0], x, a[0], bs[0], slots, 16)
    torch.cuda.synchronize()
    for kernel in kb._kernels(False):
        ptx = launched_ptx(kernel)
        assert ptx and all(not narrow_global_accesses(p) for p in ptx), [narrow_global_accesses(p) for p in ptx]


@pytest.mark.gpu
@pytest.mark.parametrize("act, table", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                        (torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16)])
def test_gpu_odd_shapes_and_dtypes(act, table):
    """Neither K nor N a block multiple, rank 20 (BLOCK_R 32) and 64 of R = 64, slot 0 rows mixed in."""
    a, b = _tables(64, 9, 1000, 520, dtype=table, device="cuda", seed=1)
    x = torch.randn(17, 1000, device="cuda").to(act)
    y0 = torch.randn(17, 520, device="cuda").to(act)
    slots = torch.tensor([(i * 5) % 9 for i in range(17)], device="cuda")
    for rank in (20, 64):
        y = _run(y0, x, a, b, slots, rank)
        ref = y0.float() + kb.reference_delta(x, a, b, slots, rank)
        bad = (y.float() - ref).abs() > ULP[act] * ref.abs() + 1e-3
        assert not bad.any(), f"rank {rank}: {int(bad.sum())} outputs off"
        assert torch.equal(y[slots == 0], y0[slots == 0])


@pytest.mark.gpu
@pytest.mark.parametrize("widths", [(4096, 4096, 4096), (4096, 1024, 1024)])  # Llama-2-7B, Llama-3-8B (GQA)
@pytest.mark.parametrize("rows", [1, 32])
def test_gpu_qkv_group_bit_identical_to_separate_calls(widths, rows):
    """The grouped launch at Llama shapes, bf16, rank 16 of R = 64, 33 slots: each member bit-identical to
    its own ``lora_delta_``, both inside a CUDA graph and eagerly."""
    a, bs = _group(widths, 4096, r=64, s=33, dtype=torch.bfloat16, device="cuda", seed=rows)
    x = torch.randn(rows, 4096, device="cuda").to(torch.bfloat16)
    y0s = [torch.randn(rows, w, device="cuda").to(torch.bfloat16) for w in widths]
    slots = torch.arange(1, rows + 1, device="cuda") if rows > 1 else torch.tensor([5], device="cuda")
    ys = [y.clone() for y in y0s]
    kb.lora_group_delta_(ys, x, a, bs, slots, 16)  # also the warm-up: compiles
    graphed = [y.clone() for y in y0s]
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        kb.lora_group_delta_(graphed, x, a, bs, slots, 16)
    for y, y0 in zip(graphed, y0s, strict=True):
        y.copy_(y0)
    graph.replay()
    torch.cuda.synchronize()
    for member, (y, g, y0, b) in enumerate(zip(ys, graphed, y0s, bs, strict=True)):
        alone = _run(y0, x, a[member], b, slots, 16)
        assert torch.equal(y, alone) and torch.equal(g, alone), (widths, rows, member)


@pytest.mark.gpu
def test_gpu_cuda_graph_replay_equals_eager():
    """Captured (after an eager warm-up that compiles), replayed with new x, y and slots in the static
    buffers: the same as an eager call on those inputs. Rows 1 and 32, rank buckets 16 and 64."""
    a, b = _tables(64, 33, 4096, 4096, dtype=torch.bfloat16, device="cuda", seed=2)
    cases = []
    for rows, rank in ((1, 16), (32, 16), (32, 64)):
        x = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16)
        y = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16)
        slots = torch.randint(0, 33, (rows,), device="cuda")
        cases.append((y, x, slots, rank))
        kb.lora_delta_(y.clone(), x, a, b, slots, rank)  # warm-up: compiles
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for y, x, slots, rank in cases:
            kb.lora_delta_(y, x, a, b, slots, rank)
    for y, x, slots, _ in cases:
        x.copy_(torch.randn_like(x))
        y.copy_(torch.randn_like(y))
        slots.copy_(torch.randint(0, 33, slots.shape, device="cuda"))
    before = [(y.clone(), x.clone(), slots.clone(), rank) for y, x, slots, rank in cases]
    graph.replay()
    torch.cuda.synchronize()
    for (y, *_), (y0, x, slots, rank) in zip(cases, before, strict=True):
        assert torch.equal(y, _run(y0, x, a, b, slots, rank)), f"rows {x.shape[0]}, rank {rank}"


@pytest.mark.gpu
def test_gpu_batched_layer_in_a_cuda_graph():
    """BatchedLoraLinear at 4096 -> 4096 bf16, 32 rows on 32 adapters, one decode step captured in a graph
    with the slots in a static buffer: the replay equals the eager kernel path, and both are
    the base output plus the fp32 delta rounded once; the torch dense path (which rounds x @ A to bf16
    before B) agrees within its own rounding."""
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(4096, 4096, bias=False).to("cuda", torch.bfloat16))
    table = LoraSlotTable(model, num_slots=32, max_rank=64, dtype=torch.bfloat16, device=torch.device("cuda"))
    slots = [table.acquire(f"a{i}", _adapter("proj", 16, 4096, 4096, 2.0, i)) for i in range(32)]
    static = torch.tensor(slots, device="cuda")
    x = torch.randn(32, 1, 4096, device="cuda", dtype=torch.bfloat16)
    layer = table.layers["proj"]
    with torch.no_grad():
        decode = StepContext("decode", table.rows_for(static, 16, "decode"))
        assert decode.lora.kernel is not None  # built without autograd: the kernel path
        with step_context(decode):
            eager = model(x)  # also the warm-up: compiles
        ref = layer.base_layer(x).float().view(32, -1) + kb.reference_delta(
            x.view(32, -1), layer.lora_a, layer.lora_b, static, 16)
        with step_context(StepContext("prefill", table.rows_for(static, 16, "prefill"))):
            dense = model(x)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), step_context(decode):
            out = model(x)
    graph.replay()
    torch.cuda.synchronize()
    _assert_close_bf16(out.view(32, -1), eager.float().view(32, -1), "graph vs eager")
    _assert_close_bf16(out.view(32, -1), ref, "kernel vs fp32 reference")
    bad = (dense.float().view(32, -1) - ref).abs() > 4 * ULP[torch.bfloat16] * ref.abs() + 5e-2
    assert not bad.any(), f"dense vs fp32 reference: {int(bad.sum())} of {bad.numel()} outputs off"
