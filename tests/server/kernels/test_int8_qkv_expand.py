"""q/k/v's LoRA shrink and its expand in their fused split-K matmul's one launch (``kernels/int8_qkv_expand.py``):
the matmul's output, the shrink's partials and the expand's sums from one launch, against the launch with the
shrink alone, against torch, and the rotary kernel given the sums against the same kernel summing them itself
(Triton's interpreter on the CPU; ``gpu``: compiled on CUDA; ``sm90``: compiled for the H200 here)."""

from __future__ import annotations

import pytest
import torch

km = pytest.importorskip("adapterd.server.kernels.int8_matmul", reason="needs triton (the dev extra, Linux)")
from adapterd.server.adapters.lora_folds import add_qkv_deltas  # noqa: E402
from adapterd.server.kernels import int8_qkv_expand as qe  # noqa: E402 (after the skip: it imports triton)
from adapterd.server.kernels import int8_shrink  # noqa: E402
from adapterd.server.kernels.rope_append import QkvDeltas, rope_append  # noqa: E402

SLOTS = 4  # adapter slots in the tables; slot 0 is "no adapter" (all zeros, as the slot table keeps it)
CONFIGS = {  # the matmul's tiles: tensor-core (one split, two: the extra programs on axis 1, then 2), GEMV
    "tc-1split": (5, {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 1, "num_warps": 4}),
    "tc-2splits": (17, {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "SPLIT_K": 2, "num_warps": 2}),
    "gemv": (1, {"BLOCK_M": 1, "BLOCK_N": 8, "BLOCK_K": 32, "SPLIT_K": 1, "num_warps": 1}),
}
HEAD = 16  # head size of the rotary cases
WIDTHS = (4 * HEAD, 2 * HEAD, 2 * HEAD)  # q, k, v: four query heads, two key/value heads
WRAPPED = {"qkv": (True, True, True), "qv": (True, False, True), "k": (False, True, False)}


def _case(rows: int, k: int, rank: int, dtype: torch.dtype, wrapped=(True, True, True), seed: int = 0):
    """x, an int8 fused q/k/v weight and its row scales, a bias, the wrapped members' A tables stacked (``[G, R,
    slots, k]``) and q's, k's, v's B tables (None where unwrapped; slot 0 zeros), the rows' slots (row i on slot
    i % SLOTS, so base rows sit between adapter rows)."""
    g = torch.Generator().manual_seed(seed)
    n = sum(WIDTHS)
    x = torch.randn(rows, k, generator=g).to(dtype)
    cb = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    scb = torch.rand(n, generator=g) + 0.05
    bias = torch.randn(n, generator=g)
    lora_a = (torch.randn(sum(wrapped), rank + 1, SLOTS, k, generator=g) * 0.1).to(dtype)
    lora_a[:, :, 0] = 0
    tables = []
    for on, width in zip(wrapped, WIDTHS, strict=True):
        b = (torch.randn(rank + 1, SLOTS, width, generator=g) * 0.1).to(dtype) if on else None
        if b is not None:
            b[:, 0] = 0
        tables.append(b)
    return x, cb, scb, bias, lora_a, tuple(tables), torch.arange(rows) % SLOTS


def _sums_by_torch(x, lora_a, tables, slots, rank) -> list[torch.Tensor | None]:
    """Each wrapped member's ``x A[:rank, slot]^T B[:rank, slot]`` a row in fp64 by torch alone (the oracle), zeros
    for base rows; None for an unwrapped member."""
    out, member = [], 0
    for b in tables:
        if b is None:
            out.append(None)
            continue
        xa = torch.einsum("mk,rmk->mr", x.double(), lora_a[member, :rank, slots].double())
        out.append(torch.einsum("mr,rmn->mn", xa, b[:rank, slots].double()))
        member += 1
    return out


def _check_sums(d: torch.Tensor, expected: list[torch.Tensor | None], tol: float) -> None:
    first = 0
    for want, width in zip(expected, WIDTHS, strict=True):
        if want is not None:
            torch.testing.assert_close(d[:, first:first + width].double(), want, rtol=tol, atol=tol)
        first += width


@torch.no_grad()
@pytest.mark.parametrize("wrapped", sorted(WRAPPED))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_one_launch_gives_the_matmul_the_partials_and_the_expands_sums(config, dtype, wrapped):
    """The matmul's output and the shrink's partials (adapter rows: base rows' are never written) equal the launch
    with the shrink alone, bit for bit; each wrapped member's sums equal torch's within fp32's rounding, zeros for
    base rows; the counters are back at zero (the next launch, or a CUDA graph's replay, starts from them)."""
    rows, tiles = CONFIGS[config]
    x, cb, scb, bias, lora_a, tables, slots = _case(rows, 256, 3, dtype, WRAPPED[wrapped])
    y, partials, d = qe.matmul_shrink_and_expand(x, cb, scb, bias, lora_a, slots, 3, tables, WIDTHS, config=tiles)
    y_alone, alone = int8_shrink.matmul_and_shrink(x, cb, scb, bias, lora_a, slots, 3, config=tiles)
    adapter_rows = slots != 0
    assert torch.equal(y, y_alone) and torch.equal(partials.p[:, :, adapter_rows], alone.p[:, :, adapter_rows])
    assert d.shape == (rows, sum(WIDTHS)) and d.dtype == torch.float32
    _check_sums(d, _sums_by_torch(x, lora_a, tables, slots, 3), 1e-5 if dtype == torch.float32 else 2e-2)
    assert torch.equal(qe.counters(x.device), torch.zeros(qe.COUNTERS, dtype=torch.int32))


@torch.no_grad()
@pytest.mark.parametrize("wrapped", sorted(WRAPPED))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_rotary_kernel_adds_the_sums_as_its_own_expand_would(dtype, wrapped):
    """``rope_append`` given the done sums (``QkvDeltas.done``) writes the same rotated query, keys and values as
    given the partials and B (it sums them itself), bit for bit (the interpreter sums both the same way); and
    ``add_qkv_deltas`` (where the rotary kernel cannot take them) adds the sums to the same q, k, v as it adds the
    partials times B, up to the interpreter's bf16 cast (it truncates where torch rounds)."""
    rows = 5
    x, cb, scb, bias, lora_a, tables, slots = _case(rows, 64, 3, dtype, WRAPPED[wrapped], seed=1)
    y, partials, d = qe.matmul_shrink_and_expand(x, cb, scb, bias.to(dtype), lora_a, slots, 3, tables, WIDTHS)
    q, k, v = (t.view(rows, 1, -1, HEAD) for t in y.split(WIDTHS, dim=-1))
    cos, sin = torch.randn(rows, 1, HEAD).to(dtype), torch.randn(rows, 1, HEAD).to(dtype)
    write_pos = torch.arange(rows) % 3
    summed, given = QkvDeltas(partials, tables), QkvDeltas(partials, tables, d)
    assert summed.fits(q, k) and given.fits(q, k)
    outs = []
    for deltas in (summed, given):
        keys, values = torch.zeros(rows, 2, 4, HEAD, dtype=dtype), torch.zeros(rows, 2, 4, HEAD, dtype=dtype)
        outs.append((rope_append(q, k, v, cos, sin, keys, values, write_pos, deltas), keys, values))
    for a, b in zip(*outs, strict=True):
        assert torch.equal(a, b)
    added = [[t.clone() for t in (q, k, v)] for _ in range(2)]
    add_qkv_deltas(summed, *added[0])
    add_qkv_deltas(given, *added[1])
    for a, b in zip(*added, strict=True):
        if dtype == torch.float32:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a.float(), b.float(), rtol=2 ** -7, atol=0)


def test_none_where_it_does_not_run(monkeypatch):
    """Nothing launched (None) where the one launch cannot serve: more rows than the split-K kernel takes, widths
    that do not add up to the output, a table for a member the shrink has no A for, tables of two dtypes, a rank
    past the tables; and off the GPU without the interpreter."""
    x, cb, scb, bias, lora_a, tables, slots = _case(4, 256, 3, torch.float32)
    many, *_ = _case(68, 256, 3, torch.float32)
    assert qe.matmul_shrink_and_expand(many, cb, scb, bias, lora_a, torch.arange(68) % SLOTS, 3, tables,
                                       WIDTHS) is None
    assert qe.matmul_shrink_and_expand(x, cb, scb, bias, lora_a, slots, 3, tables, (64, 32, 16)) is None
    assert qe.matmul_shrink_and_expand(x, cb, scb, bias, lora_a[:2], slots, 3, tables, WIDTHS) is None
    mixed = (tables[0], tables[1].to(torch.bfloat16), tables[2])
    assert qe.matmul_shrink_and_expand(x, cb, scb, bias, lora_a, slots, 3, mixed, WIDTHS) is None
    assert qe.matmul_shrink_and_expand(x, cb, scb, bias, lora_a, slots, 5, tables, WIDTHS) is None
    assert qe.matmul_shrink_and_expand(x, cb, scb, bias, lora_a, slots, 3, tables, WIDTHS) is not None
    monkeypatch.delenv("TRITON_INTERPRET")
    assert qe.matmul_shrink_and_expand(x, cb, scb, bias, lora_a, slots, 3, tables, WIDTHS) is None


@pytest.mark.sm90
def test_each_kind_of_decode_tile_compiles_with_the_shrink_and_the_expand_for_hopper(monkeypatch, tmp_path):
    """No GPU here, but Triton's own ptxas: the decode tiles, the int8 weight's and a bf16 weight's, compile for
    sm_90 with the shrink's and the expand's programs chained (rank 16, 16 splits: the 7B shape's q/k/v shrink, a
    [16, 1024] tile of bf16 B an expand program): one tile of each kind (GEMV or tensor cores, one split or more,
    the warps of a program). The shrink's release and the expand's acquire are at the GPU's scope."""
    import re

    from tests.server.kernels.test_int8_shrink import compile_for_hopper

    def kinds(configs):
        first = {}
        for c in configs:
            first.setdefault((c.kwargs["BLOCK_M"] == 1, c.kwargs["SPLIT_K"] > 1, c.num_warps), c)
        return list(first.values())

    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    chain = {"CHAIN": True, "E_BLOCK_S": 16, "E_BLOCK_N": qe.PROGRAM_ELEMS // 16}
    for weight, configs in (("*i8", kinds(km._small_configs())), ("*bf16", kinds(km._dense_configs()))):
        assert len(configs) >= 3, configs
        for c in configs:
            ptx = compile_for_hopper(c, weight, **chain).asm["ptx"]
            assert re.search(r"\b(atom|red)\.global\.gpu\.(release|acq_rel)\.add", ptx), c  # the shrink's release
            assert re.search(r"\b(atom|ld)\.global\.gpu\.(acquire|acq_rel)\b", ptx), c  # the expand's acquire
            assert "bar.sync" in ptx, c  # the barriers around them (a program's threads' stores, then its reads)


@pytest.mark.gpu
@pytest.mark.parametrize(("rows", "dtype"), [(1, "int8"), (8, "int8"), (32, "int8"), (32, "bf16")])
def test_gpu_at_the_llama_qkv_shape_against_the_shrink_alone_and_in_a_cuda_graph(rows, dtype):
    """On the GPU at Llama-2-7B's fused q/k/v (12288x4096, rank 16, 33 slots), with the row bucket's tuned tiles (an
    int8 weight, or a bf16 one through the split-K kernel): the output and the partials equal the launch with the
    shrink alone bit for bit, the sums torch's within fp32 summation order, the counters back at zero, and a CUDA
    graph replays the one launch with new inputs."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    g = torch.Generator().manual_seed(rows)
    widths = (4096, 4096, 4096)
    x = torch.randn(rows, 4096, generator=g).to(torch.bfloat16).cuda()
    if dtype == "int8":
        w = torch.randint(-127, 128, (12288, 4096), generator=g, dtype=torch.int8).cuda()
        scb = (torch.rand(12288, generator=g) + 0.05).cuda()
        km.int8_weight_matmul(x, w, scb)  # tunes the bucket first
    else:
        from adapterd.server.kernels import dense_splitk

        w, scb = (torch.randn(12288, 4096, generator=g) / 64).to(torch.bfloat16).cuda(), None
        dense_splitk.splitk_linear(x, w)
    lora_a = (torch.randn(3, 16, 33, 4096, generator=g) * 0.02).to(torch.bfloat16).cuda()
    tables = tuple((torch.randn(16, 33, 4096, generator=g) * 0.1).to(torch.bfloat16).cuda() for _ in range(3))
    for t in (lora_a[:, :, 0], *(b[:, 0] for b in tables)):
        t.zero_()
    slots = (torch.arange(rows) % 33).cuda()

    def check(y, partials, d) -> None:
        y_alone, alone = int8_shrink.matmul_and_shrink(x, w, scb, None, lora_a, slots, 16)
        on = slots != 0
        assert torch.equal(y, y_alone)
        torch.testing.assert_close(partials.p[:, :, on], alone.p[:, :, on], rtol=1e-5, atol=1e-5)
        want = _sums_by_torch(x.cpu(), lora_a.cpu(), tuple(b.cpu() for b in tables), slots.cpu(), 16)
        for i, expected in enumerate(want):
            torch.testing.assert_close(d[:, 4096 * i:4096 * (i + 1)].double().cpu(), expected, rtol=1e-3, atol=1e-3)
        assert torch.equal(qe.counters(x.device).cpu(), torch.zeros(qe.COUNTERS, dtype=torch.int32))

    result = qe.matmul_shrink_and_expand(x, w, scb, None, lora_a, slots, 16, tables, widths)
    assert result is not None
    torch.cuda.synchronize()
    check(*result)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y, partials, d = qe.matmul_shrink_and_expand(x, w, scb, None, lora_a, slots, 16, tables, widths)
    for _ in range(3):
        x.copy_(torch.randn(x.shape, generator=g).to(x.dtype))
        graph.replay()
        torch.cuda.synchronize()
        check(y, partials, d)
