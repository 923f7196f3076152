"""The post-attention add + norm with o_proj's LoRA delta folded in, its B read over several programs a row (issue 18).

``rms_norm``'s fold (``OutputDelta``) runs one program a row: at 32 rows on 32 adapters, 32 of the H200's 132 SMs
each stream a row's whole ``[rank, 4096]`` B (128 KB at rank 16, 4.2 MB a layer), ~2.4-3 us a layer, one SM's share
of the bandwidth (bench/NOTES.md, "Thirty-first session"). Here program ``(row, part)`` reads ``COLS`` of B's
columns (8 programs a row at hidden 4096: 256 at 32 rows), adds its columns' delta to the residual as the fold
does (fp32, rounded to the residual's dtype; a base row keeps it), stores them at ``s``, and counts itself in
(a barrier of its threads, then one release-acquire increment of the row's counter, as the decode attention's
fused merge does). The row's last program to arrive reads the whole row back past L1 and finishes as
``rms_norm._rms_norm_rows`` does: ``s = x + (residual + delta)``, rounded to x's dtype, and the norm of ``s`` over
the whole row in one program, at the plain norm's warps, so its reduction is the plain norm's; then it sets the
counter back to 0 (CUDA graphs replay on zeros).

A kernel of its own rather than a mode of ``_rms_norm_rows``: the fold's kernel serves every add + norm of every
step by default, and this one stays out of its compiled code until it is timed. Its last program's tail (the add,
the roundings, the norm) is that kernel's, line for line; ``test_norm_fold_split`` compares the two bit for bit,
so a change to one that the other lacks fails there.

The same bits as the fold in Triton's interpreter (tested); compiled, a column's sum over the rank may differ in
fp32's last bits from the fold's, as ``OutputDelta`` says of any reduction layout. ``ON`` switches it (off: not
yet timed on a GPU; ``bench/pdl_bench.py --switch splitfold`` A/Bs it); ``add_norm`` returns None where it does not
run, and the fold serves.
"""

from __future__ import annotations

import functools

import torch

from . import rms_norm
from .rms_norm import MAX_HIDDEN, OutputDelta, _launch_config, _rows
from .support import interpreting, pdl_launch, triton_available, triton_into

ON = False  # the engine's switch: not yet timed on a GPU
COLS = 512  # B's columns a program: 8 programs a row at hidden 4096, a [16, 512] bf16 tile (16 KB) each
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Bound on first use by ``_triton()``: the kernel's body refers to ``tl`` as a module global, as Triton wants.
triton = None
tl = None


# ---------------------------------------------------------------------------------------------- kernel
# Only Triton builtins are called (as in rms_norm.py), so the interpreter can be switched on after Triton's import.


def _norm_fold_split(x_ptr, r_ptr, w_ptr, y_ptr, s_ptr, count_ptr, N, stride_x, stride_r, stride_y, stride_s,  # noqa: N803
                     inv_n, eps, b_ptr, slot_ptr, p_ptr, rank, splits, stride_br, stride_bs, stride_ps, stride_slot,
                     BLOCK: tl.constexpr, COLS: tl.constexpr, ROUND_X: tl.constexpr, ROUND_Y: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, USE_PDL: tl.constexpr = False):
    """Row ``program_id(0)``, columns ``[part * COLS, (part + 1) * COLS)`` for ``part = program_id(1)``: the module
    docstring. ``s``: ``[rows, N]``, written by every program of the row, then by the last one again (the sum)."""
    row = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    slot = tl.load(slot_ptr + row * stride_slot).to(tl.int64)
    rr = tl.arange(0, BLOCK_R)
    r_ok = rr < tl.where(slot != 0, rank, 0)  # a base row (slot 0) loads no B and no partial
    cc = part * COLS + tl.arange(0, COLS)
    c_ok = cc < N
    # the slot (a step input) and B (no kernel writes it) in flight before the PDL wait
    b = tl.load(b_ptr + slot * stride_bs + rr.to(tl.int64)[:, None] * stride_br + cc[None, :],
                mask=r_ok[:, None] & c_ok[None, :], other=0.0, eviction_policy="evict_first")
    if USE_PDL:  # launched with PDL (support.pdl_enabled): see the kernels before it, then let the next start
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    rs = tl.arange(0, BLOCK_S)
    ps = p_ptr + rs[:, None] * stride_ps + row * BLOCK_R + rr[None, :]
    xa = tl.reduce(tl.load(ps, mask=(rs < splits)[:, None] & r_ok[None, :], other=0.0), 0,
                   tl.standard._sum_combine)  # [BLOCK_R], the row's partials summed over the splits
    r_c = tl.load(r_ptr + row * stride_r + cc, mask=c_ok, other=0.0).to(tl.float32)
    e = r_c + tl.reduce(b.to(tl.float32) * xa[:, None], 0, tl.standard._sum_combine)
    if ROUND_X:
        eb = e.to(tl.uint32, bitcast=True)
        e = ((eb + 0x7FFF + ((eb >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    tl.store(s_ptr + row * stride_s + cc, tl.where(slot != 0, e, r_c).to(s_ptr.dtype.element_ty), mask=c_ok)
    tl.debug_barrier()  # every thread's stores above come before the (one-thread) release below
    arrived = tl.atomic_add(count_ptr + row, 1, sem="acq_rel")  # the row's other parts stored before this one's
    if arrived == tl.num_programs(1) - 1:  # the row's last: the whole row, as rms_norm's fold ends it
        tl.debug_barrier()  # the acquire above comes before any thread of the program reads
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        h = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        d = tl.load(s_ptr + row * stride_s + cols, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float32)
        h = h + d
        if ROUND_X:
            hb = h.to(tl.uint32, bitcast=True)
            h = ((hb + 0x7FFF + ((hb >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        else:
            h = h.to(x_ptr.dtype.element_ty).to(tl.float32)
        tl.store(s_ptr + row * stride_s + cols, h.to(s_ptr.dtype.element_ty), mask=mask)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        var = tl.reduce(h * h, 0, tl.standard._sum_combine) * inv_n
        h = h * tl.rsqrt(var + eps)
        if ROUND_X:
            hb = h.to(tl.uint32, bitcast=True)
            h = ((hb + 0x7FFF + ((hb >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        else:  # transformers rounds to the input dtype before the weight multiply
            h = h.to(x_ptr.dtype.element_ty).to(tl.float32)
        y = w * h
        if ROUND_Y:
            yb = y.to(tl.uint32, bitcast=True)
            y = ((yb + 0x7FFF + ((yb >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        tl.store(y_ptr + row * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
        tl.atomic_xchg(count_ptr + row, 0)  # zero again for the next call (or graph replay)


def _triton():
    """Import Triton (once) into this module's globals, where the kernel's body finds ``tl``."""
    return triton_into(globals())


@functools.cache
def _kernel(interpret: bool):
    """The jitted kernel, built at the first call of each mode (``triton.jit`` reads TRITON_INTERPRET)."""
    return _triton().jit(_norm_fold_split, do_not_specialize=["rank", "splits"])


@functools.cache
def _counters(device: torch.device, size: int) -> torch.Tensor:
    """The rows' arrival counters on ``device``, zeros: made once a device and size, at the first eager step (the
    engine runs a shape's steps eagerly before it captures one), and kept for the process: a captured graph
    replays on them, and every launch leaves them at zero. This kernel's own: the decode attention's fused merge
    keeps others."""
    return torch.zeros(size, device=device, dtype=torch.int32)


# ---------------------------------------------------------------------------------------------- wrapper


def add_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
             delta: OutputDelta) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``rms_norm.fused_add_rms_norm(x, residual, weight, eps, delta)``'s ``(s, norm of s)`` with B read over
    ``ceil(N / COLS)`` programs a row, or None where it does not run (nothing launched): a delta whose sums are
    done, one program a row's worth of columns or fewer, no CUDA device and no interpreter. ``x`` and ``residual``:
    ``[..., N]``, as ``fused_add_rms_norm`` takes them (``s`` and the norm come back in x's shape).
    ``delta.fits(residual)`` must hold (the caller checked)."""
    n = x.shape[-1]
    interpret = interpreting()
    if (delta.done is not None or not COLS < n <= MAX_HIDDEN or residual.shape != x.shape
            or x.dtype not in _DTYPES or weight.dtype not in _DTYPES or weight.shape != (n,)
            or weight.stride(0) != 1 or not (interpret or triton_available(x.device))):
        return None
    x2, r2 = _rows(x, n), _rows(residual, n)
    rows = x2.shape[0]
    y = torch.empty(x.shape, device=x.device, dtype=torch.promote_types(weight.dtype, x.dtype))
    s = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    if rows == 0:
        return s, y
    counts = _counters(x.device, max(256, 1 << (rows - 1).bit_length()))
    rms_norm._triton()  # _launch_config reads Triton there
    block, warps = _launch_config(n)  # the plain norm's: the last program's reduction is the plain norm's
    b, p, slots = delta.lora_b, delta.partials.p, delta.partials.slots
    parts = -(-n // COLS)
    _kernel(interpret)[(rows, parts)](
        x2, r2, weight, y, s, counts, n, x2.stride(0), r2.stride(0), n, n, 1.0 / n,
        float(eps), b, slots, p, delta.partials.rank, delta.partials.splits, b.stride(0), b.stride(1), p.stride(1),
        slots.stride(0), BLOCK=block, COLS=COLS, ROUND_X=interpret and x.dtype == torch.bfloat16,
        ROUND_Y=interpret and y.dtype == torch.bfloat16, BLOCK_R=delta.partials.block_r,
        BLOCK_S=delta.partials.block_s, num_warps=warps, **pdl_launch(x.device))
    return s, y
