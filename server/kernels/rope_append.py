"""A decode step's rotary embedding and key/value append in one Triton launch per layer (issue 18).

At a decode step (one new token a row) the own decoder (``engine/decoder.py``) does, per layer::

    q, k = apply_rotary_pos_emb(q, k, cos, sin)   # transformers' Llama form: x * cos + rotate_half(x) * sin
    keys[r, :, write_pos[r]] = k[r]; values[r, :, write_pos[r]] = v[r]   # the row's new entry in the pool

which transformers' functions and the pool's indexing run as about 14 small kernels (slices, a negation and a
concatenation for each of q and k, three products and two sums, an ``arange`` and two indexed writes with their
casts). At batch 1 each takes a few microseconds of device time for a few kilobytes, ~1 ms a step over a 7B
model's 32 layers (bench/NOTES.md, "Targets"). This kernel does the same in one launch: program ``(r, h)``
rotates head ``h`` of row ``r``'s query into a new ``[rows, q_heads, 1, head_dim]`` tensor (the layout
attention reads), or, for a key/value head, rotates the key and writes it and the value at the row's
``write_pos`` in the pool.

Exactness: the same roundings as transformers in the activations' dtype. ``rotate_half`` only moves and
negates (exact); each product ``x * cos`` and ``rotate_half(x) * sin`` is an fp32 product rounded to the
dtype, as torch computes a bf16/fp16 product; their sum likewise; fp contraction (an FMA would skip the
products' rounding) is off for the launch. So the query and key equal transformers' bit for bit, and the pool
holds them cast to its dtype as ``.to(k.dtype)`` does. Tests compare them with transformers' own function.

Only the form above: rotary over the whole head, halves paired (Llama, Mistral, Qwen2, Qwen3; their scaling
types change only ``cos`` and ``sin``). GLM's interleaved half-head rotation and partial rotary keep the
eager path. Triton is imported on first use; with ``TRITON_INTERPRET=1`` the kernel runs on CPU tensors (the
tests), where the fp32 -> bf16 cast truncates (Triton 3.9), so ``ROUND_BF16`` rounds to nearest even by hand,
as ``rms_norm.py`` does.

CUDA graphs: no host sync, no allocation but the query's ``torch.empty``; ``write_pos`` is read on the device.
"""

from __future__ import annotations

import functools

import torch

from .support import interpreting, pdl_launch, triton_available, triton_into

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_HEAD_DIM = 256
# Compiled launches only (the interpreter takes no compiler options): no fused multiply-add, so that each
# product is rounded before the sum, as torch's separate kernels round it.
COMPILE_OPTIONS = {"enable_fp_fusion": False}

# Bound on first use by ``_triton()``: the kernel's body refers to ``tl`` as a module global, as Triton wants.
triton = None
tl = None


def rope_append_available(device: torch.device | str) -> bool:
    """True when the kernel can run for tensors on ``device`` (``triton_available``)."""
    return triton_available(device)


# ---------------------------------------------------------------------------------------------- kernel
# Only Triton builtins are called (as in rms_norm.py): library functions are made compiled-only when Triton is
# imported without TRITON_INTERPRET, and this lets the interpreter be switched on later.


def _rope_append(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, qo_ptr, kc_ptr, vc_ptr, pos_ptr,  # noqa: N803
                 Q_HEADS, stride_qr, stride_qh, stride_kr, stride_kh, stride_vr, stride_vh, stride_cr, stride_sr,
                 stride_kcr, stride_kch, stride_kct, stride_vcr, stride_vch, stride_vct,
                 HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, ROUND_BF16: tl.constexpr,
                 USE_PDL: tl.constexpr = False):
    """Row ``program_id(0)``, head ``program_id(1)``: a query head (``< Q_HEADS``) rotated into
    ``qo[r, h, 0, :]``, or a key/value head rotated (the key) and both written at ``pos[r]`` in the pool."""
    r = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    if USE_PDL:  # launched with PDL (support.pdl_enabled): see the kernels before it, then let the next start
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    d = tl.arange(0, BLOCK)
    mask = d < HEAD_DIM
    half = HEAD_DIM // 2
    partner = tl.where(d < half, d + half, d - half)  # rotate_half(x)[d] = -x[d + half] | x[d - half]
    sign = tl.where(d < half, -1.0, 1.0)
    cos = tl.load(cos_ptr + r * stride_cr + d, mask=mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + r * stride_sr + d, mask=mask, other=0.0).to(tl.float32)
    if h < Q_HEADS:
        src = q_ptr + r * stride_qr + h * stride_qh
    else:
        src = k_ptr + r * stride_kr + (h - Q_HEADS) * stride_kh
    x = tl.load(src + d, mask=mask, other=0.0)
    x_partner = tl.load(src + partner, mask=mask, other=0.0)
    a = x.to(tl.float32) * cos  # x * cos, one fp32 product rounded to x's dtype as torch's is
    b = (x_partner.to(tl.float32) * sign) * sin  # rotate_half(x) * sin (the sign is exact)
    if ROUND_BF16:
        ab = a.to(tl.uint32, bitcast=True)
        a = ((ab + 0x7FFF + ((ab >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        bb = b.to(tl.uint32, bitcast=True)
        b = ((bb + 0x7FFF + ((bb >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        y = a + b
        yb = y.to(tl.uint32, bitcast=True)
        y = ((yb + 0x7FFF + ((yb >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    else:
        a = a.to(x.dtype).to(tl.float32)
        b = b.to(x.dtype).to(tl.float32)
        y = (a + b).to(x.dtype).to(tl.float32)
    if h < Q_HEADS:
        tl.store(qo_ptr + (r * Q_HEADS + h) * HEAD_DIM + d, y.to(qo_ptr.dtype.element_ty), mask=mask)
    else:
        kv = h - Q_HEADS
        t = tl.load(pos_ptr + r)
        tl.store(kc_ptr + r * stride_kcr + kv * stride_kch + t * stride_kct + d, y.to(kc_ptr.dtype.element_ty),
                 mask=mask)
        v = tl.load(v_ptr + r * stride_vr + kv * stride_vh + d, mask=mask, other=0.0)
        tl.store(vc_ptr + r * stride_vcr + kv * stride_vch + t * stride_vct + d, v.to(vc_ptr.dtype.element_ty),
                 mask=mask)


def _triton():
    """Import Triton (once) into this module's globals, where the kernel's body finds ``tl``."""
    return triton_into(globals())


@functools.cache
def _kernel(interpret: bool):
    """The jitted kernel, built at the first call of each mode (``triton.jit`` reads TRITON_INTERPRET)."""
    return _triton().jit(_rope_append)


# ---------------------------------------------------------------------------------------------- wrapper


def fits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether ``rope_append`` takes these: one token a row (``[rows, 1, heads, head_dim]``), an even head size
    up to ``MAX_HEAD_DIM`` that ``cos`` and ``sin`` (``[rows, 1, head_dim]``) cover whole, the dtypes above,
    and unit strides along the head."""
    rows, length, _, dim = q.shape
    return (length == 1 and k.shape[1] == 1 and dim % 2 == 0 and dim <= MAX_HEAD_DIM
            and k.shape[-1] == dim and v.shape[-1] == dim and k.shape[0] == rows and v.shape[:3] == k.shape[:3]
            and cos.shape == (rows, 1, dim) and sin.shape == (rows, 1, dim)
            and q.dtype in _DTYPES and k.dtype == q.dtype and v.dtype == q.dtype
            and all(t.stride(-1) == 1 for t in (q, k, v, cos, sin)))


def rope_append(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                keys: torch.Tensor, values: torch.Tensor, write_pos: torch.Tensor) -> torch.Tensor:
    """Rotate ``q`` and ``k`` (``[rows, 1, heads, head_dim]``, as split from the q/k/v projection) by ``cos``
    and ``sin``, write row ``r``'s rotated key and its value at entry ``write_pos[r]`` of ``keys[r]`` and
    ``values[r]`` (``[>= rows, kv_heads, capacity, head_dim]``, the pool's layer), and return the rotated
    query as ``[rows, q_heads, 1, head_dim]`` (contiguous). ``fits`` must hold."""
    rows, _, q_heads, dim = q.shape
    kv_heads = k.shape[2]
    out = torch.empty((rows, q_heads, 1, dim), device=q.device, dtype=q.dtype)
    if rows == 0:
        return out
    interpret = interpreting()
    kernel = _kernel(interpret)
    block = _triton().next_power_of_2(dim)
    options = {} if interpret else COMPILE_OPTIONS
    kernel[(rows, q_heads + kv_heads)](
        q, k, v, cos, sin, out, keys, values, write_pos, q_heads,
        q.stride(0), q.stride(2), k.stride(0), k.stride(2), v.stride(0), v.stride(2), cos.stride(0), sin.stride(0),
        keys.stride(0), keys.stride(1), keys.stride(2), values.stride(0), values.stride(1), values.stride(2),
        HEAD_DIM=dim, BLOCK=block, ROUND_BF16=interpret and q.dtype == torch.bfloat16,
        num_warps=1 if block <= 128 else 2, **options, **pdl_launch(q.device))
    return out
