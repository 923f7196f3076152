"""o_proj's LoRA expand in its split-K matmul's own launch (issue 18): the programs past the matmul's compute it.

At a decode step the decode attention's merge computes o_proj's LoRA shrink (``adapters/lora_folds.py``), and the
post-attention add + norm adds the delta (``rms_norm.OutputDelta``): one program a row reads the row's whole
``[rank, 4096]`` B, 128 KB at rank 16, on one SM. At 32 rows on 32 adapters that fold cost the norm +78 us a
step on the H200 (int8; +95 bf16: 2.4-3 us a layer for 4.2 MB of B, the 2afdca8 step profiles in
bench/RESULTS.md), where the bytes alone take ~0.9 us a layer at the H200's bandwidth: 32 SMs cannot pull
them faster. Here the delta's sums run as extra programs of o_proj's own split-K launch
(``int8_decode_kernels._int8_mm``'s ``EXPAND``), ``E_BLOCK_N`` columns of one row a program (``PROGRAM_ELEMS``
of B's elements), which start after every matmul program (a grid's blocks start in order) and read B beside its
last tiles, into an fp32 ``[rows, out]`` buffer; the add + norm then adds those sums in place of its own
(``OutputDelta.done``): the same fp32 sums, in the same order (bit for bit in the interpreter; compiled, a program's
reduction layout may differ in fp32's last bits), added and rounded as the fold adds them.

Where it runs (``matmul_and_expand``; else None and the caller runs the matmul and leaves the fold to the norm):
rows the split-K kernel serves (1 to ``MAX_KERNEL_ROWS``), its config for the row bucket tuned, on a CUDA device
or in the interpreter, a delta the norm takes (``OutputDelta.fits``). ``IN_MATMUL`` switches it for the engine's
int8 o_proj, ``FLOAT_IN_MATMUL`` for a float one, which takes it where ``dense_splitk.hosts_shrink`` would run the
kernel with a shrink (``dense_splitk.layer_with_expand``; ``bench/pdl_bench.py --switch expand`` times both).
"""

from __future__ import annotations

from dataclasses import replace

import torch
import triton

from .int8_matmul import _CHOSEN, _INTERPRET_SMALL, MAX_KERNEL_ROWS, _small_key, row_bucket, small_m_with_extra
from .lora_bgmv import TILE_ELEMS, _block_n
from .rms_norm import OutputDelta
from .support import interpreting

# The engine's switches, for an int8 o_proj and for a float one (bench/RESULTS.md, an H100 at 9fa7aa1, 32 rows on 32
# LoRA adapters over base-only, serve_bench: int8 0.950 / 0.954 on against 0.949 / 0.948 off; bf16 0.954 on against
# 0.956 off, and pdl_bench's step even, 9.459 / 9.467 ms): on for int8, off for float weights.
IN_MATMUL = True
FLOAT_IN_MATMUL = False
# B's elements one extra program reads (``BLOCK_R * E_BLOCK_N``): 16384 is 1024 columns at rank 16, 128 programs at
# 32 rows of 4096 columns; lora_bgmv's 4096 (512 small programs, each with the matmul program's footprint) lost
# (pdl_bench --switch expand on the H100, int8 at 32 LoRA rows, off / on: 4096 0.994, 8192 0.983, 16384 1.017,
# 0.998, 1.007, 32768 1.004; the serves above decided).
PROGRAM_ELEMS = 4 * TILE_ELEMS
_REFUSED: set[tuple] = set()  # launches Triton would not build: the norm's fold serves them


def matmul_and_expand(x: torch.Tensor, cb: torch.Tensor, scb: torch.Tensor | None, bias: torch.Tensor | None,
                      delta: OutputDelta, config: dict | None = None) -> tuple[torch.Tensor, OutputDelta] | None:
    """``(int8_weight_matmul(x, cb, scb, bias), delta with its sums done)`` in one launch, x's rows one token each
    (``delta``'s partials have one row per x row), for the add + norm after the layer to add (``OutputDelta.done``:
    ``[rows, out]`` fp32). None where it does not run (the module docstring; nothing launched). ``config`` (tests):
    the matmul's launch kwargs instead of the tuned choice. ``scb`` None: ``cb`` is a float weight
    (``dense_splitk.py``)."""
    x2 = x.reshape(-1, x.shape[-1])
    (rows, k), n = x2.shape, cb.shape[0]
    interpret = interpreting()
    partials, b = delta.partials, delta.lora_b
    if (not (interpret or x2.is_cuda) or not 0 < rows <= MAX_KERNEL_ROWS or cb.shape[1] != k or delta.done is not None
            or not delta.fits(x2.new_empty((rows, n)))):
        return None
    if config is None:
        config = _INTERPRET_SMALL if interpret else _CHOSEN.get(_small_key(False, row_bucket(rows), x2, cb, scb, bias))
    if config is None:  # not tuned yet: the plain matmul tunes it
        return None
    block_n = _block_n(partials.block_r, PROGRAM_ELEMS)  # a [BLOCK_R, E_BLOCK_N] tile of B a program
    d = torch.empty((rows, n), device=x2.device, dtype=torch.float32)
    p, slots = partials.p, partials.slots
    expand = dict(EXPAND=True, eb_ptr=b, ed_ptr=d, slot_ptr=slots, lp_ptr=p, rank=partials.rank,
                  lora_splits=partials.splits, stride_ebr=b.stride(0), stride_ebs=b.stride(1), stride_ps=p.stride(1),
                  stride_edm=d.stride(0), stride_slot=slots.stride(0), BLOCK_R=partials.block_r,
                  E_BLOCK_S=partials.block_s, E_BLOCK_N=block_n, units=rows * triton.cdiv(n, block_n))
    refusal = (_small_key(interpret, row_bucket(rows), x2, cb, scb, bias), str(config), b.dtype, partials.block_r,
               partials.block_s, block_n)  # E_BLOCK_N too: PROGRAM_ELEMS may change within a process
    y = small_m_with_extra(x2, cb, scb, bias, interpret, config, expand, refusal, _REFUSED, "the norm's fold")
    if y is None:
        return None
    return y.reshape(*x.shape[:-1], n), replace(delta, done=d)
