"""The decode attention's Triton source (``decode_attention.py`` says what the kernels do and why, and launches
them): ``_attention_partials``, one split of the keys and values for a (row, key/value head) and its query heads,
with the merge by the last split and o_proj's LoRA shrink where fused; ``_attention_combine``, the merge of the
splits' partials where not.

Triton is imported on first use (``_triton``), not at import: the daemon runs without it on the CPU.
"""

from __future__ import annotations

from .support import triton_into

# Bound on first use by ``_triton()``: the kernels' bodies refer to ``tl`` as a module global.
triton = None
tl = None


def _triton():
    """Import Triton (once) into this module's globals, where the kernels' bodies find ``tl``."""
    return triton_into(globals())


# Only Triton builtins are called (as in rope_append.py; reductions through ``tl.reduce`` with the library's
# combine functions, as int8_matmul.py's), so the interpreter can be switched on later.


def _attention_partials(q_ptr, k_ptr, v_ptr, mask_ptr, m_ptr, l_ptr, acc_ptr,  # noqa: N803 (Triton's naming)
                        LENGTH, SPLITS, KV_HEADS, scale,
                        stride_qb, stride_qh, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
                        stride_mb, stride_mt,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr, CHUNK: tl.constexpr,
                        G_PAD: tl.constexpr = 0, DOT_F32: tl.constexpr = False, USE_PDL: tl.constexpr = False,
                        count_ptr=None, o_ptr=None, stride_ob=0, stride_oh=0, FUSED: tl.constexpr = False,
                        BLOCK_S: tl.constexpr = 32, oa_ptr=None, slot_ptr=None, op_ptr=None, O_RANK=0,
                        stride_oar=0, stride_oas=0, stride_ops=0, SHRINK: tl.constexpr = False,
                        BLOCK_R: tl.constexpr = 16, fresh_ptr=None, PREFETCH: tl.constexpr = False):
    """Split ``program_id(1)`` of key/value head ``program_id(0) % KV_HEADS`` of row ``program_id(0) //
    KV_HEADS``: for each of its ``GROUP`` query heads, ``m``, ``l`` and ``acc`` at ``[row, head, split]``.

    ``G_PAD == 0`` (one query head a key/value head): elementwise products reduced across lanes. Otherwise the
    group's heads as the rows of two matrix products (``G_PAD`` >= 16 rows, ``GROUP`` of them real): scores
    ``Q K^T`` and ``P V`` on the tensor cores, the keys' and values' dtype in, fp32 sums out (exact products of
    bf16 or fp16 scores; the probabilities kept to ~fp32 precision by three tf32 products, where SDPA's kernels
    round them to bf16), or fp32 throughout with ``DOT_F32`` (fp32 or mixed dtypes, and the interpreter). Reducing
    across lanes once per head made a group of 4 at 32 rows 3x slower than cuDNN (H200, 2026-12-03).

    ``FUSED``: then the program that stores the last of the row's and key/value head's splits (``count_ptr``'s
    counter, one a program row) merges them as ``_attention_combine`` does, into ``o_ptr``, and zeroes it again;
    with ``SHRINK`` too, it also writes each merged head's o_proj LoRA partial, as ``_attention_combine`` does.

    ``PREFETCH``: the mask and the chunk's keys and values are read before the PDL wait, and after it only the
    entry at ``fresh[row]`` again (the one the kernel just before wrote: ``decode_attention``'s ``fresh``)."""
    bh = tl.program_id(0)
    split = tl.program_id(1)
    if not PREFETCH:
        if USE_PDL:  # launched with PDL (support.pdl_enabled): see the kernels before it, then let the next start
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
    b = (bh // KV_HEADS).to(tl.int64)
    kv = bh % KV_HEADS
    t = split * CHUNK + tl.arange(0, CHUNK)
    d = tl.arange(0, BLOCK_D)
    in_range = t < LENGTH
    bias = tl.load(mask_ptr + b * stride_mb + t * stride_mt, mask=in_range, other=-3.0e38).to(tl.float32)
    # The additive masks hide with the dtype's minimum (-3.4e38 in fp32 and bf16, -65504 in fp16); a score
    # moved by -6e4 or more weighs 0 in fp32 anyway, so treating it as hidden changes nothing but what is read
    visible = in_range & (bias > -6.0e4)
    any_visible = tl.reduce(visible.to(tl.int32), 0, tl.standard._elementwise_max) > 0
    kv_mask = visible[:, None] & (d[None, :] < HEAD_DIM)  # nothing is read where nothing is visible
    k_tile = k_ptr + b * stride_kb + kv * stride_kh + t[:, None] * stride_kt + d[None, :]
    v_tile = v_ptr + b * stride_vb + kv * stride_vh + t[:, None] * stride_vt + d[None, :]
    if PREFETCH:  # the chunk in flight while the kernel before (rotary + append) still runs
        keys = tl.load(k_tile, mask=kv_mask, other=0.0)
        values = tl.load(v_tile, mask=kv_mask, other=0.0)
        fresh = tl.load(fresh_ptr + b)
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        # the entry the kernel just before wrote, read again from L2 (``.cg``: the copy in this SM's L1 may be
        # the one read before the wait)
        new = kv_mask & (t == fresh)[:, None]
        keys = tl.where(new, tl.load(k_tile, mask=new, other=0.0, cache_modifier=".cg"), keys)
        values = tl.where(new, tl.load(v_tile, mask=new, other=0.0, cache_modifier=".cg"), values)
    # otherwise a chunk is read below, only where something in it is visible
    out = (b * KV_HEADS * GROUP + kv * GROUP) * SPLITS + split  # [row, q_head, split] of the first head
    if G_PAD > 0:
        gi = tl.arange(0, G_PAD)
        rows_out = out + gi * SPLITS  # [G_PAD]: [row, q_head, split] of each of the group's heads
        real = gi < GROUP
        if any_visible:
            if not PREFETCH:
                keys = tl.load(k_tile, mask=kv_mask, other=0.0)  # [CHUNK, BLOCK_D], stored dtype
                values = tl.load(v_tile, mask=kv_mask, other=0.0)
            q = tl.load(q_ptr + b * stride_qb + (kv * GROUP + gi)[:, None] * stride_qh + d[None, :],
                        mask=real[:, None] & (d[None, :] < HEAD_DIM), other=0.0)  # [G_PAD, BLOCK_D]
            if DOT_F32:
                scores = tl.dot(q.to(tl.float32), tl.trans(keys.to(tl.float32)), input_precision="ieee")
            else:
                scores = tl.dot(q.to(keys.dtype), tl.trans(keys))  # [G_PAD, CHUNK] fp32
            scores = tl.where(visible[None, :], scores * scale + bias[None, :], -float("inf"))
            m = tl.reduce(scores, 1, tl.standard._elementwise_max)  # [G_PAD]
            p = tl.exp(scores - m[:, None])  # 0 where hidden
            if DOT_F32:
                acc = tl.dot(p, values.to(tl.float32), input_precision="ieee")
            else:
                # fp32 probabilities as three tf32 products (~fp32's precision; the values convert exactly)
                acc = tl.dot(p, values.to(tl.float32), input_precision="tf32x3")  # [G_PAD, BLOCK_D] fp32
            tl.store(m_ptr + rows_out, m, mask=real)
            tl.store(l_ptr + rows_out, tl.reduce(p, 1, tl.standard._sum_combine), mask=real)
            tl.store(acc_ptr + rows_out[:, None] * BLOCK_D + d[None, :], acc, mask=real[:, None])
        else:  # nothing visible in this chunk: no reads; it weighs 0 in the combine
            tl.store(m_ptr + rows_out, tl.full((G_PAD,), -float("inf"), tl.float32), mask=real)
            tl.store(l_ptr + rows_out, tl.full((G_PAD,), 0.0, tl.float32), mask=real)
            tl.store(acc_ptr + rows_out[:, None] * BLOCK_D + d[None, :], tl.full((G_PAD, BLOCK_D), 0.0, tl.float32),
                     mask=real[:, None])
    elif any_visible:
        if PREFETCH:
            keys_f32 = keys.to(tl.float32)
            values_f32 = values.to(tl.float32)
        else:
            keys_f32 = tl.load(k_tile, mask=kv_mask, other=0.0).to(tl.float32)  # [CHUNK, BLOCK_D]
            values_f32 = tl.load(v_tile, mask=kv_mask, other=0.0).to(tl.float32)
        for g in tl.static_range(GROUP):
            head = kv * GROUP + g
            q = tl.load(q_ptr + b * stride_qb + head * stride_qh + d, mask=d < HEAD_DIM, other=0.0).to(tl.float32)
            # [CHUNK], as SDPA: q.k * scale + mask
            scores = tl.reduce(q[None, :] * keys_f32, 1, tl.standard._sum_combine) * scale + bias
            scores = tl.where(visible, scores, -float("inf"))
            m = tl.reduce(scores, 0, tl.standard._elementwise_max)
            p = tl.exp(scores - m)  # 0 where hidden
            tl.store(m_ptr + out + g * SPLITS, m)
            tl.store(l_ptr + out + g * SPLITS, tl.reduce(p, 0, tl.standard._sum_combine))
            tl.store(acc_ptr + (out + g * SPLITS) * BLOCK_D + d,
                     tl.reduce(p[:, None] * values_f32, 0, tl.standard._sum_combine))
    else:  # nothing visible in this chunk: no reads; it weighs 0 in the combine
        for g in tl.static_range(GROUP):
            tl.store(m_ptr + out + g * SPLITS, -float("inf"))
            tl.store(l_ptr + out + g * SPLITS, 0.0)
            tl.store(acc_ptr + (out + g * SPLITS) * BLOCK_D + d, tl.full((BLOCK_D,), 0.0, tl.float32))
    if FUSED:  # the last split to arrive merges (no combine launch): see the module's docstring
        tl.debug_barrier()  # every thread's stores above come before the (one-thread) release below
        arrived = tl.atomic_add(count_ptr + bh, 1, sem="acq_rel")  # splits stored before this one's
        if arrived == SPLITS - 1:
            tl.debug_barrier()  # the acquire above comes before any thread of the program reads
            s = tl.arange(0, BLOCK_S)
            for g in tl.static_range(GROUP):  # as _attention_combine, head by head: same operations, same order
                hq = (bh * GROUP + g).to(tl.int64)  # [row, q_head]
                top = tl.reduce(tl.load(m_ptr + hq * SPLITS + s, mask=s < SPLITS, other=-float("inf"),
                                        cache_modifier=".cg"), 0, tl.standard._elementwise_max)
                for first in range(BLOCK_S, SPLITS, BLOCK_S):
                    block = tl.load(m_ptr + hq * SPLITS + first + s, mask=first + s < SPLITS, other=-float("inf"),
                                    cache_modifier=".cg")
                    top = tl.maximum(top, tl.reduce(block, 0, tl.standard._elementwise_max))
                total = tl.reduce(tl.full((BLOCK_S,), 0.0, tl.float32), 0, tl.standard._sum_combine)
                merged = tl.full((BLOCK_D,), 0.0, tl.float32)
                for first in range(0, SPLITS, BLOCK_S):
                    live = first + s < SPLITS
                    m = tl.load(m_ptr + hq * SPLITS + first + s, mask=live, other=-float("inf"), cache_modifier=".cg")
                    weight = tl.where(m > -float("inf"), tl.exp(m - top), 0.0)
                    total += tl.reduce(weight * tl.load(l_ptr + hq * SPLITS + first + s, mask=live, other=0.0,
                                                        cache_modifier=".cg"), 0, tl.standard._sum_combine)
                    part = tl.load(acc_ptr + (hq * SPLITS + first + s)[:, None] * BLOCK_D + d[None, :],
                                   mask=live[:, None], other=0.0, cache_modifier=".cg")
                    merged += tl.reduce(weight[:, None] * part, 0, tl.standard._sum_combine)
                o = (merged / total).to(o_ptr.dtype.element_ty)
                tl.store(o_ptr + b * stride_ob + (kv * GROUP + g) * stride_oh + d, o, mask=d < HEAD_DIM)
                if SHRINK:  # o_proj's LoRA shrink over this head's inputs, as _attention_combine's
                    slot = tl.load(slot_ptr + b).to(tl.int64)
                    rr = tl.arange(0, BLOCK_R)
                    r_ok = rr < tl.where(slot != 0, O_RANK, 0)
                    col = (kv * GROUP + g) * HEAD_DIM
                    a = tl.load(oa_ptr + slot * stride_oas + rr.to(tl.int64)[:, None] * stride_oar + (col + d)[None, :],
                                mask=r_ok[:, None] & (d < HEAD_DIM)[None, :], other=0.0)
                    tl.store(op_ptr + (kv * GROUP + g) * stride_ops + b * BLOCK_R + rr,
                             tl.reduce(a.to(tl.float32) * o.to(tl.float32)[None, :], 1, tl.standard._sum_combine))
            tl.atomic_xchg(count_ptr + bh, 0)  # zero again for the next call (or graph replay)


def _attention_combine(m_ptr, l_ptr, acc_ptr, o_ptr, SPLITS, Q_HEADS, stride_ob, stride_oh,  # noqa: N803
                       HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
                       USE_PDL: tl.constexpr = False, oa_ptr=None, slot_ptr=None, op_ptr=None, O_RANK=0,
                       stride_oar=0, stride_oas=0, stride_ops=0, SHRINK: tl.constexpr = False,
                       BLOCK_R: tl.constexpr = 16):
    """Row ``program_id(0) // Q_HEADS``, head ``program_id(0) % Q_HEADS``: the splits merged, in order,
    ``BLOCK_S`` at a time (a first pass for the largest ``m``, finite: every row sees at least its own new
    entry; a second for the weighted sums).

    ``SHRINK``: the head's output is also the split ``h`` of o_proj's input, and the program writes its LoRA
    shrink there, as ``lora_bgmv``'s shrink would (``op[h, row, :BLOCK_R] = o @ A[:O_RANK, slot, h's columns].T``,
    fp32, from the output as stored): o_proj's own shrink launch saved."""
    bh = tl.program_id(0).to(tl.int64)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    b = bh // Q_HEADS
    h = bh % Q_HEADS
    if SHRINK:  # the slot (a step input) and A (no kernel's output) are read before the PDL wait
        slot = tl.load(slot_ptr + b).to(tl.int64)
        rr = tl.arange(0, BLOCK_R)
        r_ok = rr < tl.where(slot != 0, O_RANK, 0)  # a base row (slot 0) reads nothing
        a = tl.load(oa_ptr + slot * stride_oas + rr.to(tl.int64)[:, None] * stride_oar + (h * HEAD_DIM + d)[None, :],
                    mask=r_ok[:, None] & (d < HEAD_DIM)[None, :], other=0.0)
    if USE_PDL:  # launched with PDL (support.pdl_enabled): see the kernels before it, then let the next start
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    top = tl.reduce(tl.load(m_ptr + bh * SPLITS + s, mask=s < SPLITS, other=-float("inf")), 0,
                    tl.standard._elementwise_max)
    for first in range(BLOCK_S, SPLITS, BLOCK_S):
        block = tl.load(m_ptr + bh * SPLITS + first + s, mask=first + s < SPLITS, other=-float("inf"))
        top = tl.maximum(top, tl.reduce(block, 0, tl.standard._elementwise_max))
    total = tl.reduce(tl.full((BLOCK_S,), 0.0, tl.float32), 0, tl.standard._sum_combine)
    acc = tl.full((BLOCK_D,), 0.0, tl.float32)
    for first in range(0, SPLITS, BLOCK_S):
        live = first + s < SPLITS
        m = tl.load(m_ptr + bh * SPLITS + first + s, mask=live, other=-float("inf"))
        weight = tl.where(m > -float("inf"), tl.exp(m - top), 0.0)  # a chunk with nothing visible weighs 0
        total += tl.reduce(weight * tl.load(l_ptr + bh * SPLITS + first + s, mask=live, other=0.0), 0,
                           tl.standard._sum_combine)
        part = tl.load(acc_ptr + (bh * SPLITS + first + s)[:, None] * BLOCK_D + d[None, :], mask=live[:, None],
                       other=0.0)
        acc += tl.reduce(weight[:, None] * part, 0, tl.standard._sum_combine)
    o = (acc / total).to(o_ptr.dtype.element_ty)
    tl.store(o_ptr + b * stride_ob + h * stride_oh + d, o, mask=d < HEAD_DIM)
    if SHRINK:
        tl.store(op_ptr + h * stride_ops + b * BLOCK_R + rr,
                 tl.reduce(a.to(tl.float32) * o.to(tl.float32)[None, :], 1, tl.standard._sum_combine))
