"""Float weights through the split-K decode kernel (``kernels/dense_splitk.py``): against torch in fp64, the
engine's choice (switched, tuned, fitting), the LoRA shrink in its launch against the shrink's own kernel, the
tiles' pruning, and every tile compiled for the H200 (Triton's interpreter on the CPU; ``gpu``: compiled on CUDA;
``sm90``: compiled for sm_90 here)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

km = pytest.importorskip("adapterd.server.kernels.int8_matmul", reason="needs triton (the dev extra, Linux)")
from adapterd.server.kernels import dense_splitk, int8_shrink  # noqa: E402 (after the skip: they import triton)
from adapterd.server.kernels.int8_configs import _DENSE_SMEM, _dense_configs, _prune_dense  # noqa: E402
from adapterd.server.kernels.lora_bgmv import lora_shrink  # noqa: E402
from tests.server.kernels.test_int8_shrink import check_one_launch_on_the_gpu, compile_for_hopper  # noqa: E402

# A float output's rounding: the kernel's fp32 sum rounded once (round to nearest on a GPU; the interpreter's
# bf16 cast truncates), against fp64: within one unit in the last place of the output's dtype, plus fp32's own
ULP = {torch.float32: 2.0 ** -20, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}
TILES = {  # each path of the kernel: one split, splits with a K tile past K's end, a wide row block
    "one-split": (5, {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "SPLIT_K": 1}),
    "three-splits-ragged-k": (7, {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "SPLIT_K": 3}),
    "wide-rows": (20, {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32, "SPLIT_K": 2}),
}


def _case(rows: int, k: int, n: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, k, generator=g).to(dtype), torch.randn(n, k, generator=g).to(dtype) / k ** 0.5,
            torch.randn(n, generator=g).to(dtype))


@pytest.mark.parametrize("tiles", sorted(TILES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_each_tile_gives_torchs_product_within_one_rounding(tiles, dtype, with_bias):
    """``x @ W.T + b`` for every row, within one rounding of the fp64 product (K = 200: no tile of 32 or 64 columns
    divides it, so the last K tile is masked), whatever the tiles, splits and row blocks."""
    rows, config = TILES[tiles]
    x, w, b = _case(rows, 200, 70, dtype)
    bias = b if with_bias else None
    got = dense_splitk.splitk_linear(x, w, bias, config=config)
    want = F.linear(x.double(), w.double(), None if bias is None else bias.double())
    assert got.dtype == dtype and got.shape == (rows, 70)
    assert ((got.double() - want).abs() <= ULP[dtype] * want.abs() + 1e-5).all(), (got.double() - want).abs().max()


def test_leading_dimensions_and_the_engines_choice(monkeypatch):
    """x as a decode step gives it (``[rows, 1, K]``) keeps its leading dimensions. The engine takes the kernel
    (``chosen``) only where switched on (``IN_DECODE``), then for 2-64 rows of one float dtype with a weight
    contiguous along K; not for one row (the GEMV's), 65 rows, mixed dtypes or a transposed weight."""
    x, w, b = _case(6, 96, 40, torch.float32)
    assert dense_splitk.IN_DECODE is True  # on by default (pdl_bench --switch dense, H100)
    monkeypatch.setattr(dense_splitk, "IN_DECODE", False)
    assert not dense_splitk.chosen(x[:, None], w, b)
    monkeypatch.setattr(dense_splitk, "IN_DECODE", True)
    assert dense_splitk.chosen(x[:, None], w, b) and dense_splitk.chosen(x, w, b)
    y = dense_splitk.splitk_linear(x[:, None], w, b)
    assert y.shape == (6, 1, 40) and torch.equal(y[:, 0], dense_splitk.splitk_linear(x, w, b))
    assert not torch.equal(y, F.linear(x[:, None], w, b))  # another order of sums: the kernel ran
    wide = torch.randn(96, 40).t()  # [40, 96] with a K stride of 40
    for args in ((x[:1], w, b), (x.repeat(11, 1), w, b), (x.double(), w, b), (x, w.half(), b), (x, wide, b),
                 (x, w, b[:5])):
        assert not dense_splitk.chosen(*args)


def test_on_a_gpu_a_tuned_bucket_hosts_shrinks_and_one_timed_no_slower_runs_alone_too(monkeypatch):
    """Compiled (no interpreter), a row bucket takes the kernel only once ``warm_up`` tuned its tiles (its choice is
    in ``int8_matmul._CHOSEN``: a call inside a graph capture never tunes): then a matmul hosting a LoRA shrink
    takes it (``hosts_shrink``), and one without only where the warm-up timed the kernel no slower than
    ``F.linear`` (``chosen``), so that base-only steps keep cuBLAS. Off a GPU nothing fits."""
    x, w, _ = _case(6, 96, 40, torch.bfloat16)
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setattr(dense_splitk, "IN_DECODE", True)
    monkeypatch.setattr(km, "_CHOSEN", {})
    monkeypatch.setattr(dense_splitk, "_FASTER", set())
    assert not dense_splitk.fits(x, w)  # the CPU: no kernel runs here
    monkeypatch.setattr(dense_splitk, "fits", lambda *args: True)  # as on a GPU
    assert not dense_splitk.tuned(x, w) and not dense_splitk.hosts_shrink(x, w) and not dense_splitk.chosen(x, w)
    km._CHOSEN[km._small_key(False, 8, x, w, None, None)] = km._INTERPRET_SMALL
    assert dense_splitk.tuned(x, w) and not dense_splitk.tuned(x[:2], w)  # bucket 8 tuned, bucket 2 not
    assert dense_splitk.hosts_shrink(x, w) and not dense_splitk.chosen(x, w)  # slower than cuBLAS, or not timed
    dense_splitk._FASTER.add(km._small_key(False, 8, x, w, None, None))
    assert dense_splitk.chosen(x, w) and dense_splitk.chosen(x[:5], w) and not dense_splitk.chosen(x[:2], w)
    monkeypatch.setattr(dense_splitk, "IN_DECODE", False)
    assert not dense_splitk.hosts_shrink(x, w) and not dense_splitk.chosen(x, w)


def test_warm_up_tunes_each_bucket_and_times_it_once_a_process(monkeypatch):
    """Each (bucket, shape) tunes, then is timed against ``F.linear`` once a process (the engine warms up at every
    start): a bucket where the kernel was no slower runs without a shrink too (``chosen``), one where it was slower
    only hosts shrinks; ``judgements(clear=True)`` hands the times over once. (The timer is a stand-in here: it
    runs on CUDA graphs.)"""
    from adapterd.server.kernels import step_judge

    monkeypatch.setattr(dense_splitk, "IN_DECODE", True)
    for name in ("_JUDGED", "_TIMED", "_FASTER"):
        monkeypatch.setattr(dense_splitk, name, type(getattr(dense_splitk, name))())
    monkeypatch.setattr(dense_splitk, "_times_on", lambda device: True)
    timed = []

    def in_step_us(x, weight, runs):
        for run in runs:  # each run works on the weight as a step would call it
            assert torch.allclose(run(x, weight).float(), F.linear(x, weight).float(), atol=1e-5)
        timed.append(x.shape[0])
        return (10.0, 12.0) if x.shape[0] == 2 else (15.0, 12.0)  # the kernel faster at 2 rows, slower at 8

    monkeypatch.setattr(step_judge, "in_step_us", in_step_us)
    _, w, _ = _case(1, 96, 40, torch.float32)
    times = dense_splitk.warm_up([(w, None), (w.clone(), None)], [2, 8])
    assert timed == [2, 8] and times == {(2, 40, 96): (10.0, 12.0), (8, 40, 96): (15.0, 12.0)}
    assert dense_splitk.warm_up([(w, None)], [2, 8]) == times and timed == [2, 8]  # not timed again
    monkeypatch.delenv("TRITON_INTERPRET")  # as compiled: only what the warm-up found no slower runs alone
    monkeypatch.setattr(dense_splitk, "fits", lambda *args: True)
    monkeypatch.setattr(km, "_CHOSEN", {km._small_key(False, b, torch.zeros(b, 96), w, None, None): {} for b in (2, 8)})
    x2, x8 = torch.zeros(2, 96), torch.zeros(7, 96)
    assert dense_splitk.chosen(x2, w) and not dense_splitk.chosen(x8, w) and dense_splitk.hosts_shrink(x8, w)
    assert dense_splitk.judgements(clear=True) == times and dense_splitk.judgements() == {}


def test_the_shrink_in_a_float_weights_launch_gives_the_two_launches_values(monkeypatch):
    """Switched on (``IN_DECODE``; the engine asks ``shrinks_in_launch``, which wants ``int8_shrink.IN_MATMUL``
    too): the matmul's output equals the kernel alone and the adapter rows' partials ``lora_shrink``'s, bit for
    bit (q/k/v's three members, rank 16, K 4096: 16 splits); off, nothing is launched."""
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(6, 4096, generator=g), torch.randn(48, 4096, generator=g) / 64
    a = torch.randn(3, 19, 5, 4096, generator=g) / 64
    a[:, :, 0] = 0
    slots = torch.arange(6) % 5
    monkeypatch.setattr(dense_splitk, "IN_DECODE", False)
    monkeypatch.setattr(int8_shrink, "IN_MATMUL", False)
    assert not dense_splitk.shrinks_in_launch(w)
    assert dense_splitk.matmul_and_shrink(x, w, None, a, slots, 16) is None
    monkeypatch.setattr(dense_splitk, "IN_DECODE", True)
    assert not dense_splitk.shrinks_in_launch(w)
    monkeypatch.setattr(int8_shrink, "IN_MATMUL", True)
    assert dense_splitk.shrinks_in_launch(w)
    y, partials = dense_splitk.matmul_and_shrink(x, w, None, a, slots, 16)
    live = slots != 0
    assert torch.equal(y, dense_splitk.splitk_linear(x, w))
    assert torch.equal(partials.p[:, :, live], lora_shrink(x, a, slots, 16).p[:, :, live])
    assert dense_splitk.matmul_and_shrink(x[:1], w, None, a, slots[:1], 16) is None  # one row: the GEMV's


@pytest.mark.parametrize("bucket", [2, 16, 32, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_each_bucket_tunes_among_tiles_that_fit(bucket, dtype):
    """A key's candidates: BLOCK_M 16 or the bucket's own, no more splits than K tiles, 16 splits only up to 16
    rows, and every stage's x and weight tiles within the shared memory allowed (fp32 drops the largest)."""
    x, w = torch.empty(bucket, 4096, dtype=dtype), torch.empty(12288, 4096, dtype=dtype)
    configs = _dense_configs()
    kept = _prune_dense(configs, {"M_BUCKET": bucket, "K": 4096, "x_ptr": x, "w_ptr": w})
    assert kept and len(kept) <= 25
    for c in kept:
        bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        assert bm in (16, bucket) and (c.kwargs["SPLIT_K"] < 16 or bucket <= 16)
        assert c.num_stages * (bm * bk + bk * bn) * x.element_size() <= _DENSE_SMEM
    if bucket in (32, 64):
        assert any(c.kwargs["BLOCK_M"] == bucket for c in kept)
    allowed = [c for c in configs if c.kwargs["BLOCK_M"] in (16, bucket) and (c.kwargs["SPLIT_K"] < 16 or bucket <= 16)]
    assert (len(kept) < len(allowed)) == (dtype == torch.float32)  # bf16: every allowed tile fits
    few = _prune_dense(configs, {"M_BUCKET": 4, "K": 64, "x_ptr": x, "w_ptr": w})  # one K tile of 64: no split
    assert few and all(c.kwargs["SPLIT_K"] == 1 for c in few)


@pytest.mark.sm90
@pytest.mark.parametrize("shrink", [False, True], ids=["alone", "with-shrink"])
def test_every_float_tile_compiles_for_hopper(shrink, monkeypatch, tmp_path):
    """No GPU here, but Triton's own ptxas: every float tile compiles for sm_90 (bf16, the unit strides and
    16-divisible sizes Triton specializes at run time), alone and with the q/k/v shrink's programs (rank 16 at K
    4096), on the tensor cores, the weight streamed by ``cp.async``, within the shared memory a block may have,
    nothing spilled."""
    import re
    import subprocess
    from pathlib import Path

    import triton

    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    for c in _dense_configs():
        compiled = compile_for_hopper(c, weight="*bf16", SHRINK=shrink)
        ptx = compiled.asm["ptx"]
        assert "mma" in ptx and "cp.async" in ptx, c
        assert compiled.metadata.shared <= 227 << 10, (c, compiled.metadata.shared)
        cubin = tmp_path / "dense.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([str(cuobjdump), "-res-usage", str(cubin)], capture_output=True, text=True,
                               check=True).stdout
        assert re.search(r"STACK:0\b", usage), (c.all_kwargs(), usage)  # no spill


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [8, 32])
def test_gpu_at_the_llama_qkv_shape_against_cublas_with_the_shrink_and_in_a_cuda_graph(rows):
    """On the GPU at Llama-2-7B's fused q/k/v (12288x4096 bf16, three members, 32 adapters, rank 16), the bucket
    tuned by ``warm_up``: within one bf16 rounding of cuBLAS's fp32-accumulated product, the shrink in its launch
    within fp32 summation order of ``lora_shrink``'s, and a CUDA graph replays the one launch with new inputs."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    g = torch.Generator().manual_seed(rows)
    w = (torch.randn(12288, 4096, generator=g) / 64).to(torch.bfloat16).cuda()
    x = torch.randn(rows, 4096, generator=g).to(torch.bfloat16).cuda()
    a = (torch.randn(3, 16, 33, 4096, generator=g) / 64).to(torch.bfloat16).cuda()
    a[:, :, 0] = 0
    slots = (torch.arange(rows) % 33).cuda()
    times = dense_splitk.warm_up([(w, None)], [km.row_bucket(rows)])
    assert set(times) == {(km.row_bucket(rows), 12288, 4096)}
    want = F.linear(x.float(), w.float())
    got = dense_splitk.splitk_linear(x, w)
    assert ((got.float() - want).abs() <= 2 ** -8 * want.abs() + 1e-3).all()
    check_one_launch_on_the_gpu(x, w, None, a, slots, lambda x: dense_splitk.splitk_linear(x, w), g)
