"""o_proj's LoRA expand in its split-K matmul's launch (``kernels/int8_expand.py``): the matmul's output and the
delta's sums from one launch, against the matmul alone, against torch, and against the add + norm's own fold
(Triton's interpreter on the CPU; ``gpu``: compiled on CUDA; ``sm90``: compiled for the H200 here)."""

from __future__ import annotations

import pytest
import torch

km = pytest.importorskip("adapterd.server.kernels.int8_matmul", reason="needs triton (the dev extra, Linux)")
from adapterd.server.adapters.lora_folds import add_output_delta  # noqa: E402
from adapterd.server.kernels import int8_expand  # noqa: E402 (after the skip: it imports triton)
from adapterd.server.kernels import rms_norm as rn  # noqa: E402
from adapterd.server.kernels.lora_bgmv import LoraPartials, lora_expand_  # noqa: E402

SLOTS = 4  # adapter slots in the tables; slot 0 is "no adapter" (all zeros, as the slot table keeps it)
CONFIGS = {  # the matmul's tiles: tensor-core (one split, two: the expand's programs on axis 1, then 2), GEMV
    "tc-1split": (5, {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 1, "num_warps": 4}),
    "tc-2splits": (17, {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "SPLIT_K": 2, "num_warps": 2}),
    "gemv": (1, {"BLOCK_M": 1, "BLOCK_N": 8, "BLOCK_K": 32, "SPLIT_K": 1, "num_warps": 1}),
}


def _case(rows: int, k: int, n: int, rank: int, splits: int, dtype: torch.dtype, seed: int = 0):
    """x, an int8 weight and its row scales, a bias, and o_proj's pending delta (``OutputDelta``): B ``[R, slots,
    n]`` (slot 0 zeros), partials ``[1, splits, rows, 16]`` as the attention merge leaves them (NaN on slot-0 rows:
    never written there, so never read); row i on slot i % SLOTS, so base rows sit between adapter rows."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g).to(dtype)
    cb = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    scb = torch.rand(n, generator=g) + 0.05
    bias = torch.randn(n, generator=g)
    lora_b = (torch.randn(rank + 2, SLOTS, n, generator=g) * 0.1).to(dtype)
    lora_b[:, 0] = 0
    slots = torch.arange(rows) % SLOTS
    p = torch.randn(1, splits, rows, 16, generator=g) * 0.1
    p[:, :, slots == 0] = float("nan")
    return x, cb, scb, bias, rn.OutputDelta(LoraPartials(p, slots, rank), lora_b)


def _delta_by_torch(delta: rn.OutputDelta) -> torch.Tensor:
    """Each row's ``(sum over splits of its partials)[:rank] @ B[:rank, slot]`` in fp64 by torch alone (the
    oracle), zeros for base rows."""
    p, slots, rank = delta.partials.p, delta.partials.slots, delta.partials.rank
    xa = p[0, :, :, :rank].double().sum(0)  # [rows, rank]
    out = torch.einsum("mr,rmn->mn", xa, delta.lora_b[:rank, slots].double())
    return torch.where((slots != 0)[:, None], out, 0.0)


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_one_launch_gives_the_matmul_bit_for_bit_and_the_deltas_sums(config, dtype):
    """The matmul's output equals the matmul launched alone with the same tiles, bit for bit; the delta's sums
    equal torch's for every adapter row within fp32's rounding, zeros for base rows (whose NaN partials reach
    nothing); the delta handed back is the one given, its sums done."""
    rows, tiles = CONFIGS[config]
    x, cb, scb, bias, delta = _case(rows, 256, 72, 3, 5, dtype)
    y, done = int8_expand.matmul_and_expand(x, cb, scb, bias, delta, config=tiles)
    assert torch.equal(y, km._small_m(x, cb, scb, bias, True, config=tiles))
    assert done.partials is delta.partials and done.lora_b is delta.lora_b and done.done.shape == (rows, 72)
    assert done.done.dtype == torch.float32 and torch.isfinite(done.done).all()
    torch.testing.assert_close(done.done.double(), _delta_by_torch(delta), rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_the_sums_are_the_same_whatever_columns_a_program_takes(monkeypatch):
    """``PROGRAM_ELEMS`` only sets how many columns of a row one extra program computes (the launch's shape): 32
    columns (three programs a row of 72, the last one part-masked) and 1024 (one, mostly masked) give the same
    sums bit for bit, torch's within fp32's rounding, and the same matmul."""
    rows, tiles = CONFIGS[sorted(CONFIGS)[0]]
    x, cb, scb, bias, delta = _case(rows, 256, 72, 3, 5, torch.bfloat16)
    results = []
    for elems in (32 * delta.partials.block_r, 1024 * delta.partials.block_r):
        monkeypatch.setattr(int8_expand, "PROGRAM_ELEMS", elems)
        results.append(int8_expand.matmul_and_expand(x, cb, scb, bias, delta, config=tiles))
    (y_narrow, narrow), (y_wide, wide) = results
    assert torch.equal(y_narrow, y_wide) and torch.equal(narrow.done, wide.done)
    torch.testing.assert_close(narrow.done.double(), _delta_by_torch(delta), rtol=1e-5, atol=1e-6)


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_norm_adds_the_sums_as_its_own_fold_would(dtype):
    """The post-attention add + norm given the done sums gives what it gives folding the delta itself, bit for bit
    (the interpreter sums both the same way), and the expand's own launch where the norm cannot take it
    (``add_output_delta``) what the expand kernel gives (bit for bit in fp32): a float weight's launch (``scb``
    None) here, 4096 columns as the 7B shape's o_proj."""
    rows, n = 6, 4096
    x, _, _, bias, delta = _case(rows, 64, n, 16, 32, dtype, seed=1)
    weight = (torch.randn(n, 64) / 8).to(dtype)
    y, done = int8_expand.matmul_and_expand(x, weight, None, bias.to(dtype), delta)
    residual = torch.randn(rows, n).to(dtype)
    norm_weight = (torch.rand(n) + 0.5).to(dtype)
    assert done.fits(y)
    folded = rn.fused_add_rms_norm(residual, y, norm_weight, 1e-5, delta)
    added = rn.fused_add_rms_norm(residual, y, norm_weight, 1e-5, done)
    assert torch.equal(folded[0], added[0]) and torch.equal(folded[1], added[1])
    expanded = y.clone()
    lora_expand_((expanded,), delta.partials, (delta.lora_b,))
    if dtype == torch.float32:
        assert torch.equal(add_output_delta(done, y.clone()), expanded)
    else:  # the interpreter's cast to bf16 truncates where torch's rounds to nearest: a unit of the last place
        torch.testing.assert_close(add_output_delta(done, y.clone()).float(), expanded.float(), rtol=2 ** -7, atol=0)


def test_none_where_it_does_not_run(monkeypatch):
    """Nothing launched (None) where the one launch cannot serve: more rows than the split-K kernel takes, partials
    of other rows, B of another width, sums already done; and off the GPU without the interpreter."""
    x, cb, scb, bias, delta = _case(4, 256, 72, 3, 5, torch.float32)
    many, *_ = _case(68, 256, 72, 3, 5, torch.float32)
    assert int8_expand.matmul_and_expand(many, cb, scb, bias, delta) is None
    assert int8_expand.matmul_and_expand(x[:3], cb, scb, bias, delta) is None
    assert int8_expand.matmul_and_expand(x, cb[:64], scb[:64], bias[:64], delta) is None
    _, done = int8_expand.matmul_and_expand(x, cb, scb, bias, delta)
    assert int8_expand.matmul_and_expand(x, cb, scb, bias, done) is None
    monkeypatch.delenv("TRITON_INTERPRET")
    assert int8_expand.matmul_and_expand(x, cb, scb, bias, delta) is None


def test_the_engine_takes_it_for_an_int8_o_proj_by_default_and_for_a_float_one_where_switched(monkeypatch):
    """``dense_splitk.layer_with_expand`` (the decoder's o_proj): an int8 layer launches the expand while
    ``IN_MATMUL`` is on (the default: it paid on the H100) and not when off; a float ``nn.Linear`` whose bucket
    hosts a shrink does only while ``FLOAT_IN_MATMUL`` is on (off by default: even or behind for bf16)."""
    from torch import nn

    from adapterd.server.kernels import dense_splitk
    from adapterd.server.kernels.int8_linear import Int8WeightOnlyLinear

    assert int8_expand.IN_MATMUL is True and int8_expand.FLOAT_IN_MATMUL is False
    x, cb, scb, bias, delta = _case(4, 256, 72, 3, 5, torch.float32)
    int8_layer, float_layer = Int8WeightOnlyLinear(cb, scb, bias), nn.Linear(256, 72)
    launched = []
    monkeypatch.setattr(int8_expand, "matmul_and_expand", lambda x, w, scb, *_: launched.append(scb is not None))
    monkeypatch.setattr(dense_splitk, "hosts_shrink", lambda *_: True)
    for switch in (True, False):
        monkeypatch.setattr(int8_expand, "IN_MATMUL", switch)
        monkeypatch.setattr(int8_expand, "FLOAT_IN_MATMUL", not switch)
        dense_splitk.layer_with_expand(int8_layer, x, delta)
        dense_splitk.layer_with_expand(float_layer, x, delta)
    assert launched == [True, False]  # the int8 layer's with IN_MATMUL, then the float one's with FLOAT_IN_MATMUL


@pytest.mark.sm90
def test_each_kind_of_decode_tile_compiles_with_the_expand_for_hopper(monkeypatch, tmp_path):
    """No GPU here, but Triton's own ptxas: the decode tiles, the int8 weight's and a bf16 weight's, compile for
    sm_90 with the expand's programs (rank 16, 32 splits: o_proj's partials from the 7B shape's merge, a [16, 1024]
    tile of bf16 B a program): one tile of each kind the expand's code depends on (GEMV or tensor cores, one split or
    more, the warps of a program; the matmul's own code is the same as without it, and the shrink's and the split-K
    tests compile every tile). Under PDL, B's loads (the only evict-first ones where the weight streams through
    ``cp.async``) are issued before ``griddepcontrol.wait``; launched without PDL (the 32- and 64-row tiles), the
    matmul's programs neither wait nor trigger and the expand's trigger the next kernel's launch."""
    import re

    from tests.server.kernels.test_int8_shrink import compile_for_hopper

    def kinds(configs):
        first = {}
        for c in configs:
            first.setdefault((c.kwargs["BLOCK_M"] == 1, c.kwargs["SPLIT_K"] > 1, c.num_warps), c)
        return list(first.values())

    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    expand = {"SHRINK": False, "EXPAND": True, "E_BLOCK_S": 32, "E_BLOCK_N": int8_expand.PROGRAM_ELEMS // 16}
    for weight, configs in (("*i8", kinds(km._small_configs())), ("*bf16", kinds(km._dense_configs()))):
        assert len(configs) >= 3, configs
        for c in configs:
            ptx = compile_for_hopper(c, weight, **expand).asm["ptx"]
            if c.kwargs["BLOCK_M"] > 1:  # B's loads alone, each issued before the expand's own wait
                loads = re.findall(r"ld\.global\.L1::evict_first", ptx)
                first = ptx.index("ld.global.L1::evict_first")
                assert "cp.async" in ptx and loads, c
                assert ptx[first:ptx.index("griddepcontrol.wait", first)].count("ld.global.L1::evict_first") == len(
                    loads), (c, len(loads))
    for c in [c for c in km._small_configs() if c.kwargs["BLOCK_M"] == 32][:2]:
        ptx = compile_for_hopper(c, USE_PDL=False, **expand).asm["ptx"]
        assert "griddepcontrol.wait" not in ptx and ptx.count("griddepcontrol.launch_dependents") == 1, c


@pytest.mark.gpu
@pytest.mark.parametrize(("rows", "dtype"), [(1, "int8"), (8, "int8"), (32, "int8"), (32, "bf16")])
def test_gpu_at_the_llama_o_proj_shape_against_the_matmul_alone_and_in_a_cuda_graph(rows, dtype):
    """On the GPU at Llama-2-7B's o_proj (4096x4096, rank 16, 32 splits, 33 slots), with the row bucket's tuned tiles
    (an int8 weight, or a bf16 one through the split-K kernel): the output equals the matmul alone bit for bit (the
    same tiles and sums), the sums torch's within fp32 summation order, and a CUDA graph replays the one launch with
    new inputs."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from adapterd.server.kernels import dense_splitk

    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 4096, generator=g).to(torch.bfloat16).cuda()
    if dtype == "int8":
        w = torch.randint(-127, 128, (4096, 4096), generator=g, dtype=torch.int8).cuda()
        scb = (torch.rand(4096, generator=g) + 0.05).cuda()

        def alone(x):
            return km.int8_weight_matmul(x, w, scb)
    else:
        w, scb = (torch.randn(4096, 4096, generator=g) / 64).to(torch.bfloat16).cuda(), None

        def alone(x):
            return dense_splitk.splitk_linear(x, w)
    alone(x)  # tunes the bucket first
    lora_b = (torch.randn(16, 33, 4096, generator=g) * 0.1).to(torch.bfloat16).cuda()
    lora_b[:, 0] = 0
    slots = (torch.arange(rows) % 33).cuda()
    p = (torch.randn(1, 32, rows, 16, generator=g) * 0.1).cuda()
    delta = rn.OutputDelta(LoraPartials(p, slots, 16), lora_b)

    def check(y, done) -> None:
        assert torch.equal(y, alone(x))
        torch.testing.assert_close(done.done.double(), _delta_by_torch(delta), rtol=1e-4, atol=1e-4)

    result = int8_expand.matmul_and_expand(x, w, scb, None, delta)
    assert result is not None
    check(*result)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y, done = int8_expand.matmul_and_expand(x, w, scb, None, delta)
    x.copy_(torch.randn(x.shape, generator=g).to(x.dtype))
    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    graph.replay()
    torch.cuda.synchronize()
    check(y, done)
