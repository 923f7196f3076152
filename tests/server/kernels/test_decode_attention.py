"""Decode-step attention split along the keys (server/kernels/decode_attention.py) against an fp32 computation
in torch (scores, masked softmax, weighted values) and against SDPA, in Triton's interpreter on the CPU; the
compiled kernels against the same on a GPU (``gpu`` tests)."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from adapterd.server.engine.kv_pool import decode_mask

da = pytest.importorskip("adapterd.server.kernels.decode_attention", reason="needs triton (the dev extra, Linux)")


def _case(rows, q_heads, kv_heads, dim, length, dtype, write_pos, seed=0, device="cpu", pool_dtype=None):
    """q as the rotary kernel returns it; keys and values as views of a pool layer with a row and 40 entries
    more than the step reads (so their strides are the pool's)."""
    g = torch.Generator().manual_seed(seed)
    pool_dtype = pool_dtype or dtype
    q = torch.randn(rows, q_heads, 1, dim, generator=g).to(dtype).to(device)
    pool_k = (torch.randn(rows + 1, kv_heads, length + 40, dim, generator=g) * 2).to(pool_dtype).to(device)
    pool_v = torch.randn(rows + 1, kv_heads, length + 40, dim, generator=g).to(pool_dtype).to(device)
    return q, pool_k[:rows, :, :length], pool_v[:rows, :, :length], torch.tensor(write_pos, device=device)


def _reference(q, keys, values, mask, scale):
    """fp32: scores, + mask, softmax, weighted values; key/value heads repeated for their query heads."""
    group = q.shape[1] // keys.shape[1]
    k = keys.float().repeat_interleave(group, dim=1)
    v = values.float().repeat_interleave(group, dim=1)
    scores = (q.float() @ k.transpose(-1, -2)) * scale + mask.float()
    return torch.softmax(scores, dim=-1) @ v


@pytest.mark.parametrize("q_heads, kv_heads", [(4, 4), (4, 2), (8, 2)])  # groups of 1, 2 and 4 query heads
@pytest.mark.parametrize("dim", [64, 80])  # 80: a head size that is not a power of two
@pytest.mark.parametrize("window", [None, 50])
def test_matches_fp32_reference_and_sdpa(q_heads, kv_heads, dim, window):
    """Rows of 6, 131 and 200 visible entries in a 200-entry bucket (4 splits, the last partial; the shortest
    row's last 3 splits see nothing and read nothing), with and without a sliding window."""
    q, keys, values, write_pos = _case(3, q_heads, kv_heads, dim, 200, torch.float32, [5, 130, 199])
    mask = decode_mask(write_pos, 200, torch.float32, window)
    assert da.fits(q, keys, values, mask)
    scale = dim ** -0.5
    out = da.decode_attention(q, keys, values, mask, scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out, _reference(q, keys, values, mask, scale), rtol=1e-5, atol=1e-5)
    sdpa = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale,
                                          enable_gqa=q_heads != kv_heads)
    torch.testing.assert_close(out, sdpa, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pool_dtype", [torch.bfloat16, torch.float32])
def test_bf16_within_one_rounding(pool_dtype):
    """bf16 queries (and a bf16 or fp32 pool, read in its own dtype): the fp32 result rounded once."""
    q, keys, values, write_pos = _case(2, 4, 2, 64, 150, torch.bfloat16, [149, 70], seed=1, pool_dtype=pool_dtype)
    mask = decode_mask(write_pos, 150, torch.bfloat16)
    out = da.decode_attention(q, keys, values, mask, 0.125)
    ref = _reference(q, keys, values, mask, 0.125)
    assert out.dtype == torch.bfloat16
    assert ((out.float() - ref).abs() <= 2.0**-7 * ref.abs() + 1e-6).all(), (out.float() - ref).abs().max()


def test_a_row_gets_the_same_bits_in_any_bucket():
    """Splits are fixed 64-entry chunks and a chunk that sees nothing adds exact zeros: a row of 90 entries
    served in a 128-entry bucket (alone) or a 1000-entry one (beside a long row) gets identical outputs."""
    q, keys, values, _ = _case(2, 4, 4, 64, 1000, torch.float32, [0, 0], seed=2)
    pos = torch.tensor([89, 999])
    big = da.decode_attention(q, keys, values, decode_mask(pos, 1000, torch.float32), 0.125)
    alone = da.decode_attention(q[:1], keys[:1, :, :128], values[:1, :, :128],
                                decode_mask(pos[:1], 128, torch.float32), 0.125)
    assert torch.equal(big[:1], alone)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # masks hide with -3.4e38 and with -65504
def test_chunks_a_row_does_not_see_are_not_read(dtype):
    """Entries from the first 64-entry chunk past a row's length on hold NaN: a chunk its mask hides entirely
    is never loaded (a loaded NaN would reach the output through 0 x NaN), so the output is finite and right."""
    q, keys, values, write_pos = _case(2, 4, 2, 64, 256, torch.float32, [40, 100], seed=4)
    keys, values = keys.clone(), values.clone()
    for row, first_hidden_chunk in ((0, 64), (1, 128)):
        keys[row, :, first_hidden_chunk:] = float("nan")
        values[row, :, first_hidden_chunk:] = float("nan")
    q, keys, values = q.to(dtype), keys.to(dtype), values.to(dtype)
    mask = decode_mask(write_pos, 256, dtype)
    out = da.decode_attention(q, keys, values, mask, 0.125)
    assert torch.isfinite(out).all()
    clean = [da.decode_attention(q[r:r + 1], keys[r:r + 1, :, :n], values[r:r + 1, :, :n], mask[r:r + 1, ..., :n],
                                 0.125) for r, n in ((0, 64), (1, 128))]
    assert torch.equal(out, torch.cat(clean))  # and bit for bit what the row gets in its own shorter bucket


def test_many_splits_merge_in_blocks_and_other_chunks():
    """More splits than the combine merges at once (3000 entries: 47 splits, blocks of 32), and the chunk sizes
    the bench tries; a chunk that is not a power of two is refused."""
    q, keys, values, write_pos = _case(1, 2, 2, 64, 3000, torch.float32, [2999], seed=3)
    mask = decode_mask(write_pos, 3000, torch.float32)
    ref = _reference(q, keys, values, mask, 0.125)
    for chunk in (16, 64, 128):
        torch.testing.assert_close(da.decode_attention(q, keys, values, mask, 0.125, chunk=chunk), ref,
                                   rtol=1e-5, atol=1e-5, msg=str(chunk))
    with pytest.raises(ValueError, match="power of two"):
        da.decode_attention(q, keys, values, mask, 0.125, chunk=48)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("q_heads, kv_heads", [(4, 4), (32, 8)])  # GROUP 1, and Llama 3's groups of 4
def test_fused_merge_gives_the_two_kernel_bits(dtype, q_heads, kv_heads):
    """One launch (the last split to store merges) against the partials + combine launches: the same bits, for
    rows of 6, 131 and 200 entries in a 200-entry bucket (4 splits; the shortest row's last 3 see nothing) and
    with 16-entry chunks (13 splits); the counters are all zero after each call (a graph replay finds them so),
    and a second call gives the same bits."""
    q, keys, values, write_pos = _case(3, q_heads, kv_heads, 64, 200, dtype, [5, 130, 199], seed=5)
    mask = decode_mask(write_pos, 200, dtype)
    for chunk in (16, 64):  # 64 last: the default below
        two = da.decode_attention(q, keys, values, mask, 0.125, chunk=chunk, fused=False)
        counts = torch.zeros(3 * kv_heads, dtype=torch.int32)
        one = da.decode_attention(q, keys, values, mask, 0.125, chunk=chunk, fused=True, counts=counts)
        assert torch.equal(one, two), (chunk, (one.float() - two.float()).abs().max())
        assert not counts.any()
        assert torch.equal(da.decode_attention(q, keys, values, mask, 0.125, chunk=chunk, counts=counts), one)
        assert not counts.any()
    assert da.fuse_merge(3, kv_heads, q_heads // kv_heads) == (q_heads == kv_heads)  # the default's choice
    assert torch.equal(da.decode_attention(q, keys, values, mask, 0.125), one)
    assert not da.counters("cpu", 3 * kv_heads).any()  # the shared counters, zero again too


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("q_heads, kv_heads", [(4, 4), (8, 2)])
def test_fresh_entries_give_the_same_bits(dtype, q_heads, kv_heads):
    """``fresh`` (the keys and values read before the PDL wait, the appended entry read again after it): the
    same bits as without, fused and in two launches, with o_proj's shrink too; a bad ``fresh`` is refused."""
    q, keys, values, write_pos = _case(3, q_heads, kv_heads, 64, 200, dtype, [5, 130, 199], seed=6)
    mask = decode_mask(write_pos, 200, dtype)
    for fused in (False, True):
        want = da.decode_attention(q, keys, values, mask, 0.125, fused=fused)
        got = da.decode_attention(q, keys, values, mask, 0.125, fused=fused, fresh=write_pos)
        assert torch.equal(got, want), fused
    for bad in (write_pos[:2], write_pos.float()):
        with pytest.raises(ValueError, match="fresh"):
            da.decode_attention(q, keys, values, mask, 0.125, fresh=bad)


def test_the_chunk_is_read_before_the_wait_only_where_it_paid():
    assert da.prefetch_pays(1, 1)
    assert not da.prefetch_pays(2, 1) and not da.prefetch_pays(32, 1) and not da.prefetch_pays(1, 4)


def test_fused_counters_are_shared_and_checked():
    assert da.fuse_merge(1, 32, 1) and da.fuse_merge(8, 32, 1) and not da.fuse_merge(16, 32, 1)
    assert not da.fuse_merge(1, 8, 4)  # grouped heads: one program merges its heads one by one (slower)
    assert da.counters("cpu", 1) is da.counters("cpu", 256)  # one buffer per device and size (graphs replay on it)
    assert da.counters("cpu", 257).numel() == 512
    q, keys, values, write_pos = _case(2, 4, 2, 64, 100, torch.float32, [10, 20])
    mask = decode_mask(write_pos, 100, torch.float32)
    with pytest.raises(ValueError, match="counts"):
        da.decode_attention(q, keys, values, mask, 0.1, fused=True, counts=torch.zeros(3, dtype=torch.int32))


def test_fits():
    q, keys, values, write_pos = _case(2, 4, 2, 64, 100, torch.float32, [10, 20])
    mask = decode_mask(write_pos, 100, torch.float32)
    assert da.fits(q, keys, values, mask)
    assert not da.fits(q.expand(2, 4, 3, 64), keys, values, mask)  # more than one query a row
    assert not da.fits(q[:, :3], keys, values, mask)  # 3 query heads over 2 key/value heads
    assert not da.fits(q, keys, values, mask[..., :50])
    assert not da.fits(q, keys, values[:, :, :50], mask)
    assert not da.fits(q, keys.int(), values, mask)
    assert not da.fits(q, keys[..., ::2], values[..., ::2], mask)  # a stride along the head
    assert da.decode_attention(q[:0], keys[:0], values[:0], mask[:0], 0.1).shape == (0, 4, 1, 64)


@pytest.mark.gpu
@pytest.mark.parametrize("rows, q_heads, kv_heads", [(1, 32, 32), (32, 32, 32), (4, 32, 8)])
def test_gpu_against_fp32_and_sdpa(rows, q_heads, kv_heads):
    """Compiled, bf16, Llama-2-7B's heads (and Llama-3's groups of 4), a 640-entry bucket, rows of different
    lengths: within one bf16 rounding of the fp32 computation, and as close to it as SDPA's own kernel is."""
    pos = [511 - 7 * r for r in range(rows)]
    q, keys, values, write_pos = _case(rows, q_heads, kv_heads, 128, 640, torch.bfloat16, pos, device="cuda")
    mask = decode_mask(write_pos, 640, torch.bfloat16)
    out = da.decode_attention(q, keys, values, mask, 128 ** -0.5)
    ref = _reference(q, keys, values, mask, 128 ** -0.5)
    assert ((out.float() - ref).abs() <= 2.0**-7 * ref.abs() + 1e-5).all()
    sdpa = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=128 ** -0.5,
                                          enable_gqa=q_heads != kv_heads)
    assert (out.float() - ref).abs().max() <= (sdpa.float() - ref).abs().max() + 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("rows, q_heads, kv_heads", [(1, 32, 32), (32, 32, 32), (4, 32, 8)])
@pytest.mark.parametrize("chunk", [64, 16])  # 16: 40 splits, the merge's loop over blocks of 32
def test_gpu_fused_merge_gives_the_two_kernel_bits(rows, q_heads, kv_heads, chunk):
    """Compiled (with PDL where the GPU has it): the one-launch path's bits are the two-launch path's, the counters
    end at zero, and a CUDA graph of 8 calls (a layer each, one counter buffer) replays to the same bits twice."""
    pos = [511 - 7 * r for r in range(rows)]
    q, keys, values, write_pos = _case(rows, q_heads, kv_heads, 128, 640, torch.bfloat16, pos, device="cuda")
    mask = decode_mask(write_pos, 640, torch.bfloat16)
    two = da.decode_attention(q, keys, values, mask, 128 ** -0.5, chunk=chunk, fused=False)
    one = da.decode_attention(q, keys, values, mask, 128 ** -0.5, chunk=chunk, fused=True)
    assert torch.equal(one, two), (one.float() - two.float()).abs().max()
    assert not da.counters("cuda", rows * kv_heads).any()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        outs = [da.decode_attention(q, keys, values, mask, 128 ** -0.5, chunk=chunk, fused=True) for _ in range(8)]
    for _ in range(2):
        for out in outs:
            out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert all(torch.equal(out, two) for out in outs)
        assert not da.counters("cuda", rows * kv_heads).any()


@pytest.mark.gpu
@pytest.mark.parametrize("rows, q_heads, kv_heads", [(1, 32, 32), (8, 32, 32), (2, 32, 8)])
def test_gpu_appended_entry_is_read_after_the_append(rows, q_heads, kv_heads):
    """Compiled, bf16, with PDL where the GPU has it: the rotary + append kernel writes each row's new entry over
    a stale one (1000s: a score that would swamp the row's softmax), then the attention with ``fresh`` reads the
    rest of the chunk before its wait; in a CUDA graph replayed twice, its output matches the fp32 computation on
    the cache as the append left it."""
    from adapterd.server.kernels.rope_append import rope_append

    pos = [511 - 9 * r for r in range(rows)]
    _, keys, values, write_pos = _case(rows, q_heads, kv_heads, 128, 640, torch.bfloat16, pos, device="cuda")
    g = torch.Generator().manual_seed(11)
    q_in = torch.randn(rows, 1, q_heads, 128, generator=g).to(torch.bfloat16).cuda()
    k_in = torch.randn(rows, 1, kv_heads, 128, generator=g).to(torch.bfloat16).cuda()
    v_in = torch.randn(rows, 1, kv_heads, 128, generator=g).to(torch.bfloat16).cuda()
    angle = torch.rand(rows, 1, 128, generator=g).cuda()
    cos, sin = angle.cos().to(torch.bfloat16), angle.sin().to(torch.bfloat16)
    mask = decode_mask(write_pos, 640, torch.bfloat16)
    rows_at = torch.arange(rows, device="cuda")
    stale = torch.full((), 1000.0, dtype=torch.bfloat16, device="cuda")

    def step():
        keys[rows_at, :, write_pos] = stale  # stale entries, as a kernel two launches back leaves them
        values[rows_at, :, write_pos] = stale
        q = rope_append(q_in, k_in, v_in, cos, sin, keys, values, write_pos)
        return q, da.decode_attention(q, keys, values, mask, 128 ** -0.5, fresh=write_pos)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compiles and warms up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        q, out = step()
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        assert (keys[rows_at, :, write_pos].float().abs() < 100).all()  # the append's, not the stale 1000s
        ref = _reference(q, keys, values, mask, 128 ** -0.5)
        assert ((out.float() - ref).abs() <= 2.0**-7 * ref.abs() + 1e-5).all()


@pytest.mark.sm90
def test_partials_compile_for_hopper_both_ways(monkeypatch, tmp_path):
    """No GPU here, but Triton's own ptxas: the partials kernel compiles for sm_90 (the H200) in bf16 for one
    query head a key/value head (elementwise) and for a group of 4 (Llama 3's), whose products run on the tensor
    cores (``mma`` in the PTX; the probabilities as three tf32 products), with and without the fused merge; and
    under PDL it waits before it reads (or counts). Specialized as a launch is (pointers and strides 16-divisible,
    the mask's entry stride 1), none spills (``cuobjdump``)."""
    import re
    import subprocess
    from pathlib import Path

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    da._triton()
    kernel = triton.jit(da._attention_partials)
    pointers = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "mask_ptr": "*bf16", "m_ptr": "*fp32",
                "l_ptr": "*fp32", "acc_ptr": "*fp32", "count_ptr": "*i32", "o_ptr": "*bf16", "oa_ptr": "*bf16",
                "slot_ptr": "*i64", "op_ptr": "*fp32"}
    flags = ("HEAD_DIM", "BLOCK_D", "GROUP", "CHUNK", "G_PAD", "DOT_F32", "USE_PDL", "FUSED", "BLOCK_S", "SHRINK",
             "BLOCK_R", "fresh_ptr", "PREFETCH")
    shrink_args = kernel.arg_names[kernel.arg_names.index("oa_ptr"):kernel.arg_names.index("SHRINK")]
    for (group, g_pad), fused, shrink in [(*c, False) for c in itertools.product(((1, 0), (4, 16)), (False, True))
                                          ] + [((1, 0), True, True)]:
        unused = () if shrink else shrink_args  # o_proj's LoRA shrink in the merge: only with it
        fixed = (*flags, *unused, "stride_mt")  # the mask's entries are contiguous: specialized to 1
        signature = {a: "constexpr" if a in fixed else pointers.get(a, "fp32" if a == "scale" else "i32")
                     for a in kernel.arg_names}
        aligned = [a for a in kernel.arg_names if a not in fixed and (a.endswith("_ptr") or a.startswith("stride_")
                                                                      or a in ("LENGTH", "KV_HEADS"))]
        source = ASTSource(fn=kernel, signature=signature,
                           constexprs={"HEAD_DIM": 128, "BLOCK_D": 128, "GROUP": group, "CHUNK": 64, "G_PAD": g_pad,
                                       "DOT_F32": False, "USE_PDL": True, "FUSED": fused, "BLOCK_S": 32,
                                       "SHRINK": shrink, "BLOCK_R": 16, "fresh_ptr": None, "PREFETCH": False,
                                       "stride_mt": 1,
                                       **{a: kernel.params[kernel.arg_names.index(a)].default for a in unused}},
                           attrs={(kernel.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned})
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
        ptx = compiled.asm["ptx"]
        cubin = tmp_path / "partials.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        usage = subprocess.run([str(cuobjdump), "-res-usage", str(cubin)], capture_output=True, text=True,
                               check=True).stdout
        assert re.search(r"STACK:0\b", usage), (group, fused, shrink, usage)  # no spill
        assert ptx.index("griddepcontrol.wait") < ptx.index("ld.global"), group
        assert ("mma" in ptx) == (g_pad > 0), group
        if g_pad:
            assert "tf32" in ptx and "bf16" in ptx, group  # q.k in bf16, p.v in tf32 (x3)
        if fused:  # the merge: after a barrier (every thread's stores), one release-acquire increment, a barrier
            # (before any thread reads), the other splits' partials read past L1, and the counter zeroed atomically
            atom = ptx.index("atom.global.gpu.acq_rel.add")
            assert ptx.index("griddepcontrol.wait") < atom and "bar.sync" in ptx[ptx.rindex("st.global", 0, atom):atom]
            assert "bar.sync" in ptx[atom:ptx.index("ld.global.cg", atom)]
            assert "atom.global.gpu.acq_rel.exch" in ptx[atom + 1:]
        else:
            assert "atom" not in ptx and "ld.global.cg" not in ptx


@pytest.mark.sm90
def test_partials_prefetch_the_chunk_before_the_wait_on_hopper(monkeypatch, tmp_path):
    """Compiled for sm_90 under PDL with ``PREFETCH`` (``fresh`` given), as a decode step's launch specializes it
    (the pool's, the mask's and q's strides and the pointers 16-divisible, the mask's entry stride 1): the mask,
    keys and values are requested before ``griddepcontrol.wait``, 16 bytes a load; q and the appended entry only
    after it; nothing spilled (one query head a key/value head and a group of 4, fused)."""
    import re
    import subprocess
    from pathlib import Path

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    da._triton()
    kernel = triton.jit(da._attention_partials)
    pointers = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "mask_ptr": "*bf16", "m_ptr": "*fp32",
                "l_ptr": "*fp32", "acc_ptr": "*fp32", "count_ptr": "*i32", "o_ptr": "*bf16", "fresh_ptr": "*i64"}
    flags = ("HEAD_DIM", "BLOCK_D", "GROUP", "CHUNK", "G_PAD", "DOT_F32", "USE_PDL", "FUSED", "BLOCK_S", "SHRINK",
             "BLOCK_R", "PREFETCH")
    unused = kernel.arg_names[kernel.arg_names.index("oa_ptr"):kernel.arg_names.index("SHRINK")]
    unit = ("stride_mt",)  # the mask's entries are contiguous: specialized to 1
    aligned = [a for a in kernel.arg_names if a not in unused and a not in unit
               and (a.endswith("_ptr") or a.startswith("stride_") or a in ("LENGTH", "KV_HEADS"))]
    for group, g_pad in ((1, 0), (4, 16)):
        signature = {a: "constexpr" if a in flags or a in unused or a in unit
                     else pointers.get(a, "fp32" if a == "scale" else "i32") for a in kernel.arg_names}
        source = ASTSource(fn=kernel, signature=signature,
                           constexprs={"HEAD_DIM": 128, "BLOCK_D": 128, "GROUP": group, "CHUNK": 64, "G_PAD": g_pad,
                                       "DOT_F32": False, "USE_PDL": True, "FUSED": True, "BLOCK_S": 32,
                                       "SHRINK": False, "BLOCK_R": 16, "PREFETCH": True, "stride_mt": 1,
                                       **{a: kernel.params[kernel.arg_names.index(a)].default for a in unused}},
                           attrs={(kernel.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned})
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
        ptx = compiled.asm["ptx"]
        wait = ptx.index("griddepcontrol.wait")
        before = re.findall(r"ld\.global[\w.:]*", ptx[:wait])
        # the mask, the keys and values (a [64, 128] bf16 tile each: 16 bytes a load) and fresh before; q and the
        # fresh entry after, that entry past L1 (.cg: L1 may hold the stale copy)
        assert len([ld for ld in before if ld.endswith(".v4.b32")]) >= 16, (group, before)
        assert "ld.global.cg" in ptx[wait:] and "ld.global.cg" not in ptx[:wait], group
        cubin = tmp_path / "attention.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        usage = subprocess.run([str(cuobjdump), "-res-usage", str(cubin)], capture_output=True, text=True,
                               check=True).stdout
        assert re.search(r"STACK:0\b", usage), (group, usage)  # no spill


def test_grouped_heads_attend_here_only_at_few_rows_on_a_gpu():
    """The speed choice measured on the H200: grouped heads past ``MAX_GQA_ROWS`` rows go to SDPA there; one
    head a key/value head, and anything under the interpreter (the tests), stay on the kernel."""
    from adapterd.server.kernels.decode_attention import MAX_GQA_ROWS, faster_than_sdpa

    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert faster_than_sdpa(1, 4, gpu) and faster_than_sdpa(MAX_GQA_ROWS, 4, gpu)
    assert not faster_than_sdpa(MAX_GQA_ROWS + 1, 4, gpu) and not faster_than_sdpa(32, 8, gpu)
    assert faster_than_sdpa(32, 1, gpu) and faster_than_sdpa(256, 1, gpu) and faster_than_sdpa(32, 4, cpu)


@pytest.mark.sm90
def test_combine_compiles_for_hopper_with_o_projs_a_tile_requested_before_the_wait(monkeypatch, tmp_path):
    """The merge kernel with o_proj's LoRA shrink, compiled for sm_90 under PDL: the row's slot and the head's A
    tile (no kernel of the step writes either) are requested before ``griddepcontrol.wait``; the splits' partials
    only after it."""
    import re

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    da._triton()
    kernel = triton.jit(da._attention_combine)
    pointers = {"o_ptr": "*bf16", "oa_ptr": "*bf16", "slot_ptr": "*i64"}
    flags = {"HEAD_DIM": 128, "BLOCK_D": 128, "BLOCK_S": 32, "USE_PDL": True, "SHRINK": True, "BLOCK_R": 16}
    signature = {a: "constexpr" if a in flags else pointers.get(a, "*fp32" if a.endswith("_ptr") else "i32")
                 for a in kernel.arg_names}
    aligned = [a for a in kernel.arg_names if a.endswith("_ptr") or a.startswith("stride_oa")]
    source = ASTSource(fn=kernel, signature=signature, constexprs=flags,
                       attrs={(kernel.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned})
    ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"]
    wait = ptx.index("griddepcontrol.wait")
    loads = [m.start() for m in re.finditer(r"ld\.global", ptx)]
    before = [at for at in loads if at < wait]
    assert len(before) >= 2 and len(before) < len(loads)  # the slot and A's tile, then m, l and acc


def _check_o_shrink(device, dtype, rows, q_heads, kv_heads, dim, fused, rank=5):
    """decode_attention with o_proj's shrink against ``out @ A^T`` in torch (fp32, from the output as returned):
    summed over the heads, each LoRA row's partials; the output the same bits as without the shrink."""
    from adapterd.server.kernels.lora_bgmv import LoraPartials, block_r_for

    num_slots = 4
    pos = [99 - 37 * (r % 3) for r in range(rows)]
    q, keys, values, write_pos = _case(rows, q_heads, kv_heads, dim, 100, dtype, pos, seed=7, device=device)
    mask = decode_mask(write_pos, 100, dtype)
    g = torch.Generator().manual_seed(8)
    lora_a = (torch.randn(max(8, rank), num_slots, q_heads * dim, generator=g) * 0.3).to(dtype)
    lora_a[:, 0] = 0
    lora_a = lora_a.to(device)
    slots = torch.tensor([(2, 0, 3)[r % 3] for r in range(rows)], device=device)
    p = torch.full((1, q_heads, rows, block_r_for(rank)), float("nan"), device=device)
    shrink = da.OutputShrink(lora_a, LoraPartials(p, slots, rank))
    assert shrink.fits(q)
    out = da.decode_attention(q, keys, values, mask, 0.2, fused=fused, shrink=shrink)
    assert torch.equal(out, da.decode_attention(q, keys, values, mask, 0.2, fused=fused))
    flat = out.reshape(rows, -1).float()
    lora_rows = [r for r in range(rows) if slots[r]]  # the base rows' partials are never read (expand skips them)
    want = torch.stack([flat[r] @ lora_a[:rank, slots[r]].float().T for r in lora_rows])
    got = p[0, :, lora_rows, :rank].sum(0)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (p[0, :, lora_rows, rank:] == 0).all()  # rank rows past the rank read nothing: zeros


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize(("dtype", "q_heads", "kv_heads"), [(torch.float32, 4, 4), (torch.bfloat16, 4, 4),
                                                          (torch.float32, 8, 2)])
def test_o_proj_shrink_in_the_merge_equals_the_shrink_of_the_output(fused, dtype, q_heads, kv_heads):
    """With ``shrink``, the merge (two launches, or the last split's in one) also writes o_proj's LoRA
    partials, one split a head, from the output as stored; the output itself is unchanged."""
    _check_o_shrink("cpu", dtype, 3, q_heads, kv_heads, 32, fused)


@pytest.mark.gpu
@pytest.mark.parametrize(("rows", "fused"), [(1, True), (8, True), (32, False)])
def test_gpu_o_proj_shrink_in_the_merge(rows, fused):
    """Compiled, bf16, Llama-2-7B's heads at rank 16: as on the CPU."""
    _check_o_shrink("cuda", torch.bfloat16, rows, 32, 32, 128, fused, rank=16)
