"""The int8 one-row q/k/v GEMV's rotary epilogue (``int8_epilogues.rope_append``): a fused q/k/v weight in,
the rotated query out and the key and value written at the row's entry of the layer's cache, in one launch.
Judged bit for bit against the two steps it replaces (the same GEMV's output, then ``kernels/rope_append.py``)
and within a few roundings against transformers' ``apply_rotary_pos_emb`` on an fp64 projection (independent of
the kernels); Triton's interpreter here, the compiled kernel in the ``gpu`` tests."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

km = pytest.importorskip("adapterd.server.kernels.int8_matmul", reason="needs triton (the dev extra, Linux)")
ke = pytest.importorskip("adapterd.server.kernels.int8_epilogues")
ra = pytest.importorskip("adapterd.server.kernels.rope_append")

ULP = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
INT8_TILES = [{"BLOCK_M": 1, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": 1} for bn, bk in ((4, 32), (16, 64), (64, 32))]
HEADS = [(4, 2, 16), (2, 2, 8)]  # (q heads, key/value heads, head_dim): grouped and not; tiles across heads


def _case(q_heads, kv_heads, dim, k, dtype, seed, device="cpu"):
    """x, the int8 weight and its row scales, a bias, one row's cos and sin of a far position from
    Llama's rotary module, and a cache layer of 2 rows x 12 entries filled with noise (only row 0's entry
    ``write_pos[0]`` may change)."""
    g = torch.Generator().manual_seed(seed)
    n = (q_heads + 2 * kv_heads) * dim
    x = torch.randn(1, 1, k, generator=g).to(dtype)
    weight = (torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8), torch.rand(n, generator=g) * 0.05)
    bias = (torch.randn(n, generator=g) * 0.1).to(dtype)
    config = LlamaConfig(hidden_size=q_heads * dim, num_attention_heads=q_heads, num_key_value_heads=kv_heads,
                         head_dim=dim, max_position_embeddings=4096)
    cos, sin = LlamaRotaryEmbedding(config)(x, position_ids=torch.tensor([[3001]]))
    keys = torch.randn(2, kv_heads, 12, dim, generator=g).to(dtype)
    values = torch.randn(2, kv_heads, 12, dim, generator=g).to(dtype)
    write_pos = torch.tensor([7, 2])
    moved = [t.to(device) for t in (x, *weight, bias, cos.to(dtype), sin.to(dtype), keys, values, write_pos)]
    return moved[0], tuple(moved[1:1 + len(weight)]), *moved[1 + len(weight):]


def _two_steps(y, cos, sin, keys, values, write_pos, q_heads, kv_heads, dim):
    """The GEMV's output split into heads, then the rotary + append kernel (what the epilogue replaces)."""
    q, k, v = (t.view(1, 1, -1, dim) for t in y.split([q_heads * dim, kv_heads * dim, kv_heads * dim], dim=-1))
    keys, values = keys.clone(), values.clone()
    return ra.rope_append(q, k, v, cos, sin, keys, values, write_pos), keys, values


def _transformers(x, weight, bias, cos, sin, keys, values, q_heads, kv_heads, dim, dtype):
    """transformers' rotation of an fp64 projection with the dequantized weight, rounded to ``dtype``, and the
    cache's new entry: (query, key, value) of row 0."""
    w = weight[0].double() * weight[1].double()[:, None] / 127.0
    y = (x.double() @ w.T + bias.double()).to(dtype)
    q, k, v = (t.view(1, 1, -1, dim).transpose(1, 2) for t in y.split([q_heads * dim, kv_heads * dim,
                                                                          kv_heads * dim], dim=-1))
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    return q, k[0, :, 0], v[0, :, 0]


def _check(config, dtype, with_bias, heads):
    q_heads, kv_heads, dim = heads
    x, weight, bias, cos, sin, keys, values, write_pos = _case(q_heads, kv_heads, dim, 96, dtype, 3)
    bias = bias if with_bias else None
    before = (keys.clone(), values.clone())
    q = ke.rope_append(x, *weight, bias, cos, sin, keys, values, write_pos, dim, q_heads, config=config)
    y = km._small_m(x.view(1, -1), *weight, bias, True, config=config)
    want_q, want_keys, want_values = _two_steps(y, cos, sin, *before, write_pos, q_heads, kv_heads, dim)
    assert q.shape == (1, q_heads, 1, dim) and q.dtype == dtype
    assert torch.equal(q, want_q) and torch.equal(keys, want_keys) and torch.equal(values, want_values)
    changed = (keys != before[0]).any(-1) | (values != before[1]).any(-1)  # [rows, heads, entries]
    assert not changed[1].any() and not changed[0, :, :7].any() and not changed[0, :, 8:].any()
    ref_bias = bias if bias is not None else torch.zeros(weight[0].shape[0], dtype=dtype)
    ref_q, ref_k, ref_v = _transformers(x, weight, ref_bias, cos, sin, keys, values, q_heads, kv_heads, dim, dtype)
    for got, ref in ((q, ref_q), (keys[0, :, 7], ref_k), (values[0, :, 7], ref_v)):
        err = (got.double() - ref.double()).abs()
        assert (err <= 8 * ULP[dtype] * ref.double().abs() + 4 * ULP[dtype]).all(), err.max()


@pytest.mark.parametrize("config", INT8_TILES, ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("heads", HEADS, ids=str)
def test_epilogue_is_the_gemv_then_rope_append_bit_for_bit(config, dtype, with_bias, heads):
    """GEMV tiles of one split, 2 to 32 pairs (within a head and across heads), with and without a bias: the
    query, and the cache with only row 0's entry 7 changed, equal the plain int8 kernel's output with the same
    tiles then the rotary kernel bit for bit, and transformers' rotation of the fp64 projection within a few
    roundings."""
    _check(config, dtype, with_bias, heads)


def test_fits_one_row_of_a_fused_qkv_in_bf16_or_fp16():
    """``rope_fits``: one bf16/fp16 row, the weight's rows whole heads of q then k and v, cos and sin of one head,
    the caches alike; the interpreter's tiles are GEMV tiles of one split."""
    x, (cb, scb), bias, cos, sin, keys, values, _ = _case(4, 2, 16, 96, torch.bfloat16, 1)
    assert ke.rope_fits(x, cb, scb, bias, cos, sin, keys, values, 16, 4)
    assert not ke.rope_fits(torch.cat([x, x]), cb, scb, bias, cos, sin, keys, values, 16, 4)  # two rows
    assert not ke.rope_fits(x, cb, scb, bias, cos, sin, keys, values, 16, 3)  # rows not q + 2 kv heads
    assert not ke.rope_fits(x, cb[:-16], scb[:-16], bias[:-16], cos, sin, keys, values, 16, 4)
    assert not ke.rope_fits(x, cb, scb, bias, cos[..., :8], sin[..., :8], keys, values, 16, 4)  # partial rotary
    assert not ke.rope_fits(x.float(), cb, scb, None, cos, sin, keys, values, 16, 4)  # fp32: torch's roundings
    assert not ke.rope_fits(x, cb, scb, bias, cos, sin, keys[:, :1], values[:, :1], 16, 4)  # one kv head


@pytest.mark.sm90
def test_rope_epilogue_compiles_for_hopper(monkeypatch, tmp_path):
    """No GPU here, but Triton's own ptxas: with ``ROPE`` each one-split GEMV tile compiles for sm_90 (bf16 with a
    bias, a bf16 cache), waiting for the kernel before it under PDL."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    kernel = triton.jit(km._int8_mm)
    pointers = dict(zip(("x_ptr", "w_ptr", "s_ptr", "b_ptr", "y_ptr", "p_ptr", "cos_ptr", "sin_ptr", "kc_ptr",
                         "vc_ptr", "pos_ptr"),
                        ("*bf16", "*i8", "*fp32", "*fp32", "*bf16", "*fp32", "*bf16", "*bf16", "*bf16", "*bf16",
                         "*i64"), strict=True))
    tiles = [c for c in km._small_configs() if c.kwargs["BLOCK_M"] == 1 and c.kwargs["SPLIT_K"] == 1]
    assert tiles
    for c in tiles:
        flags = {"HAS_BIAS": True, "DOT_F32": False, "EVEN_K": True, "INTERPRETED": False, "USE_PDL": True,
                 "GLU": False, "ROPE": True, "ROUND_BF16": False, "SHRINK": False, "EXPAND": False,
                 **c.kwargs}
        signature = {name: "constexpr" if name in flags else pointers.get(name, "i32") for name in kernel.arg_names}
        ptx = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=flags),
                             target=GPUTarget("cuda", 90, 32), options={"num_warps": c.num_warps}).asm["ptx"]
        assert "griddepcontrol.wait" in ptx, c.kwargs


@pytest.mark.gpu
@pytest.mark.parametrize("heads", [(32, 32, 128), (32, 8, 128)], ids=["llama2-7b", "llama3-8b"])
def test_gpu_epilogue_at_llama_shapes_bit_for_bit_and_in_a_cuda_graph(heads):
    """On the GPU with the tiles tuned for the shape (K 4096; the one-row keys tune among GEMV tiles of one
    split): the epilogue equals the tuned GEMV then the rotary kernel bit for bit, and a CUDA graph replays it."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    q_heads, kv_heads, dim = heads
    x, weight, bias, cos, sin, keys, values, write_pos = _case(q_heads, kv_heads, dim, 4096, torch.bfloat16, 9,
                                                               "cuda")
    y = km.int8_weight_matmul(x, *weight, bias)  # tunes the one-row key
    assert ke.rope_fits(x, *weight, bias, cos, sin, keys, values, dim, q_heads)

    def run(k, v):
        return ke.rope_append(x, *weight, bias, cos, sin, k, v, write_pos, dim, q_heads)

    want = _two_steps(y, cos, sin, keys, values, write_pos, q_heads, kv_heads, dim)
    got_keys, got_values = keys.clone(), values.clone()
    got = (run(got_keys, got_values), got_keys, got_values)
    differ = {name: ((a != b).sum().item(), (a.float() - b.float()).abs().max().item())
              for name, a, b in zip(("query", "keys", "values"), got, want, strict=True) if not torch.equal(a, b)}
    assert not differ, f"(elements that differ, largest difference) of each: {differ}"
    graph_keys, graph_values = keys.clone(), values.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        q = run(graph_keys, graph_values)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(q, want[0]) and torch.equal(graph_keys, want[1]) and torch.equal(graph_values, want[2])


@pytest.mark.gpu
@pytest.mark.parametrize("heads", [(32, 32, 128), (32, 8, 128)], ids=["llama2-7b", "llama3-8b"])
def test_gpu_epilogue_bit_for_bit_at_every_one_row_tile(heads):
    """On the GPU, every tile the one-row keys may tune to (GEMV tiles of one split), not only this machine's
    pick: the epilogue equals the GEMV with the same tiles then the rotary kernel bit for bit. A float copy of
    this epilogue once compiled wrong for some tiles only (bench/NOTES.md, "Sixteenth session")."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    q_heads, kv_heads, dim = heads
    x, weight, bias, cos, sin, keys, values, write_pos = _case(q_heads, kv_heads, dim, 4096, torch.bfloat16, 11,
                                                               "cuda")
    from adapterd.server.kernels.int8_configs import one_row_tiles

    tiles = one_row_tiles()
    assert tiles
    wrong = {}
    for config in tiles:
        got_keys, got_values = keys.clone(), values.clone()
        q = ke.rope_append(x, *weight, bias, cos, sin, got_keys, got_values, write_pos, dim, q_heads, config=config)
        y = km._small_m(x.view(1, -1), *weight, bias, True, config=config)
        want = _two_steps(y, cos, sin, keys, values, write_pos, q_heads, kv_heads, dim)
        differ = [name for name, a, b in zip(("query", "keys", "values"), (q, got_keys, got_values), want,
                                             strict=True) if not torch.equal(a, b)]
        if differ:
            wrong[str(config)] = differ
    assert not wrong, wrong
