"""The int8 weight-only matmul's decode kernel (``int8_matmul.py``'s small-M path): its Triton source.

``_int8_mm``: one split of the K tiles of one output tile, as tensor-core tiles (2 to 64 rows) or, at one row, a
GEMV on the CUDA cores that widens the int8 weight a 32-bit word at a time; with its one-row epilogues (``GLU``,
``ROPE``: ``int8_epilogues.py``) and the LoRA shrink's extra programs (``SHRINK``: ``int8_shrink.py``); with ``SCALED``
off, a float weight's tensor-core tiles (``dense_splitk.py``).
``_splitk_reduce``: the sum of a split-K launch's partials. ``int8_matmul.py`` jits, tunes and launches them and
says why they are shaped so (its module docstring); ``int8_configs.py`` holds the tiles.
"""

from __future__ import annotations

import triton.language as tl
from triton.language.extra import libdevice

# int8 -> fp32 for the 4 bytes of a 32-bit word ($4, byte 0 the lowest), into $0..$3: XOR 0x80 turns each
# signed byte w into the unsigned w + 128; PRMT puts it under the exponent byte 0x4B, giving the float
# 2^23 + 128 + w exactly (the kernel subtracts 2^23 + 128). Selector 0x754i: byte i of t, then two zero bytes
# and 0x4B from 0x4B000000.
_WIDEN_WORD = tl.constexpr("""{
.reg .b32 t;
xor.b32 t, $4, 0x80808080;
prmt.b32 $0, t, 0x4B000000, 0x7540;
prmt.b32 $1, t, 0x4B000000, 0x7541;
prmt.b32 $2, t, 0x4B000000, 0x7542;
prmt.b32 $3, t, 0x4B000000, 0x7543;
}""")


# Only Triton builtins are called (``tl.full``, not the library's ``@triton.jit`` ``tl.zeros``/``tl.cdiv``):
# library functions are made compiled-only when Triton is imported without TRITON_INTERPRET, and this lets
# the interpreter be switched on later. Out-of-range rows and columns are wrapped (``% M``, ``% N``) instead
# of masked, so the loads of an even K need no mask; the stores are masked.


def _int8_mm(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, p_ptr, M, N, K, M_BUCKET,  # noqa: N803 (Triton's naming)
             stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn,
             HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr, EVEN_K: tl.constexpr, INTERPRETED: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
             USE_PDL: tl.constexpr = False, GLU: tl.constexpr = False,
             ROUND_BF16: tl.constexpr = False, PAIR=1, ROPE: tl.constexpr = False, cos_ptr=None, sin_ptr=None,
             kc_ptr=None, vc_ptr=None, pos_ptr=None, Q_HEADS=0, KV_HEADS=0, stride_kch=0, stride_kct=0,
             stride_vch=0, stride_vct=0, SHRINK: tl.constexpr = False, a_ptr=None, slot_ptr=None, lp_ptr=None,
             rank=0, lora_splits=0, lora_members=1, stride_ag=0, stride_ar=0, stride_as=0, stride_ak=0, stride_pg=0,
             stride_ps=0, stride_slot=0, LORA_EVEN_K: tl.constexpr = True, BLOCK_R: tl.constexpr = 16,
             LORA_K: tl.constexpr = 256, LORA_TILES: tl.constexpr = 1, LORA_U: tl.constexpr = 1,
             SCALED: tl.constexpr = True, EXPAND: tl.constexpr = False, eb_ptr=None, ed_ptr=None,
             stride_ebr=0, stride_ebs=0, stride_edm=0, E_BLOCK_S: tl.constexpr = 1, E_BLOCK_N: tl.constexpr = 256):
    """Split ``program_id(2)`` of the K tiles of one ``[BLOCK_M, BLOCK_N]`` tile of y (small M). Axis 0 walks
    row blocks (fastest), so the row blocks that share a weight tile run together and later reads of that
    tile mostly come from L2. ``M_BUCKET`` is only the autotune key. ``SPLIT_K == 1``: scale, bias and store
    y here; otherwise store the fp32 partial sum at ``p[split, m, n]`` (contiguous ``[SPLIT_K, M, N]``) for
    ``_splitk_reduce``. ``USE_PDL`` (launched with programmatic dependent launch, ``support.pdl_enabled``):
    the GEMV issues its first weight tile's loads, then waits for the kernels before it (``gdc_wait``) before
    it reads x; the tensor-core tiles wait first thing. Either then lets the next kernel launch.

    ``GLU`` (the GEMV tiles, ``SPLIT_K == 1`` only; the weight an MLP's fused gate/up, ``[2 N, K]``): as
    ``dense_gemv.py``'s, the tile's rows pair gate row j with up row N + j and the program stores ``silu(gate) *
    up`` for its ``BLOCK_N / 2`` outputs with ``silu_mul.py``'s roundings (``ROUND_BF16``: the interpreter's,
    there). ``ROPE`` (the same tiles; a fused q/k/v weight, ``[(Q_HEADS + 2 KV_HEADS) * 2 PAIR, K]``, heads of
    ``2 PAIR`` rows): the tile pairs row ``e`` of a head with its row ``e + PAIR`` (rotate_half's partners), and
    the program does ``rope_append.py``'s work for its pairs with that kernel's roundings: a query head's
    rotated into ``y`` (``[Q_HEADS, 2 PAIR]``), a key head's rotated and a value head's as it is written at
    entry ``pos[0]`` of the layer's cache (``kc``/``vc``: row 0's heads and entries by their strides). ``N``:
    the number of pairs (GLU's: the outputs, with ``PAIR`` = N).

    ``SHRINK`` (``int8_shrink.py``): the programs past the matmul's (past its column blocks on axis 1 where
    ``SPLIT_K == 1``, else past its splits on axis 2: the grid's last, which the GPU starts last) run a LoRA shrink
    of the same x instead, ``lora_bgmv._shrink``'s work
    (its partials, ``LoraPartials``: ``lp[g, s, i, :BLOCK_R]`` over split s of K, ``LORA_TILES`` tiles of
    ``LORA_K``, for member g and row i), ``LORA_U`` splits of one (row, member) a program.

    ``EXPAND`` (``int8_expand.py``; not with ``SHRINK``): the programs past the matmul's compute the layer's LoRA
    delta from a shrink done before the launch (o_proj's, in the attention merge), not added: ``d[i, n] = sum over
    r of (sum over s of lp[0, s, i, r]) * eb[r, slot_i, n]`` in fp32 (the sums of ``rms_norm._rms_norm_rows``' fold,
    in its order), ``E_BLOCK_N`` columns of one row a program (``rank``, ``lora_splits``, ``stride_ps``,
    ``BLOCK_R`` and the slots as ``SHRINK``'s), for the add + norm after the layer to add (its ``DONE``). The
    partials are read after the PDL wait, B (no kernel writes it) before it.

    ``SCALED`` False (``dense_splitk.py``): ``w`` is a float weight (bf16, fp16, fp32) read as it is, no row scale
    (``s_ptr`` unused); the tensor-core tiles only (its configs have no GEMV tile, and no epilogue)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if SHRINK or EXPAND:  # the extra programs: past the matmul's column blocks (one split), or past its splits
        n_blocks = (N + BLOCK_N - 1) // BLOCK_N
        if SPLIT_K == 1:
            extra = pid_n >= n_blocks
            unit = (pid_n - n_blocks) * tl.num_programs(0) + pid_m
        else:
            extra = tl.program_id(2) >= SPLIT_K
            unit = ((tl.program_id(2) - SPLIT_K) * tl.num_programs(1) + pid_n) * tl.num_programs(0) + pid_m
        if EXPAND:
            if extra:  # E_BLOCK_N columns of one row's delta
                chunks = (N + E_BLOCK_N - 1) // E_BLOCK_N
                row = unit // chunks
                cn = (unit % chunks) * E_BLOCK_N + tl.arange(0, E_BLOCK_N)
                rr = tl.arange(0, BLOCK_R)
                rs = tl.arange(0, E_BLOCK_S)
                n_ok = (cn < N) & (row + 0 * cn < M)  # past the last unit (the grid is a box): nothing read or written
                in_range = tl.minimum(row, M - 1).to(tl.int64)
                slot = tl.where(row < M, tl.load(slot_ptr + in_range * stride_slot).to(tl.int64), 0)
                r_ok = rr < tl.where(slot != 0, rank, 0)  # a base row (slot 0) loads no B and no partial: d 0
                b = tl.load(eb_ptr + slot * stride_ebs + rr.to(tl.int64)[:, None] * stride_ebr + cn[None, :],
                            mask=r_ok[:, None] & n_ok[None, :], other=0.0, eviction_policy="evict_first")
                if USE_PDL:  # the partials are the kernel before's output
                    tl.extra.cuda.gdc_wait()
                    tl.extra.cuda.gdc_launch_dependents()
                elif not INTERPRETED:  # as the shrink's programs: the next kernel may launch as these run
                    tl.extra.cuda.gdc_launch_dependents()
                ps = lp_ptr + rs[:, None] * stride_ps + in_range * BLOCK_R + rr[None, :]
                xa = tl.reduce(tl.load(ps, mask=(rs < lora_splits)[:, None] & r_ok[None, :], other=0.0), 0,
                               tl.standard._sum_combine)  # [BLOCK_R]: the row's partials summed over the splits
                d = tl.reduce(b.to(tl.float32) * xa[:, None], 0, tl.standard._sum_combine)
                tl.store(ed_ptr + in_range * stride_edm + cn, d, mask=n_ok)
                return
        if SHRINK:
            if extra:
                groups = (lora_splits + LORA_U - 1) // LORA_U  # of LORA_U splits: one a program
                row = unit // (lora_members * groups)
                member = ((unit // groups) % lora_members).to(tl.int64)
                first = (unit % groups) * LORA_U
                ru = tl.arange(0, LORA_U)
                rr = tl.arange(0, BLOCK_R)
                rk = tl.arange(0, LORA_K)
                # the programs past the last unit (the grid is a box) read and write nothing; a block compare (the
                # interpreter rejects a scalar-and-block mask), and the slot read at a row in range
                s_ok = (first + ru < lora_splits) & (row + 0 * ru < M)  # [U]
                in_range = tl.minimum(row, M - 1).to(tl.int64)
                slot = tl.where(row < M, tl.load(slot_ptr + in_range * stride_slot).to(tl.int64), 0)
                row = in_range
                r_ok = rr < tl.where(slot != 0, rank, 0)  # a base row (slot 0), or none, loads nothing
                k0 = (first + ru) * (LORA_TILES * LORA_K)  # [U]: each split's first column
                a_s = (a_ptr + member * stride_ag + slot * stride_as + rr.to(tl.int64)[:, None, None] * stride_ar
                       + (k0[None, :, None] + rk[None, None, :]) * stride_ak)  # [BLOCK_R, U, LORA_K]
                xs = x_ptr + row * stride_xm + (k0[:, None] + rk[None, :]) * stride_xk  # [U, LORA_K]
                ok = s_ok[:, None]
                if not LORA_EVEN_K:
                    ok = ok & (k0[:, None] + rk[None, :] < K)
                # A (no kernel writes it) in flight before the PDL wait, as lora_bgmv's shrink loads it
                a = tl.load(a_s, mask=r_ok[:, None, None] & ok[None, :, :], other=0.0, eviction_policy="evict_first")
                if USE_PDL:  # every program waits, then lets the next kernel start
                    tl.extra.cuda.gdc_wait()
                    tl.extra.cuda.gdc_launch_dependents()
                elif not INTERPRETED:
                    # Launched without PDL (past PDL_MAX_BUCKET rows) the matmul's programs trigger nothing, so the next
                    # kernel (launched with PDL) may start only once every one of them has ended and every one of these
                    # has started: its loads before its own wait (the rotary kernel's q/k/v B tiles, the SiLU
                    # kernel's gate/up ones, the add + norm's down_proj ones) then stream while the shrink runs, not
                    # after it. Its wait still waits for this whole grid, these programs' partials included.
                    tl.extra.cuda.gdc_launch_dependents()
                xl = tl.load(xs, mask=ok, other=0.0).to(tl.float32)
                acc = tl.full((BLOCK_R, LORA_U), 0.0, tl.float32)  # the sums in lora_bgmv's order: tile by tile
                acc += tl.reduce(a.to(tl.float32) * xl[None, :, :], 2, tl.standard._sum_combine)
                for t in range(1, LORA_TILES):
                    a_s += LORA_K * stride_ak
                    xs += LORA_K * stride_xk
                    ok = s_ok[:, None]
                    if not LORA_EVEN_K:
                        ok = ok & (k0[:, None] + t * LORA_K + rk[None, :] < K)
                    xl = tl.load(xs, mask=ok, other=0.0).to(tl.float32)
                    a = tl.load(a_s, mask=r_ok[:, None, None] & ok[None, :, :], other=0.0,
                                eviction_policy="evict_first")
                    acc += tl.reduce(a.to(tl.float32) * xl[None, :, :], 2, tl.standard._sum_combine)
                ps = lp_ptr + member * stride_pg + (first + ru)[None, :] * stride_ps + row * BLOCK_R + rr[:, None]
                # not a base row's
                tl.store(ps, acc, mask=s_ok[None, :] & (rr < tl.where(slot != 0, BLOCK_R, 0))[:, None])
                return
    k_tiles = (K + BLOCK_K - 1) // BLOCK_K
    if SPLIT_K == 1:
        k_first = 0
        k_stop = k_tiles
    else:
        per_split = (k_tiles + SPLIT_K - 1) // SPLIT_K
        k_first = tl.program_id(2) * per_split
        k_stop = tl.minimum(k_first + per_split, k_tiles)  # a split past the end stores zeros
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    if GLU or ROPE:  # tile row 2 i: the program's i-th pair's first row, 2 i + 1: its partner PAIR rows on
        t = (pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N) // 2) % N  # (a gate row's partner: PAIR = N on)
        rows = (t // PAIR) * (2 * PAIR) + t % PAIR + (tl.arange(0, BLOCK_N) % 2) * PAIR
    else:
        rows = rn % N
    if BLOCK_M == 1:  # GEMV (the 1-row bucket's own tiles): CUDA cores, products and sums in fp32
        # The weight is read as 32-bit words, 4 bytes of a row each (K % 4 == 0 and a unit column stride:
        # _small_m sees to it), in a [BLOCK_N, BLOCK_K // 4] tile, K fastest (16-byte loads along a row). x
        # is loaded as [BLOCK_K // 4, 4] and split into its 4 columns, x_i[j] = x[4j + i], the partners of
        # byte i of word j. The products are summed elementwise into a tile of fp32 sums (no cross-lane
        # reduction in the loop, one after it), and the next tile is loaded before this one is used (Triton
        # pipelines only loads that feed a dot): twice the bytes in flight a thread.
        rw = tl.arange(0, BLOCK_K // 4)
        wt = (w_ptr.to(tl.pointer_type(tl.int32)) + rows[:, None] * (stride_wn // 4)
              + (k_first * (BLOCK_K // 4) + rw)[None, :])
        xv = (x_ptr + pid_m * stride_xm + (k_first * BLOCK_K + 4 * rw)[:, None] * stride_xk
              + tl.arange(0, 4)[None, :] * stride_xk)  # [BK / 4, 4]
        # Bytes of K left from each tile on, 0 past the split's end (a split past K's end loads nothing and
        # stores zeros). A block compare, not a scalar condition: the interpreter rejects a scalar-and-block
        # mask, and K % 16 == 0 (as Triton specializes it) keeps the loads 16 bytes wide.
        words_left = tl.where(k_first < k_stop, K // 4 - k_first * (BLOCK_K // 4), 0)
        w = tl.load(wt, mask=rw[None, :] < words_left, other=0, eviction_policy="evict_first")
        if USE_PDL:  # the weight is no kernel's output: its first tile is in flight before the wait
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        x = tl.load(xv, mask=rw[:, None] < words_left, other=0.0)
        sums = tl.full((BLOCK_N, BLOCK_K // 4), 0.0, tl.float32)
        for k in range(k_first, k_stop):
            xv += BLOCK_K * stride_xk
            wt += BLOCK_K // 4
            words_left = tl.where(k + 1 < k_stop, K // 4 - (k + 1) * (BLOCK_K // 4), 0)
            x_next = tl.load(xv, mask=rw[:, None] < words_left, other=0.0)
            w_next = tl.load(wt, mask=rw[None, :] < words_left, other=0, eviction_policy="evict_first")
            x02, x13 = tl.split(tl.reshape(x.to(tl.float32), (BLOCK_K // 4, 2, 2)))
            x0, x2 = tl.split(x02)
            x1, x3 = tl.split(x13)
            # int8 -> fp32 without the I2F conversion (a quarter-rate instruction on Hopper: 16 a cycle an SM,
            # one a weight byte, which caps the read near the H200's bandwidth): byte i as unsigned (w + 128)
            # under the exponent byte 0x4B is the float 2^23 + 128 + w exactly; minus 2^23 + 128 is w, exactly.
            if INTERPRETED:  # the same bits by arithmetic: the interpreter runs no PTX
                f0 = (((w >> 0) & 0xFF) ^ 0x4B000080).to(tl.float32, bitcast=True)
                f1 = (((w >> 8) & 0xFF) ^ 0x4B000080).to(tl.float32, bitcast=True)
                f2 = (((w >> 16) & 0xFF) ^ 0x4B000080).to(tl.float32, bitcast=True)
                f3 = (((w >> 24) & 0xFF) ^ 0x4B000080).to(tl.float32, bitcast=True)
            else:  # one XOR a word, one PRMT a byte
                f0, f1, f2, f3 = tl.inline_asm_elementwise(_WIDEN_WORD, "=r,=r,=r,=r,r", [w], is_pure=True,
                                                           dtype=(tl.float32, tl.float32, tl.float32, tl.float32),
                                                           pack=1)
            sums += (f0 - 8388736.0) * x0[None, :]
            sums += (f1 - 8388736.0) * x1[None, :]
            sums += (f2 - 8388736.0) * x2[None, :]
            sums += (f3 - 8388736.0) * x3[None, :]
            x = x_next
            w = w_next
        acc = tl.reduce(sums, 1, tl.standard._sum_combine)[None, :]  # [1, BN]
    else:
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        xs = x_ptr + (rm % M)[:, None] * stride_xm + (k_first * BLOCK_K + rk)[None, :] * stride_xk  # [BM, BK]
        ws = w_ptr + (rn % N)[None, :] * stride_wn + (k_first * BLOCK_K + rk)[:, None] * stride_wk  # [BK, BN]
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        for k in range(k_first, k_stop):
            if EVEN_K:
                x = tl.load(xs)
                w = tl.load(ws, eviction_policy="evict_first")  # each weight byte is read once: keep x in cache
            else:
                k_left = K - k * BLOCK_K
                x = tl.load(xs, mask=rk[None, :] < k_left, other=0.0)
                w = tl.load(ws, mask=rk[:, None] < k_left, other=0, eviction_policy="evict_first")
            if DOT_F32:  # fp32 inputs; and the interpreter, whose dot multiplies bf16 as raw uint16 bits
                acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
            else:  # bf16/fp16 tensor cores; int8 -> x.dtype is exact (|CB| <= 127), products exact in fp32
                acc = tl.dot(x, w.to(x.dtype), acc)
            xs += BLOCK_K * stride_xk
            ws += BLOCK_K * stride_wk
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    if GLU:  # silu_mul.py's kernel on the gate and up rounded to y's dtype (see there for the roundings)
        scale = tl.load(s_ptr + rows) * (1.0 / 127.0)
        acc = acc * scale[None, :]
        if HAS_BIAS:
            acc += tl.load(b_ptr + rows).to(tl.float32)[None, :]
        g, u = tl.split(tl.reshape(acc.to(y_ptr.dtype.element_ty).to(tl.float32), (BLOCK_N // 2, 2)))
        if INTERPRETED:
            sg = g / (1.0 + tl.exp(-g))
        else:
            sg = tl.math.div_rn(g, 1.0 + libdevice.exp(-g))
        if ROUND_BF16:
            sb = sg.to(tl.uint32, bitcast=True)
            sg = ((sb + 0x7FFF + ((sb >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
            out = sg * u
            ob = out.to(tl.uint32, bitcast=True)
            out = ((ob + 0x7FFF + ((ob >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        else:
            out = sg.to(y_ptr.dtype.element_ty).to(tl.float32) * u
        cols = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        tl.store(y_ptr + pid_m * stride_ym + cols * stride_yn, out.to(y_ptr.dtype.element_ty), mask=cols < N)
    elif ROPE:  # rope_append.py's kernel on q, k, v rounded to y's dtype (a copy: see there for the roundings)
        scale = tl.load(s_ptr + rows) * (1.0 / 127.0)
        acc = acc * scale[None, :]
        if HAS_BIAS:
            acc += tl.load(b_ptr + rows).to(tl.float32)[None, :]
        lo, hi = tl.split(tl.reshape(acc.to(y_ptr.dtype.element_ty).to(tl.float32), (BLOCK_N // 2, 2)))
        t = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        head, e, ok = t // PAIR, t % PAIR, t < N
        cos_lo = tl.load(cos_ptr + e, mask=ok, other=0.0).to(tl.float32)
        cos_hi = tl.load(cos_ptr + PAIR + e, mask=ok, other=0.0).to(tl.float32)
        sin_lo = tl.load(sin_ptr + e, mask=ok, other=0.0).to(tl.float32)
        sin_hi = tl.load(sin_ptr + PAIR + e, mask=ok, other=0.0).to(tl.float32)
        c = tl.join(lo * cos_lo, hi * cos_hi)
        s = tl.join(-hi * sin_lo, lo * sin_hi)
        if ROUND_BF16:
            cb = c.to(tl.uint32, bitcast=True)
            c = ((cb + 0x7FFF + ((cb >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
            sb = s.to(tl.uint32, bitcast=True)
            s = ((sb + 0x7FFF + ((sb >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
            r = c + s
            rb = r.to(tl.uint32, bitcast=True)
            r = ((rb + 0x7FFF + ((rb >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        else:
            dtype = y_ptr.dtype.element_ty
            r = (c.to(dtype).to(tl.float32) + s.to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
        at = e[:, None] + tl.arange(0, 2)[None, :] * PAIR
        where = tl.load(pos_ptr).to(tl.int64)
        is_q = ok & (head < Q_HEADS)
        is_k = ok & (head >= Q_HEADS) & (head < Q_HEADS + KV_HEADS)
        is_v = ok & (head >= Q_HEADS + KV_HEADS)
        kv = tl.where(is_v, head - Q_HEADS - KV_HEADS, head - Q_HEADS).to(tl.int64)
        tl.store(y_ptr + head[:, None] * (2 * PAIR) + at, r.to(y_ptr.dtype.element_ty), mask=is_q[:, None])
        tl.store(kc_ptr + kv[:, None] * stride_kch + where * stride_kct + at, r.to(kc_ptr.dtype.element_ty),
                 mask=is_k[:, None])
        tl.store(vc_ptr + kv[:, None] * stride_vch + where * stride_vct + at,
                 tl.join(lo, hi).to(vc_ptr.dtype.element_ty), mask=is_v[:, None])
    elif SPLIT_K == 1:
        if SCALED:
            scale = tl.load(s_ptr + rows) * (1.0 / 127.0)  # one multiply per output, after the K loop
            acc = acc * scale[None, :]
        if HAS_BIAS:
            acc += tl.load(b_ptr + rows).to(tl.float32)[None, :]
        ys = y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn
        tl.store(ys, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        ps = p_ptr + (tl.program_id(2) * M + rm)[:, None] * N + rn[None, :]
        tl.store(ps, acc, mask=mask)


def _splitk_reduce(p_ptr, s_ptr, b_ptr, y_ptr, M, N, stride_ym, stride_yn,  # noqa: N803
                   HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr = False,
                   SCALED: tl.constexpr = True):
    """``y[m, n] = (sum over s, in order, of p[s, m, n]) * SCB[n] / 127 + bias[n]``, cast to y's dtype (without
    the scale where not ``SCALED``: a float weight's). ``USE_PDL``: wait for the matmul (its partials), then let
    the next kernel start (``REDUCE_PDL``)."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    total = M * N
    mask = idx < total
    acc = tl.load(p_ptr + idx, mask=mask, other=0.0)
    for s in range(1, SPLIT_K):
        acc += tl.load(p_ptr + s * total + idx, mask=mask, other=0.0)
    n = idx % N
    if SCALED:
        acc = acc * (tl.load(s_ptr + n, mask=mask, other=0.0) * (1.0 / 127.0))
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + (idx // N) * stride_ym + n * stride_yn, acc.to(y_ptr.dtype.element_ty), mask=mask)
