"""The decode step's rotary + key/value append kernel (server/kernels/rope_append.py) against transformers'
own ``apply_rotary_pos_emb`` and plain indexed writes: bit for bit, in fp32, bf16 and fp16 (Triton's
interpreter on the CPU; the compiled kernel on a GPU under ADAPTERD_TEST_DEVICE=cuda)."""

from __future__ import annotations

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


def test_compiles_for_hopper(monkeypatch, tmp_path):
    """No GPU here, but Triton's own ptxas: the kernel compiles for sm_90 (the H200) in bf16 with a bf16 pool,
    with the launch's own options (fp contraction off), so that a decode step on the GPU cannot fail on it."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    kernel = triton.jit(ra._rope_append)
    ra._triton()
    ints = ("Q_HEADS", "stride_qr", "stride_qh", "stride_kr", "stride_kh", "stride_vr", "stride_vh", "stride_cr",
            "stride_sr", "stride_kcr", "stride_kch", "stride_kct", "stride_vcr", "stride_vch", "stride_vct")
    for dtype in ("bf16", "fp32"):
        pointers = dict(zip(("q_ptr", "k_ptr", "v_ptr", "cos_ptr", "sin_ptr", "qo_ptr", "kc_ptr", "vc_ptr", "pos_ptr"),
                            (f"*{dtype}",) * 8 + ("*i64",), strict=True))
        signature = {**pointers, **dict.fromkeys(ints, "i32"),
                     **dict.fromkeys(("HEAD_DIM", "BLOCK", "ROUND_BF16", "USE_PDL"), "constexpr")}
        source = ASTSource(fn=kernel, signature=signature,
                           constexprs={"HEAD_DIM": 128, "BLOCK": 128, "ROUND_BF16": False, "USE_PDL": True})
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": 1, **ra.COMPILE_OPTIONS})
        assert compiled.asm["cubin"], dtype
        # fp32: x * cos + rotate_half(x) * sin with no fused multiply-add (torch rounds each product)
        assert "fma.rn.f32" not in compiled.asm["ptx"], dtype
