"""The decode step's rotary + key/value append kernel (server/kernels/rope_append.py) against transformers'
own ``apply_rotary_pos_emb`` and plain indexed writes: bit for bit, in fp32, bf16 and fp16 (Triton's
interpreter on the CPU; the compiled kernel on a GPU under ADAPTERD_TEST_DEVICE=cuda)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from tests.helpers import TEST_DEVICE

triton = pytest.importorskip("triton")
ra = pytest.importorskip("adapterd.server.kernels.rope_append")


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    if TEST_DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def _inputs(rows, q_heads, kv_heads, dim, dtype, seed, pool_dtype=None, rope_scaling=None):
    """q, k, v split from one fused projection output (strided views, as the decoder has them), cos and sin
    of the rows' positions from Llama's rotary module, a pool layer with one row more than the batch."""
    g = torch.Generator().manual_seed(seed)
    fused = torch.randn(rows, 1, (q_heads + 2 * kv_heads) * dim, generator=g).to(dtype).to(TEST_DEVICE)
    q, k, v = fused.split([q_heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    q, k, v = (t.view(rows, 1, -1, dim) for t in (q, k, v))
    config = LlamaConfig(hidden_size=q_heads * dim, num_attention_heads=q_heads, num_key_value_heads=kv_heads,
                         head_dim=dim, max_position_embeddings=4096, rope_scaling=rope_scaling)
    rotary = LlamaRotaryEmbedding(config).to(TEST_DEVICE)
    positions = torch.randint(0, 4000, (rows, 1), generator=g).to(TEST_DEVICE)
    cos, sin = rotary(fused, position_ids=positions)
    capacity = 24
    pool_dtype = pool_dtype or dtype
    keys = torch.randn(rows + 1, kv_heads, capacity, dim, generator=g).to(pool_dtype).to(TEST_DEVICE)
    values = torch.randn(rows + 1, kv_heads, capacity, dim, generator=g).to(pool_dtype).to(TEST_DEVICE)
    write_pos = torch.randperm(capacity, generator=g)[:rows].to(TEST_DEVICE)
    return q, k, v, cos, sin, keys, values, write_pos


def _reference(q, k, v, cos, sin, keys, values, write_pos):
    """transformers' rotation, then the pool's indexed writes (kv_pool.DecodeView.update's)."""
    q_rot, k_rot = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    keys, values = keys.clone(), values.clone()
    rows = torch.arange(q.shape[0], device=q.device)
    keys[rows, :, write_pos] = k_rot[:, :, 0].to(keys.dtype)
    values[rows, :, write_pos] = v.transpose(1, 2)[:, :, 0].to(values.dtype)
    return q_rot, keys, values


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("rows", "q_heads", "kv_heads", "dim"), [(1, 4, 4, 64), (5, 8, 2, 32), (3, 6, 2, 80)])
def test_equals_transformers_rotation_and_the_pools_writes_bit_for_bit(dtype, rows, q_heads, kv_heads, dim):
    """Query, keys and values as transformers and the pool's indexing give them, to the bit: grouped key/value
    heads, a head size that is not a power of two, strided q/k/v views of one fused output."""
    q, k, v, cos, sin, keys, values, write_pos = _inputs(rows, q_heads, kv_heads, dim, dtype, seed=rows + dim)
    assert ra.fits(q, k, v, cos, sin)
    want_q, want_keys, want_values = _reference(q, k, v, cos, sin, keys, values, write_pos)
    got_q = ra.rope_append(q, k, v, cos, sin, keys, values, write_pos)
    assert got_q.shape == (rows, q_heads, 1, dim) and got_q.is_contiguous()
    assert torch.equal(got_q, want_q)
    assert torch.equal(keys, want_keys)  # the new entries, and nothing else of any row (the spare one too)
    assert torch.equal(values, want_values)


def test_llama3_scaling_and_an_fp32_pool_under_a_bf16_model():
    """Scaled rotary (only cos and sin change) and a pool of another dtype than the activations (each entry
    cast as ``.to(keys.dtype)`` casts it)."""
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 512}
    q, k, v, cos, sin, keys, values, write_pos = _inputs(4, 4, 2, 64, torch.bfloat16, seed=3,
                                                         pool_dtype=torch.float32, rope_scaling=scaling)
    want = _reference(q, k, v, cos, sin, keys, values, write_pos)
    got_q = ra.rope_append(q, k, v, cos, sin, keys, values, write_pos)
    assert torch.equal(got_q, want[0]) and torch.equal(keys, want[1]) and torch.equal(values, want[2])


def test_fits_only_what_the_kernel_computes():
    """One token a row, an even head size cos and sin cover whole (no partial rotary), matching dtypes."""
    q, k, v, cos, sin, *_ = _inputs(2, 4, 2, 32, torch.float32, seed=1)
    assert ra.fits(q, k, v, cos, sin)
    assert not ra.fits(q, k, v, cos[..., :16], sin[..., :16])  # partial rotary (GLM, Phi-3)
    assert not ra.fits(q.repeat(1, 2, 1, 1), k.repeat(1, 2, 1, 1), v.repeat(1, 2, 1, 1), cos, sin)  # a prefill
    assert not ra.fits(q, k.double(), v, cos, sin)


@pytest.mark.sm90
def test_compiles_for_hopper(monkeypatch, tmp_path):
    """No GPU here, but Triton's own ptxas: the kernel compiles for sm_90 (the H200) in bf16 with a bf16 pool,
    with the launch's own options (fp contraction off), so that a decode step on the GPU cannot fail on it.
    Specialized as a Llama decode step's launch is (pointers, strides and the head count 16-divisible), no
    access is 2 bytes wide, and with LoRA the heads' B tiles load 16 bytes at a time before the PDL wait."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    kernel = triton.jit(ra._rope_append)
    ra._triton()
    lora_args = kernel.arg_names[kernel.arg_names.index("p_ptr"):]
    for dtype, lora in (("bf16", False), ("fp32", False), ("bf16", True)):
        fixed = {"HEAD_DIM": 128, "BLOCK": 128, "HALF_BLOCK": 64, "ROUND_BF16": False, "USE_PDL": True}
        if lora:
            fixed |= {"LORA": True, "BLOCK_R": 16, "BLOCK_S": 16}
        else:
            fixed |= {a: kernel.params[kernel.arg_names.index(a)].default for a in lora_args}
        pointer_types = {"pos_ptr": "*i64", "slot_ptr": "*i64", "p_ptr": "*fp32"}
        signature = {a: "constexpr" if a in fixed else pointer_types.get(a, f"*{dtype}") if a.endswith("_ptr")
                     else "i32" for a in kernel.arg_names}
        aligned = [a for a in kernel.arg_names if a not in fixed
                   and (a.endswith("_ptr") or a.startswith("stride_") or a == "Q_HEADS")]
        source = ASTSource(fn=kernel, signature=signature, constexprs=fixed,
                           attrs={(kernel.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned})
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": 1, **ra.COMPILE_OPTIONS})
        assert compiled.asm["cubin"], dtype
        ptx = compiled.asm["ptx"]
        # fp32: x * cos + rotate_half(x) * sin with no fused multiply-add (torch rounds each product)
        assert "fma.rn.f32" not in ptx, dtype
        assert not re.findall(r"(?:ld|st)\.global[\w.:]*\.b16\b", ptx), (dtype, lora)
        if lora:
            wait = ptx.index("griddepcontrol.wait")
            assert len(re.findall(r"ld\.global[\w.:]*\.v4\.b32", ptx[:wait])) >= 16, ptx[:wait]
            # One wave at 32 LoRA rows of Llama-2-7B (64 heads: 2,048 one-warp programs): at most 128 registers a
            # thread leaves 16 programs an SM, 2,112 on the H200's 132 SMs (124 under Triton 3.9, 126 under 3.6);
            # more would start the last programs, and their B reads, only as the first ones end
            cubin = tmp_path / "rope_lora.cubin"
            cubin.write_bytes(compiled.asm["cubin"])
            cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
            usage = subprocess.run([str(cuobjdump), "-res-usage", str(cubin)], capture_output=True, text=True,
                                   check=True).stdout
            registers = int(re.search(r"REG:(\d+)", usage).group(1))
            assert registers <= 128 and re.search(r"STACK:0\b", usage), usage


def _lora(q, k, rank, slots_list, present, dtype, seed):
    """Random LoRA for q, k and v (the ``present`` ones) of the rows' slots: x (the layer's input) and A
    tables, and B tables ``[R, slots, out]``, slot 0 all zeros as the slot table keeps it."""
    g = torch.Generator().manual_seed(seed)
    in_f, num_slots = 48, 4
    widths = (q.shape[2] * q.shape[3], k.shape[2] * k.shape[3], k.shape[2] * k.shape[3])
    x = torch.randn(q.shape[0], in_f, generator=g).to(dtype).to(TEST_DEVICE)
    a = [(torch.randn(rank, num_slots, in_f, generator=g) * 0.3).to(dtype) for _ in widths]
    b = [(torch.randn(rank, num_slots, w, generator=g) * 0.3).to(dtype) for w in widths]
    for t in (*a, *b):
        t[:, 0] = 0
    slots = torch.tensor(slots_list, device=TEST_DEVICE)
    tables = tuple(t.to(TEST_DEVICE) if on else None for t, on in zip(b, present, strict=True))
    stacked = torch.stack([t for t, on in zip(a, present, strict=True) if on]).to(TEST_DEVICE)
    return x, stacked, tables, slots


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("present", "rank"), [((True, True, True), 8), ((True, False, True), 5),
                                               ((False, True, False), 16)])
def test_lora_deltas_added_before_rotating_equal_the_expand_then_the_rotation(dtype, present, rank):
    """With ``lora`` (the q/k/v shrink's partials and the B tables), the kernel adds each wrapped output's delta
    before rotating: the same bits as ``lora_bgmv``'s expand in place followed by the plain kernel, and within
    rounding of torch's ``q + (x @ A^T) @ B`` then transformers' rotation. A base row (slot 0) and an unwrapped
    q, k or v get nothing added; q, k and v themselves are not written."""
    _check_lora(dtype, present, rank, 4, 4, 2, 32)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 4])
def test_gpu_lora_deltas_at_llama_heads(rows):
    """Compiled, bf16, Llama-2-7B's heads (32 of 128) at rank 16: within rounding of torch's delta and rotation."""
    _check_lora(torch.bfloat16, (True, True, True), 16, rows, 32, 32, 128)


def _check_lora(dtype, present, rank, rows, q_heads, kv_heads, dim):
    from adapterd.server.kernels import lora_bgmv

    q, k, v, cos, sin, keys, values, write_pos = _inputs(rows, q_heads, kv_heads, dim, dtype, seed=rank)
    x, lora_a, tables, slots = _lora(q, k, rank, [1, 0, 3, 2][:rows], present, dtype, seed=rank)
    partials = lora_bgmv.lora_shrink(x, lora_a, slots, rank)
    deltas = ra.QkvDeltas(partials, tables)
    assert deltas.fits(q, k)
    before = [t.clone() for t in (q, k, v)]
    got_keys, got_values = keys.clone(), values.clone()
    got_q = ra.rope_append(q, k, v, cos, sin, got_keys, got_values, write_pos, lora=deltas)
    assert all(torch.equal(t, u) for t, u in zip((q, k, v), before, strict=True))
    # The expand, then the plain kernel: bit for bit in fp32 under the interpreter (its bf16 cast in the expand's
    # store truncates where this kernel rounds to nearest even; compiled, the expand may fuse B * xa into its sum)
    outs = [t.reshape(rows, -1).clone() for t in (q, k, v)]
    lora_bgmv.lora_expand_([o for o, b in zip(outs, tables, strict=True) if b is not None], partials,
                           [b for b in tables if b is not None])
    q2, k2, v2 = (o.view(t.shape) for o, t in zip(outs, (q, k, v), strict=True))
    want_keys, want_values = keys.clone(), values.clone()
    want_q = ra.rope_append(q2, k2, v2, cos, sin, want_keys, want_values, write_pos)
    if dtype == torch.float32 and TEST_DEVICE == "cpu":
        assert torch.equal(got_q, want_q) and torch.equal(got_keys, want_keys)
        assert torch.equal(got_values, want_values)
    # The oracle: torch's delta in fp32 (rank rows of each row's slot), then transformers' rotation
    adds = []
    member = 0
    for t, b in zip((q, k, v), tables, strict=True):
        if b is None:
            adds.append(t)
            continue
        a_rows = lora_a[member, :rank, slots].float()  # [rank, rows, in]
        xa = torch.einsum("mk,rmk->mr", x.float(), a_rows)
        delta = torch.einsum("mr,rmn->mn", xa, b[:rank, slots].float())
        adds.append((t.reshape(rows, -1).float() + delta).to(dtype).view(t.shape))
        member += 1
    ref_q, ref_keys, ref_values = _reference(*adds, cos, sin, keys, values, write_pos)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert torch.allclose(got_q.float(), ref_q.float(), atol=tol, rtol=tol)
    assert torch.allclose(got_keys.float(), ref_keys.float(), atol=tol, rtol=tol)
    assert torch.allclose(got_values.float(), ref_values.float(), atol=tol, rtol=tol)
    plain_keys = keys.clone()
    plain_q = ra.rope_append(q, k, v, cos, sin, plain_keys, values.clone(), write_pos)
    if rows > 1:  # row 1 is on slot 0: a base row gets nothing added
        assert torch.equal(got_q[1], plain_q[1]) and torch.equal(got_keys[1], plain_keys[1])
    if present[0]:
        assert not torch.allclose(got_q[0], plain_q[0])  # a LoRA row's query moved
