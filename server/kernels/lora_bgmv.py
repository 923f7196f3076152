"""Batched LoRA for decode steps (BGMV, after Punica): ``y[i] += (x[i] @ A[:r, s_i].T) @ B[:r, s_i]``.

One token a row, each row with its own adapter slot ``s_i``: a matrix-vector product per row, memory bound
(every weight byte read is used for one multiply-add per row). The torch paths of ``BatchedLoraLinear`` cost
three kernels a layer (a low-occupancy ``x @ A_all`` matmul over every slot, a one-hot multiply, an addmm);
these are two, and read only the slots in use:

* shrink, grid ``(rows, splits)``: program ``(i, s)`` reads row i of x and its slot's ``A[:r, slot]`` over
  split s of K (``TILES`` tiles of ``BLOCK_K``) and stores the fp32 partial ``p[s, i, :BLOCK_R]``. Splitting K
  gives one row enough programs to keep the GPU's memory system busy: at ``in = 4096`` and rank 16, one
  program would stream 128 KB of A alone; 16 splits of 8 KB each do it in one memory round trip.
* expand, grid ``(rows, cdiv(out, BLOCK_N))``: program ``(i, n)`` sums row i's partials over the splits (one
  ``[BLOCK_S, BLOCK_R]`` load: at most ``MAX_PARTIALS`` floats, read from L2), multiplies by its slot's
  ``B[:r, slot, n-block]`` and adds into ``y[i, n-block]`` (read, add in fp32, cast, store: each program owns
  its outputs; no atomics, deterministic).

Layers that share their input (an attention's q, k and v) run as one group (``lora_group_delta_``): one
shrink launch with the members on the grid's third axis (their A tables stacked, ``[G, R, S, in]``), then one
expand launch whose column blocks walk the members one after the other: 2 launches instead of 2G (at 32 rows
on 32 adapters the expands were 128 launches of ~2.9 us a 7B step on the H200, 2026-12-03); a single layer is
a group of one.

The two halves are also callable alone (``lora_shrink`` returns the partials, ``LoraPartials``; ``lora_expand_``
adds them), so that the engine's own decoder can fold one into a kernel that runs beside it anyway
(``adapters/lora_folds.py``): q, k and v's expand into the rotary + append kernel, o_proj's shrink into the decode
attention's merge, gate and up's expand into the SiLU product (``silu_mul.py``), and at many rows o_proj's and
down_proj's expands into the residual add + norm after them (``rms_norm.OutputDelta``). On the H200 (serve_bench,
bench/RESULTS.md) the first two took 32 rows on 32 adapters from 0.93 to 0.96 of base-only in int8 (c5efac0) and
from 0.93 to 0.94 in bf16 (89ba5f3); the others have not run on a GPU yet (bench/NOTES.md).

Rows on slot 0 ("no adapter", an all-zero slot) return at once in both kernels: their y is not touched and
their partials are never written or read. Accumulation is fp32 throughout; x and the tables may be fp32,
bf16 or fp16, each widened on load; the result is cast to y's dtype once.

Tables are rank-major as ``BatchedLoraLinear`` keeps them: ``A: [R, slots, in]``, ``B: [R, slots, out]`` (B
pre-scaled); only the first ``rank`` rank rows are read (masked: rank need not be a power of two).

Block sizes are fixed heuristics (no autotuning, so nothing benchmarks or syncs at call time), see
``plan``: each program's tile is ``TILE_ELEMS`` (4096) elements, 8 KB of bf16 weights, loaded by one warp
(128 values a thread, 16 vector loads of 16 bytes in flight each): even one row at ``in = out = 4096`` gets
16 programs a kernel, and 32 rows 512. Measured on an H200 (bench/lora_kernel_bench.py, bf16, rank 16, 33
slots, tables rotated so every call reads HBM, CUDA graphs; µs a layer, both kernels), tile elements x warps:

    in x out, rows   2048x1  4096x1  8192x1  4096x2  4096x4  8192x4
    4096x4096, 1        3.9     4.4     5.9     4.7     5.4     6.0
    4096x4096, 32       6.4     6.3     8.1     7.7    10.9     9.1
    4096x4096, 64       7.3     7.0     8.4     9.6    16.0    10.8
    4096x11008, 32      8.1     8.1     9.8    10.8    19.6    12.6
    11008x4096, 32      8.5     7.9     9.0     9.5    12.9      -

Fewer warps win: the work a program does is one load per thread and a reduction, so more values a thread
means more bytes in flight per SM for the same registers spent on bookkeeping (the torch dense path these
replace takes 16-18 µs at 32 rows, the gathered one 14 µs at one row).

PDL (``support.pdl_enabled``): both kernels load their row's slot and their weight tile (A or B: no kernel of a
step writes either) before ``gdc_wait``, so those bytes stream while the kernel before still ends; only x, the
partials and y are read after it. On the H200 (serve_bench, bench/RESULTS.md) one LoRA row at batch 1 went from
+0.41 to +0.25 ms over base-only (int8, bbb044f) and 32 rows on 32 adapters from 0.92 to 0.94 (int8) and 0.93
(bf16, 6ede3bd) of base-only.

CUDA graphs: no host sync, no value-dependent shape; the partials' scratch is ``torch.empty`` of a size that
depends only on (rows, in, rank), so a captured graph allocates it from its pool. ``rank`` is a Python int:
a graph is captured per rank bucket, as the engine does. Compilation happens on the first call of each
(dtypes, in, out, BLOCK sizes) combination, so warm up (the engine's eager forwards before each capture do).

Interpreter: with ``TRITON_INTERPRET`` set (read at each call) the same kernels run on CPU tensors.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .support import interpreting, pdl_launch

TILE_ELEMS = 4096  # weight elements a program loads at once: BLOCK_R * BLOCK_K (shrink), BLOCK_R * BLOCK_N
MAX_PARTIALS = 2048  # fp32 partials an expand program sums: splits * BLOCK_R (8 KB, from L2)
MIN_BLOCK_R = 16  # rank rows a tile covers at least (masked above the rank: no bytes read for them)
NUM_WARPS = 1  # a warp a program (see the table above)
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ---------------------------------------------------------------------------------------------- kernels
# Only Triton builtins (``tl.full``, not ``tl.zeros``), as in int8_matmul: the interpreter can be switched on
# after Triton was imported. Sums are ``tl.reduce(v, axis, tl.standard._sum_combine)``, what ``tl.sum`` does
# for fp32 (``tl.sum`` itself is a library function; the interpreter patches ``tl.reduce`` and sums with numpy
# when it sees ``_sum_combine``). Offsets along the slot and rank axes are int64: a table may pass 2**31
# elements.


def _shrink(x_ptr, a_ptr, slot_ptr, p_ptr, K, rank,  # noqa: N803 (Triton's naming)
            stride_xm, stride_xk, stride_ag, stride_ar, stride_as, stride_ak, stride_pg, stride_ps, stride_slot,
            EVEN_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, TILES: tl.constexpr,
            USE_PDL: tl.constexpr = False):
    """``p[g, s, i, :] = x[i, ks] @ A[g, :rank, slot_i, ks].T`` over split s's ``TILES`` K tiles ``ks``, fp32
    ``[BLOCK_R]``, for member g of a group of tables that share x (q, k and v: the grid's third axis; a lone
    layer is a group of one). ``EVEN_K``: every tile of every split lies inside K (no K masks); otherwise a
    tile past the end is fully masked (no bytes read). The loop count is a constexpr: Triton 3.6's
    interpreter cannot take tensor loop bounds."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    member = tl.program_id(2).to(tl.int64)
    # The slots (the step's inputs, copied in before its first kernel) and the tables are no kernel's output:
    # the first A tile is in flight before the PDL wait, overlapping the kernel before (a base row reads none)
    slot = tl.load(slot_ptr + row * stride_slot).to(tl.int64)
    a_ptr += member * stride_ag
    p_ptr += member * stride_pg
    rr = tl.arange(0, BLOCK_R)
    rk = tl.arange(0, BLOCK_K)
    r_ok = rr < tl.where(slot != 0, rank, 0)  # a base row (slot 0) loads nothing
    first = split * TILES
    xs = x_ptr + row.to(tl.int64) * stride_xm + (first * BLOCK_K + rk) * stride_xk
    a_s = a_ptr + slot * stride_as + rr.to(tl.int64)[:, None] * stride_ar + (first * BLOCK_K + rk)[None, :] * stride_ak
    if EVEN_K:
        a = tl.load(a_s, mask=r_ok[:, None], other=0.0, eviction_policy="evict_first")
    else:
        k_ok = rk < K - first * BLOCK_K
        a = tl.load(a_s, mask=r_ok[:, None] & k_ok[None, :], other=0.0, eviction_policy="evict_first")
    if USE_PDL:  # PDL (support.pdl_enabled): every program waits before any return, then lets the next start
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    if slot == 0:
        return
    if EVEN_K:
        x = tl.load(xs).to(tl.float32)
    else:
        x = tl.load(xs, mask=k_ok, other=0.0).to(tl.float32)
    acc = tl.full((BLOCK_R,), 0.0, tl.float32)
    acc += tl.reduce(a.to(tl.float32) * x[None, :], 1, tl.standard._sum_combine)
    for t in range(1, TILES):
        xs += BLOCK_K * stride_xk
        a_s += BLOCK_K * stride_ak
        if EVEN_K:
            x_t = tl.load(xs).to(tl.float32)
            a_t = tl.load(a_s, mask=r_ok[:, None], other=0.0, eviction_policy="evict_first").to(tl.float32)
        else:
            k_t = rk < K - (first + t) * BLOCK_K
            x_t = tl.load(xs, mask=k_t, other=0.0).to(tl.float32)
            a_t = tl.load(a_s, mask=r_ok[:, None] & k_t[None, :], other=0.0,
                          eviction_policy="evict_first").to(tl.float32)
        acc += tl.reduce(a_t * x_t[None, :], 1, tl.standard._sum_combine)
    tl.store(p_ptr + split * stride_ps + row * BLOCK_R + rr, acc)


def _expand(y0_ptr, y1_ptr, y2_ptr, b0_ptr, b1_ptr, b2_ptr, slot_ptr, p_ptr,  # noqa: N803 (Triton's naming)
            N0, N1, N2, BLOCKS0, BLOCKS01, rank, splits, stride_y0m, stride_y1m, stride_y2m, stride_yn,
            stride_b0r, stride_b1r, stride_b2r, stride_b0s, stride_b1s, stride_b2s, stride_bn, stride_pg, stride_ps,
            stride_slot, EVEN_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
            USE_PDL: tl.constexpr = False):
    """``y_g[i, ns] += (sum over s of p[g, s, i, :rank]) @ B_g[:rank, slot_i, ns]``, in fp32, cast to y's dtype,
    for the up to three members g of a group in one launch: the grid's second axis walks member 0's column
    blocks (``BLOCKS0`` of them), then member 1's (up to ``BLOCKS01``), then member 2's. Members share their
    dtypes and their column strides (y's and B's); their widths, y's row strides and B's rank and slot strides
    may differ (grouped key/value heads; the splits of a fused q/k/v output)."""
    row = tl.program_id(0)
    slot = tl.load(slot_ptr + row * stride_slot).to(tl.int64)
    block = tl.program_id(1)
    member = (block >= BLOCKS0).to(tl.int32) + (block >= BLOCKS01).to(tl.int32)  # 0, 1 or 2
    block -= tl.where(member == 2, BLOCKS01, tl.where(member == 1, BLOCKS0, 0))
    rr = tl.arange(0, BLOCK_R)
    rs = tl.arange(0, BLOCK_S)
    rn = block * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < tl.where(member == 2, N2, tl.where(member == 1, N1, N0))
    r_ok = rr < tl.where(slot != 0, rank, 0)  # a base row (slot 0) loads nothing
    b_ok = r_ok[:, None] if EVEN_N else r_ok[:, None] & n_ok[None, :]
    b_rows = rr.to(tl.int64)[:, None]  # int64 offsets: a table may pass 2**31 elements
    # As in _shrink: the B tile (no kernel's output) is in flight before the PDL wait; a base row reads none.
    # Each member's tile is addressed and loaded in a branch of its own, from the arguments alone: a pointer or
    # stride picked by a branch loses the 16-divisibility Triton 3.6 (the GPU image's) specialized it with, and
    # the tile is then read 2 bytes a load (128 loads a thread, not 16; Triton 3.9 keeps it across the branch)
    if member == 0:
        b = tl.load(b0_ptr + slot * stride_b0s + b_rows * stride_b0r + rn[None, :] * stride_bn, mask=b_ok, other=0.0,
                    eviction_policy="evict_first")
    elif member == 1:
        b = tl.load(b1_ptr + slot * stride_b1s + b_rows * stride_b1r + rn[None, :] * stride_bn, mask=b_ok, other=0.0,
                    eviction_policy="evict_first")
    else:
        b = tl.load(b2_ptr + slot * stride_b2s + b_rows * stride_b2r + rn[None, :] * stride_bn, mask=b_ok, other=0.0,
                    eviction_policy="evict_first")
    if USE_PDL:  # PDL (support.pdl_enabled): every program waits before any return, then lets the next start
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    if slot == 0:
        return
    ps = p_ptr + member * stride_pg + rs[:, None] * stride_ps + row * BLOCK_R + rr[None, :]
    xa = tl.reduce(tl.load(ps, mask=(rs < splits)[:, None], other=0.0), 0, tl.standard._sum_combine)  # [BLOCK_R]
    delta = tl.reduce(b.to(tl.float32) * xa[:, None], 0, tl.standard._sum_combine)
    y_ok = n_ok | EVEN_N  # read, add in fp32, cast and store each member's columns (in its branch, as B)
    row = row.to(tl.int64)
    if member == 0:
        ys = y0_ptr + row * stride_y0m + rn * stride_yn
        tl.store(ys, (tl.load(ys, mask=y_ok, other=0.0).to(tl.float32) + delta).to(y0_ptr.dtype.element_ty), mask=y_ok)
    elif member == 1:
        ys = y1_ptr + row * stride_y1m + rn * stride_yn
        tl.store(ys, (tl.load(ys, mask=y_ok, other=0.0).to(tl.float32) + delta).to(y1_ptr.dtype.element_ty), mask=y_ok)
    else:
        ys = y2_ptr + row * stride_y2m + rn * stride_yn
        tl.store(ys, (tl.load(ys, mask=y_ok, other=0.0).to(tl.float32) + delta).to(y2_ptr.dtype.element_ty), mask=y_ok)


@functools.cache
def _kernels(interpret: bool):
    """(shrink, expand), jitted at the first call of each mode (``triton.jit`` reads TRITON_INTERPRET when it
    wraps the function, so the interpreter can be switched on at run time, as in int8_matmul). ``rank``,
    ``TILES`` and ``splits`` change with the rank bucket and the shapes only: a few compiled variants a
    model; the row count is never an argument (it is the grid's first axis)."""
    return triton.jit(_shrink), triton.jit(_expand)


# ---------------------------------------------------------------------------------------------- wrapper


def plan(in_f: int, out_f: int, rank: int) -> dict[str, int]:
    """The fixed launch shape for one layer and rank (no autotuning; every number is in elements):

    * ``BLOCK_R``: the rank rows a tile spans, the next power of two of ``rank``, at least 16;
    * ``BLOCK_K`` = ``TILE_ELEMS / BLOCK_R`` (at least 32): 256 at rank 16, 64 at rank 64;
    * ``tiles``, ``splits``: K is cut into ``cdiv(in, BLOCK_K)`` tiles, grouped ``tiles`` to a split so that
      ``splits * BLOCK_R <= MAX_PARTIALS`` (each expand program sums every split's partial): at rank 16,
      in = 4096 is 16 splits of one tile, in = 14336 is 56; at rank 64 and in = 4096, 32 splits of 2 tiles;
    * ``BLOCK_N`` = ``TILE_ELEMS / BLOCK_R`` (at least 32); ``BLOCK_S``, the splits rounded up to a power of 2.
    """
    block_r = block_r_for(rank)
    block_k = max(32, TILE_ELEMS // block_r)
    k_tiles = triton.cdiv(in_f, block_k)
    max_splits = max(1, MAX_PARTIALS // block_r)
    tiles = triton.cdiv(k_tiles, min(k_tiles, max_splits))
    splits = triton.cdiv(k_tiles, tiles)
    return {"BLOCK_R": block_r, "BLOCK_K": block_k, "tiles": tiles, "splits": splits,
            "BLOCK_N": _block_n(block_r), "BLOCK_S": triton.next_power_of_2(splits)}


def _block_n(block_r: int, elems: int | None = None) -> int:
    """``plan``'s ``BLOCK_N``: the output columns of an expand tile of ``elems`` elements (``TILE_ELEMS`` when
    None, read at the call; the int8 expand's programs take their own), at least 32."""
    return max(32, (TILE_ELEMS if elems is None else elems) // block_r)


def _check(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, slots: torch.Tensor,
           rank: int) -> None:
    """Shapes and dtypes only (no values read: nothing syncs with the device)."""
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must be [rows, in] and [rows, out], got {list(x.shape)} and {list(y.shape)}")
    if lora_a.dim() != 3 or lora_b.dim() != 3 or lora_a.shape[:2] != lora_b.shape[:2]:
        raise ValueError(f"tables must be [R, slots, in] and [R, slots, out], got {list(lora_a.shape)} and "
                         f"{list(lora_b.shape)}")
    if lora_a.shape[2] != x.shape[1] or lora_b.shape[2] != y.shape[1]:
        raise ValueError(f"tables {list(lora_a.shape)}, {list(lora_b.shape)} do not fit x {list(x.shape)}, "
                         f"y {list(y.shape)}")
    if slots.shape != (x.shape[0],) or slots.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"slots must be an integer [rows={x.shape[0]}] tensor, got {slots.dtype} "
                         f"{list(slots.shape)}")
    if not 0 <= rank <= lora_a.shape[0]:
        raise ValueError(f"rank {rank} is not within the tables' 0..{lora_a.shape[0]}")
    for name, t in (("x", x), ("y", y), ("lora_a", lora_a), ("lora_b", lora_b)):
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name} must be fp32, bf16 or fp16, got {t.dtype}")


def lora_delta_(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                slots: torch.Tensor, rank: int) -> None:
    """In place: ``y[i] += (x[i] @ lora_a[:rank, slots[i]].T) @ lora_b[:rank, slots[i]]`` for every row i.

    y: ``[rows, out]``, x: ``[rows, in]`` (any strides), lora_a ``[R, S, in]``, lora_b ``[R, S, out]`` (B
    pre-scaled), slots: int64 or int32 ``[rows]`` on the same device (slot 0 must be all zeros: its rows are
    skipped), ``rank <= R`` a Python int. Two launches, no host sync: CUDA-graph capturable once compiled.
    """
    lora_group_delta_((y,), x, lora_a[None], (lora_b,), slots, rank)


def lora_group_delta_(ys: Sequence[torch.Tensor], x: torch.Tensor, lora_a: torch.Tensor,
                      lora_bs: Sequence[torch.Tensor], slots: torch.Tensor, rank: int) -> None:
    """``lora_delta_`` for G layers that share their input (q, k and v): ``ys[g][i] += (x[i] @ lora_a[g,
    :rank, slots[i]].T) @ lora_bs[g][:rank, slots[i]]``, with one shrink launch for the G members (x read
    once a split, G times the programs) and one expand launch for up to three members (their outputs differ in
    width: grouped key/value heads). ``lora_a``: the members' A tables stacked, ``[G, R, S, in]`` (any
    strides). Each member's partials are the ones ``lora_delta_`` computes for it alone, summed in the same
    order: the results are bit-identical to G separate calls."""
    if lora_a.dim() != 4 or not len(ys) == len(lora_bs) == lora_a.shape[0]:
        raise ValueError(f"a group needs A [G, R, slots, in] and G outputs and B tables, got A "
                         f"{list(lora_a.shape)}, {len(ys)} outputs, {len(lora_bs)} B tables")
    for y, a, b in zip(ys, lora_a, lora_bs, strict=True):
        _check(y, x, a, b, slots, rank)
    if x.shape[0] == 0 or rank == 0:
        return
    lora_expand_(ys, lora_shrink(x, lora_a, slots, rank), lora_bs)


@dataclass(frozen=True)
class LoraPartials:
    """A decode step's ``x @ A^T`` before the expand, split along ``in``: ``p[g, s, i, :BLOCK_R]`` (fp32) is
    member g's sum over split s for row i; a row on slot 0 has none written (and none is ever read). Made by
    ``lora_shrink``, or by a kernel that owns a split of x (the decode attention's merge writes o_proj's, one
    split a head); summed and multiplied by B in ``lora_expand_``, or in a kernel that reads the members'
    outputs next (``rope_append`` adds q, k and v's deltas before rotating)."""

    p: torch.Tensor  # [G, splits, rows, BLOCK_R] fp32
    slots: torch.Tensor  # [rows] int, each row's slot
    rank: int  # rank rows read (<= BLOCK_R)

    @property
    def splits(self) -> int:
        return self.p.shape[1]

    @property
    def block_r(self) -> int:
        return self.p.shape[3]

    @property
    def block_s(self) -> int:
        """The splits rounded up to a power of two: the tile a program sums them in."""
        return triton.next_power_of_2(self.splits)


def block_r_for(rank: int) -> int:
    """``plan``'s ``BLOCK_R``: the rank rows a tile spans, the next power of two of ``rank``, at least 16."""
    return max(MIN_BLOCK_R, triton.next_power_of_2(rank))


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, slots: torch.Tensor, rank: int) -> LoraPartials:
    """The shrink of ``lora_group_delta_`` alone (one launch): x ``[rows, in]``, ``lora_a`` ``[G, R, S, in]``."""
    rows, in_f = x.shape
    shrink, _ = _kernels(interpreting())
    cfg = plan(in_f, in_f, rank)  # BLOCK_R, BLOCK_K and the splits depend on (in, rank) only
    # [G, splits, rows, BLOCK_R] fp32; rows on slot 0 leave theirs unwritten (and expand never reads them)
    p = torch.empty((lora_a.shape[0], cfg["splits"], rows, cfg["BLOCK_R"]), device=x.device, dtype=torch.float32)
    if rows:
        shrink[(rows, cfg["splits"], lora_a.shape[0])](
            x, lora_a, slots, p, in_f, rank, x.stride(0), x.stride(1), *lora_a.stride(), p.stride(0), p.stride(1),
            slots.stride(0), EVEN_K=in_f == cfg["splits"] * cfg["tiles"] * cfg["BLOCK_K"], BLOCK_R=cfg["BLOCK_R"],
            BLOCK_K=cfg["BLOCK_K"], TILES=cfg["tiles"], num_warps=NUM_WARPS, **pdl_launch(x.device))
    return LoraPartials(p, slots, rank)


def lora_expand_(ys: Sequence[torch.Tensor], partials: LoraPartials, lora_bs: Sequence[torch.Tensor]) -> None:
    """The expand of ``lora_group_delta_`` alone: ``ys[g][i] += (sum over s of p[g, s, i]) @ lora_bs[g][:rank,
    slot_i]``, one launch for up to three members (a shorter group padded with member 0's blocks: never
    reached). ``ys[g]``: ``[rows, out_g]``, unit column strides shared by the members, as B's."""
    rows, rank = partials.p.shape[2], partials.rank
    if rows == 0 or rank == 0:
        return
    _, expand = _kernels(interpreting())
    block_n = _block_n(partials.block_r)
    p, slots = partials.p, partials.slots
    for first in range(0, len(ys), 3):
        y3, b3 = list(ys[first:first + 3]), list(lora_bs[first:first + 3])
        blocks = [triton.cdiv(y.shape[1], block_n) for y in y3]
        if any(y.stride(1) != y3[0].stride(1) for y in y3) or any(b.stride(2) != b3[0].stride(2) for b in b3):
            raise ValueError("a group's outputs and B tables must share their column strides")
        y3, b3 = (y3 + [y3[0]] * 2)[:3], (b3 + [b3[0]] * 2)[:3]
        expand[(rows, sum(blocks))](
            *y3, *b3, slots, p[first:], *(y.shape[1] for y in y3), blocks[0], sum(blocks[:2]), rank,
            partials.splits, *(y.stride(0) for y in y3), y3[0].stride(1), *(b.stride(0) for b in b3),
            *(b.stride(1) for b in b3), b3[0].stride(2), p.stride(0), p.stride(1), slots.stride(0),
            EVEN_N=all(y.shape[1] % block_n == 0 for y in y3), BLOCK_R=partials.block_r,
            BLOCK_N=block_n, BLOCK_S=partials.block_s, num_warps=NUM_WARPS, **pdl_launch(p.device))


def reference_delta(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, slots: torch.Tensor,
                    rank: int) -> torch.Tensor:
    """What ``lora_delta_`` adds, in fp32 with torch (tests and benchmarks): ``[rows, out]``."""
    a = lora_a[:rank].index_select(1, slots).float()  # [rank, rows, in]
    b = lora_b[:rank].index_select(1, slots).float()  # [rank, rows, out]
    xa = torch.einsum("mk,rmk->mr", x.float(), a)
    return torch.einsum("mr,rmn->mn", xa, b)
