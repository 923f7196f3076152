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

With LoRA on q, k or v (``QkvDeltas``: their shrink's partials and B tables, ``adapters/lora_folds.py``), each
program first adds its head's delta as ``lora_bgmv``'s expand would (the row's partials summed, times the slot's
B columns of the head, added in fp32 and rounded to the dtype), which saves the expand's launch a layer.

Only the form above: rotary over the whole head, halves paired (Llama, Mistral, Qwen2, Qwen3; their scaling
types change only ``cos`` and ``sin``). GLM's interleaved half-head rotation and partial rotary keep the
eager path. Triton is imported on first use; with ``TRITON_INTERPRET=1`` the kernel runs on CPU tensors (the
tests), where the fp32 -> bf16 cast truncates (Triton 3.9), so ``ROUND_BF16`` rounds to nearest even by hand,
as ``rms_norm.py`` does.

CUDA graphs: no host sync, no allocation but the query's ``torch.empty``; ``write_pos`` is read on the device.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .support import interpreting, pdl_launch, triton_available, triton_into

if TYPE_CHECKING:
    from .lora_bgmv import LoraPartials

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
                 HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, HALF_BLOCK: tl.constexpr, ROUND_BF16: tl.constexpr,
                 USE_PDL: tl.constexpr = False,
                 p_ptr=None, bq_ptr=None, bk_ptr=None, bv_ptr=None, slot_ptr=None, MQ=0, MK=0, MV=0, RQ=0, RK=0,
                 RV=0, SPLITS=0, stride_pg=0, stride_ps=0, stride_bqr=0, stride_bqs=0, stride_bkr=0, stride_bks=0,
                 stride_bvr=0, stride_bvs=0, LORA: tl.constexpr = False, BLOCK_R: tl.constexpr = 16,
                 BLOCK_S: tl.constexpr = 16):
    """Row ``program_id(0)``, head ``program_id(1)``: a query head (``< Q_HEADS``) rotated into
    ``qo[r, h, 0, :]``, or a key/value head rotated (the key) and both written at ``pos[r]`` in the pool.

    ``LORA``: first each of q, k and v gets its LoRA delta, as ``lora_bgmv``'s expand adds it (``_expand``:
    the row's partials ``p[member, :SPLITS, r]`` summed, times its slot's B columns of this head, added in fp32
    and rounded to the dtype). ``MQ``/``MK``/``MV``: q's, k's and v's member in ``p``; ``RQ``/``RK``/``RV``: the
    rank rows read, 0 for one that no adapter targets (nothing read, nothing added)."""
    r = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    d = tl.arange(0, BLOCK)  # the whole head: v
    mask = d < HEAD_DIM
    half = HEAD_DIM // 2
    e = tl.arange(0, HALF_BLOCK)  # one half of a head: rotate_half pairs entry e with e + half
    e_mask = e < half
    if LORA:  # the slot (a step input) and B (no kernel's output) are read before the PDL wait
        slot = tl.load(slot_ptr + r).to(tl.int64)
        rr = tl.arange(0, BLOCK_R)
        if h < Q_HEADS:
            b_ptr, member, rank, col, stride_br, stride_bs = bq_ptr, MQ, RQ, h * HEAD_DIM, stride_bqr, stride_bqs
        else:
            b_ptr, member, rank = bk_ptr, MK, RK
            col, stride_br, stride_bs = (h - Q_HEADS) * HEAD_DIM, stride_bkr, stride_bks
        r_ok = rr < tl.where(slot != 0, rank, 0)  # a base row (slot 0), or q or k unwrapped: nothing read
        tile = b_ptr + slot * stride_bs + rr.to(tl.int64)[:, None] * stride_br + col
        b_mask = r_ok[:, None] & e_mask[None, :]
        b_lo = tl.load(tile + e[None, :], mask=b_mask, other=0.0).to(tl.float32)  # the head's B, each half once
        b_hi = tl.load(tile + half + e[None, :], mask=b_mask, other=0.0).to(tl.float32)
        v_ok = rr < tl.where(h >= Q_HEADS, tl.where(slot != 0, RV, 0), 0)  # key/value heads only
        v_tile = bv_ptr + slot * stride_bvs + rr.to(tl.int64)[:, None] * stride_bvr + (h - Q_HEADS) * HEAD_DIM
        b_v = tl.load(v_tile + d[None, :], mask=v_ok[:, None] & mask[None, :], other=0.0).to(tl.float32)
    if USE_PDL:  # launched with PDL (support.pdl_enabled): see the kernels before it, then let the next start
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    cos_lo = tl.load(cos_ptr + r * stride_cr + e, mask=e_mask, other=0.0).to(tl.float32)
    cos_hi = tl.load(cos_ptr + r * stride_cr + half + e, mask=e_mask, other=0.0).to(tl.float32)
    sin_lo = tl.load(sin_ptr + r * stride_sr + e, mask=e_mask, other=0.0).to(tl.float32)
    sin_hi = tl.load(sin_ptr + r * stride_sr + half + e, mask=e_mask, other=0.0).to(tl.float32)
    if h < Q_HEADS:
        src = q_ptr + r * stride_qr + h * stride_qh
    else:
        src = k_ptr + r * stride_kr + (h - Q_HEADS) * stride_kh
    lo = tl.load(src + e, mask=e_mask, other=0.0).to(tl.float32)
    hi = tl.load(src + half + e, mask=e_mask, other=0.0).to(tl.float32)
    if LORA:
        rs = tl.arange(0, BLOCK_S)
        ps = p_ptr + rs[:, None] * stride_ps + r * BLOCK_R + rr[None, :]
        xa = tl.reduce(tl.load(ps + member * stride_pg, mask=(rs < SPLITS)[:, None] & r_ok[None, :], other=0.0),
                       0, tl.standard._sum_combine)  # [BLOCK_R]: x @ A^T of this member, as _expand sums it
        lo = lo + tl.reduce(b_lo * xa[:, None], 0, tl.standard._sum_combine)  # each rounded below, as _expand's
        hi = hi + tl.reduce(b_hi * xa[:, None], 0, tl.standard._sum_combine)  # store rounds
        if ROUND_BF16:
            xb = lo.to(tl.uint32, bitcast=True)
            lo = ((xb + 0x7FFF + ((xb >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
            xb = hi.to(tl.uint32, bitcast=True)
            hi = ((xb + 0x7FFF + ((xb >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        else:
            lo = lo.to(q_ptr.dtype.element_ty).to(tl.float32)
            hi = hi.to(q_ptr.dtype.element_ty).to(tl.float32)
    # x * cos + rotate_half(x) * sin, rotate_half(x) = (-hi, lo): each product an fp32 product rounded to x's
    # dtype as torch's is, then their sum (the sign is exact)
    c_lo, s_lo = lo * cos_lo, -hi * sin_lo
    c_hi, s_hi = hi * cos_hi, lo * sin_hi
    if ROUND_BF16:
        ab = c_lo.to(tl.uint32, bitcast=True)
        c_lo = ((ab + 0x7FFF + ((ab >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        ab = s_lo.to(tl.uint32, bitcast=True)
        s_lo = ((ab + 0x7FFF + ((ab >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        ab = c_hi.to(tl.uint32, bitcast=True)
        c_hi = ((ab + 0x7FFF + ((ab >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        ab = s_hi.to(tl.uint32, bitcast=True)
        s_hi = ((ab + 0x7FFF + ((ab >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        y_lo = c_lo + s_lo
        y_hi = c_hi + s_hi
        yb = y_lo.to(tl.uint32, bitcast=True)
        y_lo = ((yb + 0x7FFF + ((yb >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        yb = y_hi.to(tl.uint32, bitcast=True)
        y_hi = ((yb + 0x7FFF + ((yb >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    else:
        dtype = q_ptr.dtype.element_ty
        y_lo = (c_lo.to(dtype).to(tl.float32) + s_lo.to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
        y_hi = (c_hi.to(dtype).to(tl.float32) + s_hi.to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    if h < Q_HEADS:
        dst = qo_ptr + (r * Q_HEADS + h) * HEAD_DIM
        tl.store(dst + e, y_lo.to(qo_ptr.dtype.element_ty), mask=e_mask)
        tl.store(dst + half + e, y_hi.to(qo_ptr.dtype.element_ty), mask=e_mask)
    else:
        kv = h - Q_HEADS
        t = tl.load(pos_ptr + r)
        dst = kc_ptr + r * stride_kcr + kv * stride_kch + t * stride_kct
        tl.store(dst + e, y_lo.to(kc_ptr.dtype.element_ty), mask=e_mask)
        tl.store(dst + half + e, y_hi.to(kc_ptr.dtype.element_ty), mask=e_mask)
        v = tl.load(v_ptr + r * stride_vr + kv * stride_vh + d, mask=mask, other=0.0)
        if LORA:
            xa_v = tl.reduce(tl.load(ps + MV * stride_pg, mask=(rs < SPLITS)[:, None] & v_ok[None, :], other=0.0),
                             0, tl.standard._sum_combine)
            v = v.to(tl.float32) + tl.reduce(b_v * xa_v[:, None], 0, tl.standard._sum_combine)
            if ROUND_BF16:
                vb = v.to(tl.uint32, bitcast=True)
                v = ((vb + 0x7FFF + ((vb >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
            else:
                v = v.to(q_ptr.dtype.element_ty)
        tl.store(vc_ptr + r * stride_vcr + kv * stride_vch + t * stride_vct + d, v.to(vc_ptr.dtype.element_ty),
                 mask=mask)


def _triton():
    """Import Triton (once) into this module's globals, where the kernel's body finds ``tl``."""
    return triton_into(globals())


@functools.cache
def _kernel(interpret: bool):
    """The jitted kernel, built at the first call of each mode (``triton.jit`` reads TRITON_INTERPRET)."""
    # The members and ranks are runtime ints picked per head (a branch): never specialized to constants (1)
    return _triton().jit(_rope_append, do_not_specialize=["MQ", "MK", "MV", "RQ", "RK", "RV"])


# ---------------------------------------------------------------------------------------------- wrapper


@dataclass(frozen=True)
class QkvDeltas:
    """q, k and v's LoRA deltas still to add at a decode step: their shrink's partials (``lora_bgmv.lora_shrink``
    over the wrapped ones, stacked in q, k, v order) and each one's B table (``[R, slots, out]``, pre-scaled;
    None where no adapter targets it). ``rope_append`` adds them as ``lora_bgmv.lora_expand_`` would, one launch
    fewer a layer."""

    partials: LoraPartials
    tables: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]

    def fits(self, q: torch.Tensor, k: torch.Tensor) -> bool:
        """Whether ``rope_append`` can add these to q and k's heads (and v's, k's shape): one table a member of
        the partials, each as wide as its output, unit column strides, a float dtype shared by the tables."""
        tables = [b for b in self.tables if b is not None]
        widths = (q.shape[2] * q.shape[3], k.shape[2] * k.shape[3], k.shape[2] * k.shape[3])
        return (len(tables) == self.partials.p.shape[0] and bool(tables)
                and all(b is None or (b.dim() == 3 and b.shape[2] == w and b.stride(2) == 1)
                        for b, w in zip(self.tables, widths, strict=True))
                and all(b.dtype == tables[0].dtype and b.dtype in _DTYPES and b.device == q.device for b in tables)
                and self.partials.p.shape[2] == q.shape[0] and self.partials.p.is_contiguous())



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
                keys: torch.Tensor, values: torch.Tensor, write_pos: torch.Tensor, lora: QkvDeltas | None = None,
                ) -> torch.Tensor:
    """Rotate ``q`` and ``k`` (``[rows, 1, heads, head_dim]``, as split from the q/k/v projection) by ``cos``
    and ``sin``, write row ``r``'s rotated key and its value at entry ``write_pos[r]`` of ``keys[r]`` and
    ``values[r]`` (``[>= rows, kv_heads, capacity, head_dim]``, the pool's layer), and return the rotated
    query as ``[rows, q_heads, 1, head_dim]`` (contiguous). ``fits`` must hold. ``lora``: each row's LoRA deltas
    added to q, k and v first (``QkvDeltas.fits`` must hold); q, k and v themselves are left as they are."""
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
        HEAD_DIM=dim, BLOCK=block, HALF_BLOCK=_triton().next_power_of_2(dim // 2),
        ROUND_BF16=interpret and q.dtype == torch.bfloat16,
        num_warps=1 if block <= 128 else 2, **options, **pdl_launch(q.device), **_lora_arguments(lora))
    return out


def _lora_arguments(lora: QkvDeltas | None) -> dict:
    """The kernel's LoRA keywords for ``lora`` (none without it): each of q, k, v's member in the partials
    (their order among the wrapped ones) and rank (0 where unwrapped: its table stands in, nothing is read)."""
    if lora is None:
        return {}
    partials, present = lora.partials, [b for b in lora.tables if b is not None]
    members, ranks, tables, strides, member = [], [], [], [], 0
    for b in lora.tables:
        members.append(member if b is not None else 0)  # its index among the wrapped ones
        member += b is not None
        ranks.append(partials.rank if b is not None else 0)
        tables.append(b if b is not None else present[0])
        strides += [tables[-1].stride(0), tables[-1].stride(1)]
    p = partials.p
    return dict(p_ptr=p, bq_ptr=tables[0], bk_ptr=tables[1], bv_ptr=tables[2], slot_ptr=partials.slots,
                MQ=members[0], MK=members[1], MV=members[2], RQ=ranks[0], RK=ranks[1], RV=ranks[2],
                SPLITS=partials.splits, stride_pg=p.stride(0), stride_ps=p.stride(1),
                stride_bqr=strides[0], stride_bqs=strides[1], stride_bkr=strides[2], stride_bks=strides[3],
                stride_bvr=strides[4], stride_bvs=strides[5], LORA=True, BLOCK_R=partials.block_r,
                BLOCK_S=partials.block_s)
