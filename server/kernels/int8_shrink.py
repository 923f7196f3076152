"""A LoRA shrink in the int8 matmul's own launch (issue 18): the programs past the matmul's run it.

At a decode step a layer's LoRA shrink (``lora_bgmv.lora_shrink``: ``x[i] @ A[:rank, slot_i].T``, split along K)
reads only the layer's input, as its base matmul does. Launched after the matmul (``adapters/lora_folds.py``) it
has a launch, a ramp and a tail of its own a layer: at 32 rows on 32 adapters the q/k/v shrink reads 12.6 MB of
A in ~6 us (bench/RESULTS.md, 89ba5f3), while the int8 matmul before it reads its 50 MB at 2.0 TB/s of the
H200's 4.8 (24.7 us, 8fc9dbd). Here the shrink runs as extra programs of the int8 split-K kernel's grid
(``int8_decode_kernels._int8_mm``'s ``SHRINK``): column blocks past the matmul's on the grid's second axis where
it has one split, else whole slices of the third axis past its ``SPLIT_K`` (the programs past the last unit, as
the grid is a box, read and write nothing). The GPU hands out a grid's blocks in order (the first axis fastest,
the third slowest), so these start after every matmul program has: they take the SMs that the matmul's last wave
leaves idle and stream A beside its last tiles. (On a second stream beside the matmul, ``engine/side_stream.py``,
the shrink's programs started first and cost 1.8% of the int8 32-row step.) Past ``PDL_MAX_BUCKET`` rows, where the
matmul launches without PDL and its programs trigger nothing, the shrink's programs trigger the next kernel's
launch: it may start once every matmul program has ended, and stream its LoRA B tiles while the shrink runs.

A program does ``LORA_U`` of the shrink's splits of one (row, member): as many as the matmul's warps (at most the
splits), each a warp's worth as in the shrink's own one-warp programs (a ``[BLOCK_R, BLOCK_K]`` tile, 4096
elements, per tile of the split), summed tile by tile in the shrink's order. The partials are the shrink's own
``LoraPartials`` (same splits, same layout), which the kernels after it read as they read ``lora_shrink``'s (the
rotary + append kernel adds q/k/v's deltas, the SiLU product gate/up's, the next add + norm down_proj's). In
the interpreter they equal ``lora_shrink``'s bit for bit; compiled, a program's reduction layout may differ from
the one-warp kernel's in fp32's last bits.

Where it runs (``matmul_and_shrink``; else None and the caller launches the two): rows the split-K kernel
serves (1 to ``MAX_KERNEL_ROWS``), its config for the row bucket tuned (warm-up tunes every decode bucket before
any graph is captured), on a CUDA device or in the interpreter. Where Triton refuses to build the launch (a
compile, ptxas or resource error, raised before anything runs; the sm_90 compile tests build every decode tile
with it, and it takes the same shared memory as the matmul alone), it says so once and leaves that shape to the
two launches. ``IN_MATMUL`` switches it for the engine: on, as it gained at every row bucket timed on the H200
(``bench/pdl_bench.py --switch shrink``).

A float weight at 2-64 rows runs through the same kernel where ``dense_splitk.py`` switches it on, and its shrink
runs here the same way (``scb`` None).
"""

from __future__ import annotations

import torch
import triton

from .int8_matmul import _CHOSEN, _INTERPRET_SMALL, MAX_KERNEL_ROWS, _small_key, row_bucket, small_m_with_extra
from .lora_bgmv import LoraPartials, plan
from .support import interpreting

# The engine's switch. pdl_bench --switch shrink on the H200 (fdf7939, bench/RESULTS.md), int8, every row on its own
# adapter, ms a step on / off: 1 row 2.627 / 2.686, 8 rows 3.864 / 3.920, 32 rows 6.821 / 6.889; the GPU parity
# suite passed with it on.
IN_MATMUL = True
_INTERPRET_WARPS = 4  # the interpreter's stand-in for a config's num_warps (the splits a shrink program does)
_REFUSED: set[tuple] = set()  # launches Triton would not build: the two launches serve them


def matmul_and_shrink(x: torch.Tensor, cb: torch.Tensor, scb: torch.Tensor | None, bias: torch.Tensor | None,
                      lora_a: torch.Tensor, slots: torch.Tensor, rank: int,
                      config: dict | None = None) -> tuple[torch.Tensor, LoraPartials] | None:
    """``(int8_weight_matmul(x, cb, scb, bias), lora_shrink(x2, lora_a, slots, rank))`` in one launch, x2 being x's
    rows (``[rows, K]``, one token a row: ``slots`` has one entry a row); ``lora_a``: the members' A tables
    stacked, ``[G, R, S, K]``. None where it does not run (the module docstring; nothing launched), or where
    ``rank`` is 0 (no shrink to do). ``config`` (tests): the matmul's launch kwargs instead of the tuned choice.
    ``scb`` None: ``cb`` is a float weight (``dense_splitk.py``: the same kernel's float tiles, no scale)."""
    x2 = x.reshape(-1, x.shape[-1])
    rows, k = x2.shape
    interpret = interpreting()
    if (not (interpret or x2.is_cuda) or not 0 < rows <= MAX_KERNEL_ROWS or not 0 < rank <= lora_a.shape[1]
            or lora_a.dim() != 4 or lora_a.shape[3] != k or slots.shape != (rows,) or cb.shape[1] != k):
        return None
    if config is None:
        config = _INTERPRET_SMALL if interpret else _CHOSEN.get(_small_key(False, row_bucket(rows), x2, cb, scb, bias))
    if config is None:  # not tuned yet: the caller's two launches tune it
        return None
    shape = plan(k, k, rank)
    splits, members = shape["splits"], lora_a.shape[0]
    per_program = min(triton.next_power_of_2(splits), config.get("num_warps", _INTERPRET_WARPS))
    p = torch.empty((members, splits, rows, shape["BLOCK_R"]), device=x2.device, dtype=torch.float32)
    shrink = dict(SHRINK=True, a_ptr=lora_a, slot_ptr=slots, lp_ptr=p, rank=rank, lora_splits=splits,
                  lora_members=members, stride_ag=lora_a.stride(0), stride_ar=lora_a.stride(1),
                  stride_as=lora_a.stride(2), stride_ak=lora_a.stride(3), stride_pg=p.stride(0), stride_ps=p.stride(1),
                  stride_slot=slots.stride(0), LORA_EVEN_K=k == splits * shape["tiles"] * shape["BLOCK_K"],
                  BLOCK_R=shape["BLOCK_R"], LORA_K=shape["BLOCK_K"], LORA_TILES=shape["tiles"], LORA_U=per_program,
                  units=rows * members * triton.cdiv(splits, per_program))
    refusal = (_small_key(interpret, row_bucket(rows), x2, cb, scb, bias), str(config), lora_a.dtype,
               *(shrink[name] for name in ("LORA_EVEN_K", "BLOCK_R", "LORA_K", "LORA_TILES", "LORA_U")))
    y = small_m_with_extra(x2, cb, scb, bias, interpret, config, shrink, refusal, _REFUSED,
                           "the LoRA shrink's own launch")
    if y is None:
        return None
    return y.reshape(*x.shape[:-1], cb.shape[0]), LoraPartials(p, slots, rank)
